"""The ``toy_align`` reward: exact prompt alignment of toy-world images, from the detector.

Registered with :func:`b2fast.rewards.base.register_reward` when this module is imported
(``import b2fast.rewards`` does so), and built with ``build_reward("toy_align", options)``.
"""
from __future__ import annotations

from typing import Sequence

import torch

from b2fast.rewards.base import Reward, register_reward
from b2fast.toy.detector import score_batch


@register_reward("toy_align")
def make_toy_align_reward(device: str | torch.device = "cpu", binary: bool = False) -> Reward:
    """``reward(images, prompts)`` → (N,) float32 CPU scores for (N, 3, H, W) images in [0, 1].

    ``binary=False`` scores the fraction of the prompt's constraints met (0, 1/2, 1 for
    attribute prompts; quarters and fifths for two-object and spatial), a dense signal for
    RL; ``binary=True`` scores 1 only when all are met, the success rate used for evaluation.
    The detector runs on ``device``.
    """
    if not isinstance(binary, bool):
        raise ValueError(f"binary: expected true or false, got {binary!r}")
    device = torch.device(device)

    def reward(images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        scores, success = score_batch(images.to(device), prompts)
        return success.float() if binary else scores

    return reward
