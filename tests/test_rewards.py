"""Rewards: JPEG size rewards, the registry, score_images, and CLIPScore on a tiny random CLIP."""
import subprocess
import sys
import textwrap

import pytest
import torch

from b2fast.rewards import available_rewards, build_reward, score_images
from b2fast.testing.tiny_clip import register_tiny_clip


def _flat_and_noise(size=64):
    flat = torch.full((1, 3, size, size), 0.5)
    noise = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    return torch.cat([flat, noise])


# ---- JPEG -------------------------------------------------------------------------------------

def test_jpeg_flat_image_compresses_better_than_noise():
    images, prompts = _flat_and_noise(), ["x", "y"]
    comp = score_images(build_reward("jpeg_compressibility"), images, prompts)
    incomp = score_images(build_reward("jpeg_incompressibility"), images, prompts)
    assert comp.shape == (2,) and comp.dtype == torch.float32
    assert comp[0] > comp[1] and incomp[0] < incomp[1]
    assert torch.equal(comp, -incomp) and (incomp > 0).all()


def test_jpeg_is_batch_size_invariant_and_quality_matters():
    images = torch.rand(5, 3, 37, 29, generator=torch.Generator().manual_seed(1))
    reward = build_reward("jpeg_incompressibility")
    batch = reward(images, [""] * 5)
    single = torch.cat([reward(images[i:i + 1], [""]) for i in range(5)])
    assert torch.equal(batch, single)
    low = build_reward("jpeg_incompressibility", {"quality": 10})(images, [""] * 5)
    assert (low < batch).all()


@pytest.mark.parametrize("quality", [0, 101, 9.5, True])
def test_jpeg_rejects_bad_quality(quality):
    with pytest.raises(ValueError, match="reward.options.quality"):
        build_reward("jpeg_compressibility", {"quality": quality})


# ---- registry and score_images ----------------------------------------------------------------

def test_registry_lists_builtins_and_rejects_unknown_name():
    assert {"clipscore", "jpeg_compressibility", "jpeg_incompressibility"} <= set(available_rewards())
    with pytest.raises(ValueError, match="reward.name"):
        build_reward("no_such_reward")
    with pytest.raises(ValueError, match="reward.options"):
        build_reward("jpeg_compressibility", {"no_such_option": 1})


def test_user_reward_by_module_and_function(tmp_path, monkeypatch):
    (tmp_path / "my_rewards_mod.py").write_text(textwrap.dedent("""
        import torch
        def brightness(images, prompts):
            return images.mean(dim=(1, 2, 3))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    reward = build_reward("my_rewards_mod:brightness")
    scores = score_images(reward, _flat_and_noise(8), ["a", "b"])
    assert scores[0] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="reward.name"):
        build_reward("my_rewards_mod:missing")
    with pytest.raises(ValueError, match="reward.options"):
        build_reward("my_rewards_mod:brightness", {"scale": 2})


@pytest.mark.parametrize("source, why", [("def reward(images prompts):\n    pass\n", "SyntaxError: "),
                                         ("raise RuntimeError('no API key')\n", "RuntimeError: no API key")])
def test_a_plugin_whose_import_fails_is_a_one_line_error(tmp_path, monkeypatch, source, why):
    name = f"broken_plugin_{len(source)}"
    (tmp_path / f"{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError) as info:
        build_reward(f"{name}:reward")
    message = str(info.value)
    assert message.startswith(f"reward.name: importing module {name!r} failed ({why}") and "\n" not in message


def test_score_images_turns_non_finite_into_nan_and_checks_count():
    images = torch.zeros(3, 3, 4, 4)
    with pytest.warns(RuntimeWarning, match="2 non-finite"):
        scores = score_images(lambda im, p: [1.0, float("inf"), float("nan")], images, ["a"] * 3)
    assert scores[0] == 1.0 and scores[1:].isnan().all() and scores.dtype == torch.float32
    with pytest.raises(ValueError, match="2 scores for 3 images"):
        score_images(lambda im, p: torch.ones(2), images, ["a"] * 3)


def _nan_reward(images, prompts):
    return torch.full((images.shape[0],), float("nan"))


def test_non_finite_warning_names_the_reward_and_fits_training_and_evaluation():
    from b2fast.rewards.base import reward_label

    images = torch.zeros(2, 3, 4, 4)
    with pytest.warns(RuntimeWarning) as record:
        score_images(_nan_reward, images, ["a"] * 2, name="mine")
        score_images(_nan_reward, images, ["a"] * 2)
    assert [str(w.message) for w in record] == [
        "2 non-finite score(s) out of 2 from reward 'mine' are ignored",
        f"2 non-finite score(s) out of 2 from reward '{__name__}:_nan_reward' are ignored"]
    assert reward_label(build_reward("jpeg_compressibility")) == "jpeg_compressibility"


def test_importing_rewards_does_not_import_open_clip():
    code = "import sys, b2fast.rewards; assert 'open_clip' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- CLIPScore on a tiny random-weight CLIP ---------------------------------------------------

@pytest.fixture(scope="module")
def tiny_clipscore():
    torch.manual_seed(0)  # random weights; seeded so the module's numbers are reproducible
    return build_reward("clipscore", {"model_name": register_tiny_clip(), "pretrained": None,
                                      "batch_size": 3})


def _images(n, h=45, w=61, seed=0):
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


PROMPTS = ["a cat riding a bike", "a red apple", "a dog", "a cat riding a bike", "a cup on a table"]


def test_clipscore_shape_dtype_range_and_determinism(tiny_clipscore):
    images = _images(5)
    scores = score_images(tiny_clipscore, images, PROMPTS)
    assert scores.shape == (5,) and scores.dtype == torch.float32
    assert (scores.abs() <= 1).all() and scores.std() > 0
    assert torch.equal(scores, score_images(tiny_clipscore, images, PROMPTS))


def test_clipscore_is_batch_size_invariant(tiny_clipscore):
    images = _images(5, seed=1)
    batch = tiny_clipscore(images, PROMPTS)  # chunks of 3 images inside
    single = torch.cat([tiny_clipscore(images[i:i + 1], PROMPTS[i:i + 1]) for i in range(5)])
    torch.testing.assert_close(batch, single, atol=1e-5, rtol=0)


def test_clipscore_identical_pairs_score_identically(tiny_clipscore):
    image = _images(1, seed=2)
    scores = tiny_clipscore(image.repeat(4, 1, 1, 1), ["a dog playing chess"] * 4)
    assert torch.equal(scores, scores[:1].expand(4))


def test_clipscore_preprocess_matches_model_input(tiny_clipscore):
    for h, w in [(45, 61), (61, 45), (32, 32), (512, 512)]:
        assert tiny_clipscore.preprocess(torch.rand(2, 3, h, w)).shape == (2, 3, 32, 32)


def test_clipscore_scale100_clamp_is_nonnegative():
    torch.manual_seed(0)
    reward = build_reward("clipscore", {"model_name": register_tiny_clip(), "pretrained": None,
                                        "scale100_clamp": True})
    torch.manual_seed(0)
    plain = build_reward("clipscore", {"model_name": register_tiny_clip(), "pretrained": None})
    images = _images(5, seed=3)
    clamped, cos = reward(images, PROMPTS), plain(images, PROMPTS)
    assert (clamped >= 0).all()
    torch.testing.assert_close(clamped, (100 * cos).clamp_min(0), atol=1e-4, rtol=0)


def test_clipscore_in_bfloat16_stays_close_to_float32(tiny_clipscore):
    torch.manual_seed(0)
    low = build_reward("clipscore", {"model_name": register_tiny_clip(), "pretrained": None, "batch_size": 3,
                                     "precision": "bfloat16"})
    images = _images(5, seed=4)
    exact, rounded = tiny_clipscore(images, PROMPTS), low(images, PROMPTS)
    assert rounded.dtype == torch.float32 and not torch.equal(rounded, exact)  # autocast did run
    torch.testing.assert_close(rounded, exact, atol=3e-2, rtol=0)


def test_clipscore_rejects_bad_inputs(tiny_clipscore):
    with pytest.raises(ValueError, match="prompts"):
        tiny_clipscore(_images(2), ["only one"])
    with pytest.raises(ValueError, match="images"):
        tiny_clipscore(torch.rand(2, 4, 8, 8), ["a", "b"])


@pytest.mark.parametrize("options, match", [
    ({"model_name": "No-Such-CLIP"}, "reward.options.model_name: unknown open_clip model 'No-Such-CLIP'"),
    ({"pretrained": "not-a-tag-or-file"}, "reward.options: cannot create open_clip model .*pretrained=/path"),
    ({"batch_size": 0}, "reward.options.batch_size"),
    ({"scale100_clamp": "yes"}, "reward.options.scale100_clamp"),
    ({"precision": "fp8"}, "reward.options.precision: expected one of"),
])
def test_clipscore_config_errors_are_one_line(options, match):
    options = {"model_name": register_tiny_clip(), "pretrained": None, **options}
    with pytest.raises(ValueError, match=match) as info:
        build_reward("clipscore", options)
    assert "\n" not in str(info.value)


def test_openai_tags_get_the_quickgelu_model_they_were_trained_with():
    """open_clip >= 3 builds 'ViT-L-14' with GELU even for OpenAI's QuickGELU weights."""
    import open_clip

    from b2fast.rewards.clipscore import clip_name_for_tag

    # open_clip 2.x loads 'openai' tags with QuickGELU itself; 3.x needs the -quickgelu name
    expected = "ViT-L-14-quickgelu" if int(open_clip.__version__.split(".")[0]) >= 3 else "ViT-L-14"
    assert clip_name_for_tag("ViT-L-14", "openai") == expected
    assert clip_name_for_tag("ViT-H-14", "laion2b_s32b_b79k") == "ViT-H-14"
    assert clip_name_for_tag("ViT-L-14-quickgelu", "openai") == "ViT-L-14-quickgelu"
    assert clip_name_for_tag("ViT-L-14", None) == "ViT-L-14"


def test_vendi_uses_the_clip_rewards_image_embeddings(tiny_clipscore):
    """With a CLIP reward, diversity features are its unit-norm image embeddings (semantic
    diversity); copies of one image count as one distinct image."""
    from b2fast.eval.evaluator import diversity_features, mean_vendi

    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    features = diversity_features(tiny_clipscore, images)
    assert torch.allclose(features, tiny_clipscore.image_embeddings(images).float())
    copies = diversity_features(tiny_clipscore, images[:1].repeat(4, 1, 1, 1))
    assert mean_vendi(copies, 4) == pytest.approx(1.0, abs=1e-6)
    jpeg = build_reward("jpeg_compressibility")
    assert diversity_features(jpeg, images).shape == (4, 3 * 64)  # no embeddings: pooled pixels
