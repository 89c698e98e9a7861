"""Policy objectives, chosen by ``train.objective``: a registry that :mod:`b2fast.core.update`
reads, so a new objective plugs in here with no change to the update loop.

An :class:`Objective` says three things (docs/algorithm.md, "Objectives"):

* ``items(selection, tcfg)``: what it trains on, as :class:`Items`: I items of m stage-table rows
  each: one kept trajectory (m = 1: ``ppo``, ``dro_unpaired``) or a group's (winner, loser) pair
  (m = 2: ``d3po``, ``dro``, ``diffusion_dpo``), with one value per item (PPO's advantage weight,
  the unpaired sign, or 1). Every item is trained at each trained interval position: the unit
  the update batches, accumulates and all-reduces is an (item, position) pair.
* ``needs(tcfg)``: the terms its loss reads, each an (U, m) tensor per unit and member:
  ``log_prob`` (ℓ_θ, with gradient), ``old_log_prob`` (ℓ at sampling time), ``ref_log_prob``
  (ℓ of the base model, LoRA off), ``error`` (the denoising error M_θ of the final latent at the
  position's timestep, with gradient) and ``ref_error`` (M of the base model, same noise).
  Reference terms are computed once per stage, without gradients.
* ``loss(terms, values, tcfg)``: the per-unit loss (no reduction: the update weights and sums
  it across micro-batches) and detached statistics, of which those named in ``stats`` are
  averaged into the stage's metrics. A statistic is a scalar (a mean over the micro-batch) or
  a per-unit tensor whose NaN entries are left out of the mean.

Register one with :func:`register_objective`; ``b2fast.config.OBJECTIVES`` lists the built-in
names too (the config imports no torch), and a test keeps the two lists equal.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from b2fast.core.objectives.d3po import d3po_loss
from b2fast.core.objectives.denoising import (diffusion_dpo_loss, dro_loss, dro_unpaired_loss,
                                              guard_losers)
from b2fast.core.objectives.ppo import advantage_weights, ppo_clip_loss
from b2fast.core.selection import Selection

Terms = dict[str, torch.Tensor]
LossFn = Callable[[Terms, torch.Tensor, object], tuple[torch.Tensor, dict[str, torch.Tensor]]]
TERMS = ("log_prob", "old_log_prob", "ref_log_prob", "error", "ref_error")


@dataclass
class Items:
    """What one stage trains on: ``rows`` (I, m) int64 stage-table rows, ``values`` (I,) float32."""
    rows: torch.Tensor
    values: torch.Tensor

    def __len__(self) -> int:
        return self.rows.shape[0]


@dataclass(frozen=True)
class Objective:
    name: str
    items: Callable[[Selection, object], Items]
    needs: Callable[[object], frozenset[str]]
    loss: LossFn
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


# -- items ------------------------------------------------------------------------------------------
def kept_items(selection: Selection, tcfg) -> Items:
    """Each kept trajectory, valued by its advantage weight (PPO)."""
    z = selection.advantages.float()
    return Items(selection.indices[:, None], advantage_weights(z, tcfg.adv_clip, tcfg.pos_weight, tcfg.neg_weight))


def signed_items(selection: Selection, tcfg) -> Items:
    """Each kept trajectory, valued +1 above its prompt's mean, −1 below (0 for a zeroed advantage)."""
    return Items(selection.indices[:, None], torch.sign(selection.advantages.float()))


def pair_items(selection: Selection, tcfg) -> Items:
    """Each group's (winner, loser) pair."""
    pairs = selection.pairs
    return Items(pairs, torch.ones(pairs.shape[0], device=pairs.device))


# -- losses on the terms ----------------------------------------------------------------------------
def _ppo(terms: Terms, values: torch.Tensor, tcfg):
    return ppo_clip_loss(terms["log_prob"][:, 0], terms["old_log_prob"][:, 0], values, tcfg.clip_range)


def _d3po(terms: Terms, values: torch.Tensor, tcfg):
    lp, ref = terms["log_prob"], terms["ref_log_prob"]
    return d3po_loss(lp[:, 0], lp[:, 1], ref[:, 0], ref[:, 1], tcfg.d3po_beta, tcfg.d3po_clip)


def _guarded(terms: Terms, losers: torch.Tensor, tcfg) -> tuple[torch.Tensor, torch.Tensor]:
    """``terms['error'][:, -1]`` with the loser guard applied where ``losers`` (bool per unit)."""
    error = terms["error"][:, -1]
    if tcfg.loser_guard <= 0:
        return error, torch.zeros_like(losers)
    guarded, stop = guard_losers(error, terms["ref_error"][:, -1], tcfg.loser_guard)
    return torch.where(losers, guarded, error), stop & losers


def _dro(terms: Terms, values: torch.Tensor, tcfg):
    loser, stop = _guarded(terms, torch.ones_like(values, dtype=torch.bool), tcfg)
    loss, stats = dro_loss(terms["error"][:, 0], loser)
    return loss, {**stats, "guarded": stop.float().mean()}


def _dro_unpaired(terms: Terms, values: torch.Tensor, tcfg):
    error, stop = _guarded(terms, values < 0, tcfg)
    loss, stats = dro_unpaired_loss(error, values)
    return loss, {**stats, "guarded": torch.where(values < 0, stop.float(), float("nan"))}


def _dpo(terms: Terms, values: torch.Tensor, tcfg):
    e, ref = terms["error"], terms["ref_error"]
    return diffusion_dpo_loss(e[:, 0], e[:, 1], ref[:, 0], ref[:, 1], tcfg.dpo_beta)


def _always(*names: str):
    return lambda tcfg: frozenset(names)


def _guard_needs(tcfg) -> frozenset[str]:
    return frozenset({"error", "ref_error"} if tcfg.loser_guard > 0 else {"error"})


register_objective(Objective("ppo", kept_items, _always("log_prob", "old_log_prob"), _ppo, ("clipfrac", "approx_kl"),
                             "DDPO-style PPO-clip on the kept branches' interval steps (the paper's)"))
register_objective(Objective("d3po", pair_items, _always("log_prob", "ref_log_prob"), _d3po,
                             ("accuracy", "clipfrac", "logit"),
                             "D3PO: -log sigmoid(beta·[log rho_w - log rho_l]) per window step of each pair"))
register_objective(Objective("dro", pair_items, _guard_needs, _dro, ("error_winner", "error_loser", "guarded"),
                             "DSO's DRO: denoising error of the winner minus the loser's"))
register_objective(Objective("dro_unpaired", signed_items, _guard_needs, _dro_unpaired,
                             ("error_winner", "error_loser", "guarded"),
                             "DRO without pairs: +error of kept positives, -error of kept negatives"))
register_objective(Objective("diffusion_dpo", pair_items, _always("error", "ref_error"), _dpo,
                             ("accuracy", "logit", "error_winner", "error_loser"),
                             "Diffusion-DPO on the pairs' denoising errors against the base model's"))


__all__ = ["OBJECTIVES", "TERMS", "Items", "Objective", "advantage_weights", "get_objective", "ppo_clip_loss",
           "register_objective"]
