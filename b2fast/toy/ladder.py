"""A ladder of toy-world rewards, from trivial to the alignment the toy world is about.

Before asking whether RL makes the toy model follow its prompts, ask how fast the policy moves
toward *any* reward: each rung must be learned within the CPU budget, or something other than
the signal (LoRA placement, step size, batch, trained steps) is what limits learning. Rungs,
easiest first (all scores in [0, 1], higher is better):

=================  ===================================================  ==================
rung               reward                                               prompts
=================  ===================================================  ==================
brightness         ``toy_brightness``: mean pixel value                 every template
colour_fill        ``toy_colour_fill``: closeness of every pixel to     attribute
                   the prompt's first colour
object_colour      ``toy_object_colour``: share of the coloured pixels  attribute
                   that have the prompt's first colour
attribute          ``toy_align``                                        attribute
two_object         ``toy_align``                                        two objects
spatial            ``toy_align``                                        spatial
=================  ===================================================  ==================

The first three ignore shapes and positions, so they need no binding at all; ``toy_align`` is
the exact alignment score of :mod:`b2fast.toy.reward`.
"""
from __future__ import annotations

from typing import Sequence

import torch

from b2fast.rewards.base import Reward, register_reward
from b2fast.toy.detector import classify_pixels
from b2fast.toy.grammar import COLOURS, parse
from b2fast.toy.world import PALETTE

RUNGS: dict[str, tuple[str, str]] = {  # rung → (reward, prompt source)
    "brightness": ("toy_brightness", "toy"),
    "colour_fill": ("toy_colour_fill", "toy_attribute"),
    "object_colour": ("toy_object_colour", "toy_attribute"),
    "attribute": ("toy_align", "toy_attribute"),
    "two_object": ("toy_align", "toy_two_object"),
    "spatial": ("toy_align", "toy_spatial"),
}


def _first_colours(prompts: Sequence[str]) -> torch.Tensor:
    """(N,) index into ``COLOURS`` of each prompt's first object's colour."""
    return torch.tensor([COLOURS.index(parse(p).objects[0].colour) for p in prompts])


@register_reward("toy_brightness")
def make_brightness_reward(device: str | torch.device = "cpu") -> Reward:
    """Mean pixel value: no prompt, no shapes; the easiest thing a policy can be pushed toward.
    (``device``, as for every reward: these run wherever the images are.)"""
    def reward(images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return images.float().clamp(0, 1).mean(dim=(1, 2, 3))
    return reward


@register_reward("toy_colour_fill")
def make_colour_fill_reward(device: str | torch.device = "cpu") -> Reward:
    """1 − mean over pixels of ‖pixel − palette colour‖² / 3: the whole canvas in the prompt's
    first colour scores 1, its opposite corner of the RGB cube 0."""
    palette = torch.tensor([PALETTE[c] for c in COLOURS])               # (6, 3)

    def reward(images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        target = palette[_first_colours(prompts)].to(images.device)     # (N, 3)
        distance = (images.float().clamp(0, 1) - target[:, :, None, None]).pow(2).sum(1)  # (N, H, W)
        return 1 - distance.mean(dim=(1, 2)) / 3
    return reward


@register_reward("toy_object_colour")
def make_object_colour_reward(device: str | torch.device = "cpu") -> Reward:
    """Share of the coloured pixels (the detector's chroma ≥ CHROMA_MIN) classified as the
    prompt's first colour; 0 for an image with no coloured pixel. Shapes do not matter."""
    def reward(images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        colours = classify_pixels(images)                                # (N, H, W), −1 background
        wanted = _first_colours(prompts).to(colours.device)[:, None, None]
        coloured = (colours >= 0).sum(dim=(1, 2)).float()
        right = (colours == wanted).sum(dim=(1, 2)).float()
        return torch.where(coloured > 0, right / coloured.clamp_min(1), torch.zeros_like(right))
    return reward
