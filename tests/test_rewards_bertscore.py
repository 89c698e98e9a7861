"""BERTScore reward on a tiny random BLIP captioner and a tiny random BERT scorer, loaded from folders."""
import subprocess
import sys

import numpy as np
import pytest
import torch

from b2fast.rewards import available_rewards, build_reward, score_images
from b2fast.testing.tiny_captioner import save_tiny_bert, save_tiny_blip

PROMPTS = ["a cat riding a bike", "a red apple", "a dog", "a cat riding a bike", "a cup on a table"]


@pytest.fixture(scope="module")
def model_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("bertscore-models")
    return str(save_tiny_blip(root / "blip", seed=0)), str(save_tiny_bert(root / "bert", seed=0))


def _options(model_folders, **extra):
    captioner, scorer = model_folders
    return {"captioner": captioner, "scorer": scorer, "num_layers": 2, "batch_size": 3,
            "max_new_tokens": 12, **extra}


@pytest.fixture(scope="module")
def reward(model_folders):
    return build_reward("bertscore", _options(model_folders))


def _images(n, h=45, w=61, seed=0):
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def test_bertscore_is_registered_without_importing_transformers_or_torchmetrics():
    assert "bertscore" in available_rewards()
    code = ("import sys, b2fast.rewards; "
            "assert not {'transformers', 'torchmetrics'} & set(sys.modules), 'imported at registration'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_bertscore_shape_dtype_finite_and_captions_recorded(reward):
    scores = score_images(reward, _images(5), PROMPTS)
    assert scores.shape == (5,) and scores.dtype == torch.float32
    assert torch.isfinite(scores).all() and (scores > 0).all() and (scores <= 1 + 1e-6).all()
    captions = reward.last_captions
    assert len(captions) == 5 and all(isinstance(c, str) and c for c in captions)
    torch.testing.assert_close(scores, reward.score_captions(captions, PROMPTS), atol=1e-6, rtol=0)
    assert torch.equal(scores, score_images(reward, _images(5), PROMPTS))  # deterministic, greedy


def test_bertscore_is_batch_size_invariant(reward):
    images = _images(5, seed=1)
    batch = reward(images, PROMPTS)  # chunks of 3 images/texts inside
    captions = list(reward.last_captions)
    assert len(set(captions)) > 1  # the images get different captions, so chunking is exercised
    single = torch.cat([reward(images[i:i + 1], PROMPTS[i:i + 1]) for i in range(5)])
    torch.testing.assert_close(batch, single, atol=1e-5, rtol=0)
    assert reward.last_captions == captions[-1:]


def test_bertscore_f1_of_a_prompt_with_itself_is_one(reward):
    prompts = PROMPTS + ["zebra!", "a photo of a green cup"]
    torch.testing.assert_close(reward.score_captions(prompts, prompts), torch.ones(len(prompts)),
                               atol=1e-5, rtol=0)
    other = reward.score_captions(["a dog", "a cup on a table"], ["a red apple", "a cat riding a bike"])
    assert (other < 1 - 1e-3).all()


def test_bertscore_empty_caption_scores_zero_not_nan(reward):
    scores = reward.score_captions(["", "a dog"], ["a dog", ""])
    assert torch.equal(scores, torch.zeros(2))
    assert reward.score_captions([], []).shape == (0,)


@pytest.mark.parametrize("h, w", [(45, 61), (61, 45), (20, 20), (512, 512)])
def test_bertscore_preprocess_matches_blip_processor(reward, h, w):
    """On-device resize/normalise vs ``BlipImageProcessor`` on the same uint8 images (PIL input)."""
    from PIL import Image

    images = (_images(2, h, w, seed=2) * 255).round().to(torch.uint8)
    pil = [Image.fromarray(np.ascontiguousarray(im.permute(1, 2, 0).numpy())) for im in images]
    expected = reward.processor.image_processor(images=pil, return_tensors="pt")["pixel_values"]
    ours = reward.preprocess(images.float() / 255)
    assert ours.shape == expected.shape == (2, 3, 32, 32)
    pixel_error = (ours - expected).abs() * reward.std.cpu() * 255  # back to uint8 pixel units
    assert pixel_error.max() <= 1.5  # the processor rounds to uint8; noise images are the worst case


def test_bertscore_rejects_bad_inputs(reward):
    with pytest.raises(ValueError, match="prompts"):
        reward(_images(2), ["only one"])
    with pytest.raises(ValueError, match="images"):
        reward(torch.rand(2, 4, 8, 8), ["a", "b"])


@pytest.mark.parametrize("field", ["captioner", "scorer"])
def test_bertscore_missing_model_folder_is_one_line(model_folders, tmp_path, field):
    missing = str(tmp_path / f"no-such-{field}")
    with pytest.raises(ValueError, match=f"reward bertscore: {field} folder .* does not exist; pass a local "
                                         f"folder, e.g. --reward.options '{{{field}: /path/to/") as info:
        build_reward("bertscore", _options(model_folders, **{field: missing}))
    assert "\n" not in str(info.value)


def test_bertscore_missing_hub_model_offline_is_one_line(model_folders, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="reward bertscore: captioner 'b2fast-nobody/no-such-blip' not "
                                         "found locally and the hub is offline") as info:
        build_reward("bertscore", _options(model_folders, captioner="b2fast-nobody/no-such-blip"))
    assert "\n" not in str(info.value)


def test_bertscore_missing_torchmetrics_is_one_line(model_folders, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchmetrics", None)
    monkeypatch.setitem(sys.modules, "torchmetrics.text", None)
    with pytest.raises(ValueError, match="reward bertscore: needs the torchmetrics package") as info:
        build_reward("bertscore", _options(model_folders))
    assert "\n" not in str(info.value)


def test_bertscore_rejects_non_blip_captioners(model_folders, tmp_path):
    from transformers import LlavaConfig

    LlavaConfig().save_pretrained(tmp_path / "llava")
    with pytest.raises(ValueError, match="'llava' model .* LLaVA is not supported yet"):
        build_reward("bertscore", _options(model_folders, captioner=str(tmp_path / "llava")))
    with pytest.raises(ValueError, match="reward.options.captioner: .* is a 'bert' model"):
        build_reward("bertscore", _options(model_folders, captioner=model_folders[1]))


@pytest.mark.parametrize("options, match", [
    ({"num_layers": 4}, "reward.options.num_layers: 4 > the 3 layers"),
    ({"num_layers": 0}, "reward.options.num_layers"),
    ({"batch_size": 0}, "reward.options.batch_size"),
    ({"max_new_tokens": 2.5}, "reward.options.max_new_tokens"),
    ({"idf": "no"}, "reward.options.idf"),
    ({"scorer": ""}, "reward.options.scorer"),
])
def test_bertscore_config_errors_are_one_line(model_folders, options, match):
    with pytest.raises(ValueError, match=match) as info:
        build_reward("bertscore", _options(model_folders, **options))
    assert "\n" not in str(info.value)


def test_bertscore_idf_and_last_layer_options(model_folders):
    reward = build_reward("bertscore", _options(model_folders, idf=True, num_layers=None))
    scores = reward(_images(3, seed=3), PROMPTS[:3])
    assert scores.shape == (3,) and torch.isfinite(scores).all()
    torch.testing.assert_close(reward.score_captions(PROMPTS, PROMPTS), torch.ones(5), atol=1e-5, rtol=0)
    # each option changes the scores of the same caption pairs (were one ignored, they would not)
    captions, references = PROMPTS[:4], PROMPTS[1:]
    plain, idf_only, all_layers = (build_reward("bertscore", _options(model_folders, **extra)).score_captions(
        captions, references) for extra in ({}, {"idf": True}, {"num_layers": None}))
    assert not torch.allclose(plain, idf_only) and not torch.allclose(plain, all_layers)
