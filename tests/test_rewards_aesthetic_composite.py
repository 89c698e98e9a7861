"""Aesthetic reward (tiny random CLIP + random LAION-shaped head) and the composite reward."""
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from b2fast.rewards import build_reward, score_images
from b2fast.rewards.aesthetic import HEAD_FILE, aesthetic_head, load_aesthetic_head
from b2fast.testing.tiny_clip import TINY_CLIP_CONFIG, register_tiny_clip

EMBED_DIM = TINY_CLIP_CONFIG["embed_dim"]
PROMPTS = ["a cat", "a red apple", "a dog", "a cat", "a cup on a table"]


class LaionMLP(torch.nn.Module):
    """The shape of the LAION predictor module: its state dict keys read ``layers.N.weight``."""

    def __init__(self, input_dim):
        super().__init__()
        self.layers = aesthetic_head(input_dim)


def _images(n, h=45, w=61, seed=0):
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def head_state():
    torch.manual_seed(1)
    return LaionMLP(EMBED_DIM).state_dict()  # keys "layers.0.weight", ...


@pytest.fixture(scope="module")
def head_path(tmp_path_factory, head_state):
    path = tmp_path_factory.mktemp("head") / HEAD_FILE
    torch.save(head_state, path)
    return str(path)


def _build_aesthetic(head_path, batch_size=3, seed=0):
    torch.manual_seed(seed)  # the tiny CLIP's random weights
    return build_reward("aesthetic", {"head_path": head_path, "model_name": register_tiny_clip(),
                                      "pretrained": None, "batch_size": batch_size})


@pytest.fixture(scope="module")
def tiny_aesthetic(head_path):
    return _build_aesthetic(head_path)


# ---- aesthetic ---------------------------------------------------------------------------------

def test_aesthetic_shape_dtype_and_prompts_ignored(tiny_aesthetic):
    images = _images(5)
    scores = score_images(tiny_aesthetic, images, PROMPTS)
    assert scores.shape == (5,) and scores.dtype == torch.float32 and scores.std() > 0
    assert torch.equal(scores, tiny_aesthetic(images, ["other"] * 5))
    assert tiny_aesthetic(_images(0), []).shape == (0,)


def test_aesthetic_is_head_of_normalised_clip_embedding(tiny_aesthetic, head_state):
    images = _images(4, seed=1)
    clip = tiny_aesthetic.clip
    with torch.no_grad():
        embedding = F.normalize(clip.model.encode_image(clip.preprocess(images)), dim=-1)
        head = aesthetic_head(EMBED_DIM).eval()
        head.load_state_dict({k.removeprefix("layers."): v for k, v in head_state.items()})
        expected = head(embedding).squeeze(-1)
    torch.testing.assert_close(tiny_aesthetic(images, [""] * 4), expected, atol=1e-5, rtol=1e-5)


def test_aesthetic_is_batch_size_invariant(tiny_aesthetic):
    images = _images(5, seed=2)
    batch = tiny_aesthetic(images, PROMPTS)  # chunks of 3 images inside
    single = torch.cat([tiny_aesthetic(images[i:i + 1], PROMPTS[i:i + 1]) for i in range(5)])
    torch.testing.assert_close(batch, single, atol=1e-5, rtol=0)


def test_aesthetic_diversity_features_are_its_clip_embeddings(tiny_aesthetic):
    """Evaluation measures diversity on the embeddings the head reads (cosine distance)."""
    from b2fast.eval.evaluator import diversity_features, embedding_reward

    images = _images(3, seed=8)
    assert embedding_reward({"jpeg": build_reward("jpeg_compressibility"), "aesthetic": tiny_aesthetic}) \
        is tiny_aesthetic
    with torch.no_grad():
        torch.testing.assert_close(diversity_features(tiny_aesthetic, images),
                                   tiny_aesthetic.clip.image_embeddings(images), atol=0, rtol=0)


@pytest.mark.parametrize("fmt", ["prefixed.pth", "bare.pth", "prefixed.safetensors", "lightning.ckpt"])
def test_head_loads_with_or_without_layers_prefix(tmp_path, head_state, fmt):
    bare = {k.removeprefix("layers."): v for k, v in head_state.items()}
    path = tmp_path / f"head-{fmt}"
    if fmt == "prefixed.pth":
        torch.save(head_state, path)
    elif fmt == "bare.pth":
        torch.save(bare, path)
    elif fmt == "prefixed.safetensors":
        save_file(dict(head_state), str(path))
    else:
        torch.save({"state_dict": head_state, "epoch": 3}, path)
    head = load_aesthetic_head(path)
    assert not head.training and not any(p.requires_grad for p in head.parameters())
    for key, value in head.state_dict().items():
        assert torch.equal(value, bare[key])


def test_aesthetic_scores_do_not_depend_on_head_file_format(tmp_path, head_state, head_path):
    bare_path = tmp_path / "bare.pth"
    torch.save({k.removeprefix("layers."): v for k, v in head_state.items()}, bare_path)
    images = _images(3, seed=3)
    a = _build_aesthetic(head_path)(images, [""] * 3)
    b = _build_aesthetic(str(bare_path))(images, [""] * 3)
    assert torch.equal(a, b)


def _one_line_error(name, options, match):
    with pytest.raises(ValueError, match=match) as info:
        build_reward(name, options)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_aesthetic_missing_head_fails_at_build_with_download_hint(tmp_path):
    # the model name is wrong too: the head is checked first, before any CLIP is created
    message = _one_line_error("aesthetic", {"model_name": "No-Such-CLIP"},
                              "reward.options.head_path: the aesthetic reward needs its MLP head")
    assert HEAD_FILE in message and "--reward.options" in message
    missing = str(tmp_path / "nowhere.pth")
    _one_line_error("aesthetic", {"head_path": missing},
                    f"head_path: aesthetic head '{missing}' not found; download")


def test_aesthetic_rejects_bad_head_files(tmp_path, head_state):
    wrong_keys = tmp_path / "wrong_keys.pth"
    torch.save({"fc.weight": torch.zeros(1, EMBED_DIM)}, wrong_keys)
    _one_line_error("aesthetic", {"head_path": str(wrong_keys)}, "is not an aesthetic-predictor head")
    wrong_width = tmp_path / "wrong_width.pth"
    state = dict(head_state, **{"layers.2.weight": torch.zeros(64, 1024)})
    torch.save(state, wrong_width)
    _one_line_error("aesthetic", {"head_path": str(wrong_width)},
                    r"has layers.2.weight of shape \(64, 1024\), the predictor's is \(128, 1024\)")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    _one_line_error("aesthetic", {"head_path": str(garbage)}, "head_path: cannot read")


def test_aesthetic_rejects_head_of_other_width(tmp_path):
    path = tmp_path / "vit-h-head.pth"
    torch.save(LaionMLP(1024).state_dict(), path)
    options = {"head_path": str(path), "model_name": register_tiny_clip(), "pretrained": None}
    _one_line_error("aesthetic", options,
                    "takes 1024-d embeddings but 'b2fast-tiny-clip' makes 32-d ones")


def test_aesthetic_rejects_bad_batch_size(head_path):
    _one_line_error("aesthetic", {"head_path": head_path, "batch_size": 0}, "reward.options.batch_size")


def test_importing_rewards_registers_new_rewards_without_open_clip():
    code = ("import sys, b2fast.rewards as r; assert {'aesthetic', 'composite'} <= set(r.available_rewards()); "
            "assert 'open_clip' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- composite ---------------------------------------------------------------------------------

@pytest.fixture()
def user_rewards(tmp_path, monkeypatch):
    (tmp_path / "composite_user_rewards.py").write_text(textwrap.dedent("""
        import torch
        def brightness(images, prompts):
            return images.mean(dim=(1, 2, 3))
        def nan_for_second(images, prompts):
            scores = torch.ones(images.shape[0])
            scores[1] = float("nan")
            return scores
        def inf_for_first(images, prompts):
            scores = torch.zeros(images.shape[0])
            scores[0] = float("inf")
            return scores
        def too_few(images, prompts):
            return torch.zeros(images.shape[0] - 1)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "composite_user_rewards"


def test_composite_is_weighted_sum_of_terms(user_rewards):
    images, prompts = _images(4, 40, 40, seed=4), ["a"] * 4
    reward = build_reward("composite", {"terms": [
        {"name": "jpeg_compressibility", "weight": 2.0},
        {"name": "jpeg_incompressibility", "weight": 0.5, "options": {"quality": 10}},
        {"name": f"{user_rewards}:brightness", "weight": -3}]})
    expected = (2.0 * build_reward("jpeg_compressibility")(images, prompts)
                + 0.5 * build_reward("jpeg_incompressibility", {"quality": 10})(images, prompts)
                - 3 * images.mean(dim=(1, 2, 3)))
    scores = score_images(reward, images, prompts)
    assert scores.shape == (4,) and scores.dtype == torch.float32
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-6)
    assert len(reward.term_scores(images, prompts)) == 3


def test_composite_accepts_name_to_weight_mapping(user_rewards):
    images, prompts = _images(3, 32, 32, seed=5), ["a"] * 3
    terms = {"jpeg_incompressibility": 1, f"{user_rewards}:brightness": 10.0}
    reward = build_reward("composite", {"terms": terms})
    expected = build_reward("jpeg_incompressibility")(images, prompts) + 10 * images.mean(dim=(1, 2, 3))
    torch.testing.assert_close(reward(images, prompts), expected, atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("term, bad", [("nan_for_second", 1), ("inf_for_first", 0)])
@pytest.mark.parametrize("weight", [0.5, 0.0])
def test_composite_non_finite_term_makes_that_sample_nan(user_rewards, term, bad, weight):
    images, prompts = _images(3, 32, 32, seed=6), ["a"] * 3
    reward = build_reward("composite", {"terms": [{"name": "jpeg_incompressibility"},
                                                  {"name": f"{user_rewards}:{term}", "weight": weight}]})
    with pytest.warns(RuntimeWarning, match="1 non-finite"):
        scores = score_images(reward, images, prompts)
    assert scores[bad].isnan() and torch.isfinite(scores[torch.arange(3) != bad]).all()


def test_composite_checks_term_score_count(user_rewards):
    reward = build_reward("composite", {"terms": [{"name": "jpeg_compressibility"},
                                                  {"name": f"{user_rewards}:too_few"}]})
    match = r"terms\[1\] \(composite_user_rewards:too_few\): returned 2 scores for 3"
    with pytest.raises(ValueError, match=match):
        reward(_images(3, 16, 16), ["a"] * 3)


def test_composite_of_clip_rewards_sums_them(head_path):
    images, prompts = _images(3, seed=7), PROMPTS[:3]
    clip_options = {"model_name": register_tiny_clip(), "pretrained": None}
    torch.manual_seed(0)
    reward = build_reward("composite", {"terms": [
        {"name": "clipscore", "weight": 1.0, "options": clip_options},
        {"name": "aesthetic", "weight": 0.1, "options": {"head_path": head_path, **clip_options}}]})
    torch.manual_seed(0)
    clip = build_reward("clipscore", clip_options)
    aesthetic = build_reward("aesthetic", {"head_path": head_path, **clip_options})
    torch.testing.assert_close(reward(images, prompts), clip(images, prompts) + 0.1 * aesthetic(images, prompts),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("options, match", [
    ({}, r"reward.options.terms: expected a non-empty list"),
    ({"terms": []}, r"reward.options.terms: .*got an empty list"),
    ({"terms": "clipscore"}, r"reward.options.terms: expected"),
    ({"terms": ["clipscore"]}, r"reward.options.terms\[0\]: expected a mapping"),
    ({"terms": [{"weight": 1.0}]}, r"reward.options.terms\[0\].name: expected a reward name"),
    ({"terms": [{"name": "jpeg_compressibility", "wieght": 1}]}, r"terms\[0\]: unknown key\(s\) \['wieght'\]"),
    ({"terms": [{"name": "jpeg_compressibility", "weight": "1"}]}, r"terms\[0\].weight: .*'jpeg_compressibility'"),
    ({"terms": {"jpeg_compressibility": True}}, r"terms.jpeg_compressibility.weight: expected a finite number"),
    ({"terms": [{"name": "jpeg_compressibility", "weight": float("inf")}]}, r"terms\[0\].weight"),
    ({"terms": [{"name": "jpeg_compressibility", "options": [1]}]}, r"terms\[0\].options: expected a mapping"),
    ({"terms": [{"name": "jpeg_compressibility"}, {"name": "no_such_reward"}]},
     r"reward.options.terms\[1\].name \(no_such_reward\): unknown reward 'no_such_reward'"),
    ({"terms": [{"name": "jpeg_compressibility", "options": {"quality": 0}}]},
     r"reward.options.terms\[0\].options.quality \(jpeg_compressibility\): expected an integer"),
    ({"terms": [{"name": "jpeg_compressibility", "options": {"nope": 1}}]},
     r"reward.options.terms\[0\].options \(jpeg_compressibility\): invalid options"),
    ({"terms": [{"name": "no_such_module_b2:fn"}]},
     r"reward.options.terms\[0\].name \(no_such_module_b2:fn\): cannot import"),
    ({"terms": [{"name": "jpeg_compressibility"}, {"name": "aesthetic", "weight": 0.1}]},
     r"reward.options.terms\[1\].options.head_path \(aesthetic\): the aesthetic reward needs its MLP head"),
    ({"terms": [{"name": "jpeg_compressibility"}], "extra": 1}, r"reward.options: invalid options"),
])
def test_composite_rejects_bad_options_in_one_line(options, match):
    _one_line_error("composite", options, match)


def test_composite_module_function_term_takes_no_options(user_rewards):
    _one_line_error("composite", {"terms": [{"name": f"{user_rewards}:brightness", "options": {"k": 1}}]},
                    r"reward.options.terms\[0\].options \(composite_user_rewards:brightness\): a 'module:function'")
