"""Policy objectives on a batch of kept (trajectory, interval step) samples.

``LOSSES`` maps a config name to a per-sample loss function. Objectives added later (a
DPO-style loss on best/worst branch pairs as in D3PO, a DRO-style loss on single samples)
register here and reuse sampling and selection unchanged.
"""
from __future__ import annotations

from typing import Callable

from b2fast.core.objectives.ppo import advantage_weights, ppo_clip_loss

LOSSES: dict[str, Callable] = {"ppo_clip": ppo_clip_loss}


def get_loss(name: str) -> Callable:
    """The objective registered under ``name``; the error lists the available ones."""
    if name not in LOSSES:
        raise ValueError(f"unknown objective {name!r}; available: {sorted(LOSSES)}")
    return LOSSES[name]


__all__ = ["LOSSES", "advantage_weights", "get_loss", "ppo_clip_loss"]
