"""The toy ladder's rewards on images whose answer is known by construction."""
import numpy as np
import pytest
import torch

from b2fast.rewards import build_reward
from b2fast.toy.ladder import RUNGS
from b2fast.toy.world import BACKGROUND, PALETTE, SceneObject, render


def _filled(colour) -> torch.Tensor:
    return torch.tensor(colour, dtype=torch.float32)[:, None, None].expand(3, 32, 32)


def test_brightness_is_the_mean_pixel_value():
    images = torch.stack([_filled((0.2, 0.4, 0.6)), _filled((1.0, 1.0, 1.0))])
    torch.testing.assert_close(build_reward("toy_brightness")(images, ["a red circle"] * 2),
                               torch.tensor([0.4, 1.0]))


def test_colour_fill_is_one_for_the_prompt_colour_and_zero_for_its_opposite():
    images = torch.stack([_filled(PALETTE["red"]), _filled(PALETTE["cyan"]), _filled((0.5, 0.0, 0.0))])
    scores = build_reward("toy_colour_fill")(images, ["a red circle", "a red square", "a red triangle"])
    torch.testing.assert_close(scores, torch.tensor([1.0, 0.0, 1 - 0.25 / 3]))


def test_object_colour_is_the_share_of_coloured_pixels_in_the_prompt_colour():
    red = torch.from_numpy(render([SceneObject("red", "circle", 16.0, 16.0, 6.0)])).float()
    two = torch.from_numpy(render([SceneObject("red", "square", 8.0, 16.0, 6.0),
                                   SceneObject("blue", "square", 24.0, 16.0, 6.0)])).float()
    blank = _filled(BACKGROUND)
    reward = build_reward("toy_object_colour")
    scores = reward(torch.stack([red, red, two, blank]),
                    ["a red circle", "a blue circle", "a red square", "a red circle"])
    assert scores[0] == 1.0 and scores[1] == 0.0 and scores[3] == 0.0
    assert scores[2] == pytest.approx(0.5, abs=0.05)  # two squares of one size, one of them red


def test_every_rung_names_a_registered_reward_and_a_prompt_set():
    from b2fast.prompts import load_prompts

    for rung, (reward, source) in RUNGS.items():
        prompts = load_prompts(source, "train")[:4]
        images = torch.from_numpy(np.random.default_rng(0).random((len(prompts), 3, 32, 32))).float()
        scores = build_reward(reward)(images, prompts)
        assert scores.shape == (len(prompts),) and torch.all((scores >= 0) & (scores <= 1)), rung
