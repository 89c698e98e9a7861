"""JPEG (in)compressibility rewards, as in DDPO (Black et al., 2023).

The reward is the size of the image saved as JPEG, in kB (1 kB = 1000 bytes, as DDPO counts):
``jpeg_compressibility`` = −size (prefers flat, simple images), ``jpeg_incompressibility`` =
+size (prefers detailed, noisy images). They need no model and no weights, so they are the
cheapest end-to-end check of the RL loop.
"""
from __future__ import annotations

import io
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from b2fast.rewards.base import register_reward, to_uint8

DEFAULT_QUALITY = 95  # DDPO's setting; PIL advises against quality above 95


def _check_quality(quality: object) -> int:
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
        raise ValueError(f"reward.options.quality: expected an integer in [1, 100], got {quality!r}")
    return quality


def jpeg_sizes_kb(images: torch.Tensor, quality: int = DEFAULT_QUALITY) -> torch.Tensor:
    """JPEG sizes in kB of float images (N, 3, H, W) in [0, 1], as a float32 CPU tensor (N,).

    Images are rounded to uint8 first, exactly as they would be written to disk as PNG/JPEG.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images: expected shape (N, 3, H, W), got {tuple(images.shape)}")
    pixels = to_uint8(images).permute(0, 2, 3, 1).numpy()  # (N, 3, H, W) -> (N, H, W, 3)
    sizes = []
    for array in pixels:
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000)
    return torch.tensor(sizes, dtype=torch.float32)


class JpegSizeReward:
    """``sign`` × JPEG size in kB; ``sign`` = −1 rewards compressible images, +1 incompressible."""

    def __init__(self, sign: float, quality: int = DEFAULT_QUALITY):
        self.sign = sign
        self.quality = _check_quality(quality)

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return self.sign * jpeg_sizes_kb(images, self.quality)


@register_reward("jpeg_compressibility")
def jpeg_compressibility(device: str | torch.device = "cpu", quality: int = DEFAULT_QUALITY) -> JpegSizeReward:
    """−JPEG size in kB (runs on the CPU whatever ``device`` is: JPEG encoding is PIL's)."""
    return JpegSizeReward(-1.0, quality)


@register_reward("jpeg_incompressibility")
def jpeg_incompressibility(device: str | torch.device = "cpu", quality: int = DEFAULT_QUALITY) -> JpegSizeReward:
    """+JPEG size in kB (runs on the CPU whatever ``device`` is: JPEG encoding is PIL's)."""
    return JpegSizeReward(1.0, quality)
