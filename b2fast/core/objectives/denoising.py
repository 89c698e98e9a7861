"""Denoising-loss objectives on the branches' final latents: DRO (DSO, "Aligning 3D Generators
with Simulation Feedback for Physical Soundness") and Diffusion-DPO (docs/algorithm.md, "Objectives").

They score a clean latent x by how well the model denoises it, not by a trajectory log-prob:

=============================================  =============================================
symbol                                         here
=============================================  =============================================
M_θ(x, t, e) = mean‖ε_θ(√ᾱ_t x + √(1−ᾱ_t) e) − e‖²   ``error_*`` (:meth:`Policy.denoising_error`)
DRO: L = M_θ(x_w) − M_θ(x_l)                   :func:`dro_loss`
DRO, unpaired: L = s·M_θ(x), s = ±1            :func:`dro_unpaired_loss`
DPO: L = −log σ(−(β/2)·[(M_θ^w − M_θ^l) − (M_ref^w − M_ref^l)])   :func:`diffusion_dpo_loss`
=============================================  =============================================

Winner and loser share t and have their own noises e; the reference M_ref (base model, LoRA off)
sees the same (t, e). Minimising −M_θ(x_l) has no lower bound: the model can always denoise the
loser worse. :func:`guard_losers` stops a loser's gradient once its error exceeds the
reference's by a relative margin.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _check_same_shape(name: str, *tensors: torch.Tensor) -> None:
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) != 1:
        raise ValueError(f"{name}: the error tensors must have one shape, got {sorted(shapes)}")


def guard_losers(error_l: torch.Tensor, ref_error_l: torch.Tensor, margin: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(error_l with its gradient stopped where error_l > (1 + margin)·ref_error_l, that mask).

    ``margin`` ≤ 0 turns the guard off (the mask is all False)."""
    if margin <= 0:
        return error_l, torch.zeros_like(error_l, dtype=torch.bool)
    stop = (error_l.detach() > (1.0 + margin) * ref_error_l.detach())
    return torch.where(stop, error_l.detach(), error_l), stop


def dro_loss(error_w: torch.Tensor, error_l: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair L = M_θ(x_w) − M_θ(x_l): fit the winner, unfit the loser; no reference, no β."""
    _check_same_shape("dro_loss", error_w, error_l)
    with torch.no_grad():
        stats = {"error_winner": error_w.mean(), "error_loser": error_l.mean()}
    return error_w - error_l, stats


def dro_unpaired_loss(error: torch.Tensor, sign: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-sample L = s·M_θ(x) with s = +1 for kept positives, −1 for kept negatives, so a group
    with only one side kept still counts. The stats are per sample, NaN off their side (a stage's
    mean skips the NaNs, so a micro-batch with one side only weighs nothing on the other)."""
    _check_same_shape("dro_unpaired_loss", error, sign)
    sign = sign.detach().to(error.dtype)
    with torch.no_grad():
        nan = torch.full_like(error, float("nan"))
        stats = {"error_winner": torch.where(sign > 0, error, nan), "error_loser": torch.where(sign < 0, error, nan)}
    return sign * error, stats


def diffusion_dpo_loss(error_w: torch.Tensor, error_l: torch.Tensor, ref_error_w: torch.Tensor,
                       ref_error_l: torch.Tensor, beta: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair L = −log σ(−(β/2)·[(M_θ^w − M_θ^l) − (M_ref^w − M_ref^l)]).

    Stats: ``accuracy`` = mean(implicit logit > 0) (the policy denoises the winner better, relative
    to the reference, than the loser), ``logit`` = its mean, and both errors."""
    _check_same_shape("diffusion_dpo_loss", error_w, error_l, ref_error_w, ref_error_l)
    if beta <= 0:
        raise ValueError(f"diffusion_dpo_loss: beta must be > 0, got {beta}")
    logit = -0.5 * beta * ((error_w - error_l) - (ref_error_w.detach() - ref_error_l.detach()))
    loss = -F.logsigmoid(logit)
    with torch.no_grad():
        stats = {"accuracy": (logit > 0).float().mean(), "logit": logit.mean(),
                 "error_winner": error_w.mean(), "error_loser": error_l.mean()}
    return loss, stats
