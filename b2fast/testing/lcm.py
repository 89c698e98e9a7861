"""A latent-consistency-shaped copy of a random-weight test model, built offline.

An LCM differs from its DDIM model in two places: the UNet has a guidance embedding
(``time_cond_proj_dim``, w as an input instead of a CFG batch) and the scheduler is diffusers'
``LCMScheduler``. Tests and benchmarks of the LCM policy need those shapes, not trained weights,
so :func:`copy_as_lcm` adds a random guidance embedding to a saved model and keeps every other
weight.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch


def copy_as_lcm(source: str | os.PathLike, folder: str | os.PathLike, cond_dim: int, seed: int = 0) -> Path:
    """Copy the diffusers folder ``source`` to ``folder`` as an LCM: its UNet gains a random
    guidance embedding of width ``cond_dim`` (the rest loaded unchanged, in the stored dtype) and
    its scheduler becomes an ``LCMScheduler`` of the same ᾱ (clip_sample off)."""
    from diffusers import DDIMScheduler, LCMScheduler, UNet2DConditionModel

    source, folder = Path(source), Path(folder)
    shutil.copytree(source, folder, ignore=shutil.ignore_patterns("unet", "scheduler"))
    unet = UNet2DConditionModel.from_pretrained(source / "unet")
    dtype = next(unet.parameters()).dtype
    previous = torch.get_default_dtype()
    try:
        torch.manual_seed(seed)
        torch.set_default_dtype(dtype)
        lcm = UNet2DConditionModel.from_config({**unet.config, "time_cond_proj_dim": cond_dim})
    finally:
        torch.set_default_dtype(previous)
    missing, unexpected = lcm.load_state_dict(unet.state_dict(), strict=False)
    if unexpected or not all("cond_proj" in k for k in missing):
        raise ValueError(f"{source}: its UNet does not take a guidance embedding ({missing}, {unexpected})")
    lcm.save_pretrained(folder / "unet")
    config = DDIMScheduler.load_config(source / "scheduler")
    LCMScheduler.from_config({**config, "clip_sample": False}).save_pretrained(folder / "scheduler")
    return folder
