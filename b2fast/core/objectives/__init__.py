"""Policy objectives, chosen by ``train.objective``: a registry that :mod:`b2fast.core.update`
reads, so a new objective plugs in here with no change to the update loop.

An :class:`Objective` works on the kept (trajectory, interval step) samples of a stage, the
unit ``update.py`` batches, accumulates and all-reduces:

* ``advantages(z, tcfg)`` turns the selection's per-trajectory z-scores into the per-trajectory
  weights the loss sees (clamped and weighted for PPO);
* ``loss(log_prob, old_log_prob, advantages, tcfg)`` gives the per-sample loss (no reduction:
  the update weights and sums it across micro-batches) and detached per-sample-mean statistics,
  of which those named in ``stats`` are averaged into the stage's metrics (``approx_kl`` and
  ``clipfrac`` are shown in the summary line when an objective reports them).

Register one with :func:`register_objective`; ``b2fast.config.OBJECTIVES`` lists the built-in
names too (the config imports no torch), and a test keeps the two lists equal.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from b2fast.core.objectives.ppo import advantage_weights, ppo_clip_loss

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, object],
                  tuple[torch.Tensor, dict[str, torch.Tensor]]]
AdvantageFn = Callable[[torch.Tensor, object], torch.Tensor]


@dataclass(frozen=True)
class Objective:
    name: str
    loss: LossFn
    advantages: AdvantageFn
    stats: tuple[str, ...] = ()     # statistics ``loss`` returns that the metrics average
    help: str = ""


OBJECTIVES: dict[str, Objective] = {}


def register_objective(objective: Objective) -> Objective:
    """Add ``objective`` to the registry under its name (a second one with that name is an error)."""
    if objective.name in OBJECTIVES:
        raise ValueError(f"objective {objective.name!r} is already registered")
    OBJECTIVES[objective.name] = objective
    return objective


def get_objective(name: str) -> Objective:
    """The objective registered under ``name``; the error lists the available ones."""
    if name not in OBJECTIVES:
        raise ValueError(f"train.objective: unknown objective {name!r}; available: {sorted(OBJECTIVES)}")
    return OBJECTIVES[name]


def _ppo_loss(log_prob, old_log_prob, advantages, tcfg):
    return ppo_clip_loss(log_prob, old_log_prob, advantages, tcfg.clip_range)


def _ppo_advantages(z, tcfg):
    return advantage_weights(z, tcfg.adv_clip, tcfg.pos_weight, tcfg.neg_weight)


register_objective(Objective("ppo", _ppo_loss, _ppo_advantages, ("clipfrac", "approx_kl"),
                             "DDPO-style PPO-clip on the kept branches' interval steps (the paper's)"))


__all__ = ["OBJECTIVES", "Objective", "advantage_weights", "get_objective", "ppo_clip_loss",
           "register_objective"]
