"""Plain-PyTorch reference of the B²-DiffuRL elementwise ops: the spec every backend follows.

Notation (docs/algorithm.md, "DDIM step and log-prob": DDIM paper eq. 12 with DDPO's log-prob):

=========================  ===========================================================
symbol                     here
=========================  ===========================================================
ε̂ = ε_u + w·(ε_c − ε_u)    ``cfg_combine(eps_uncond, eps_cond, guidance_scale)``
√ᾱ_t, √(1−ᾱ_t)             ``table[i, SQRT_AB]``, ``table[i, SQRT_1M_AB]``
√ᾱ_t'                      ``table[i, SQRT_AB_PREV]``
√(1−ᾱ_t'−σ_t²)             ``table[i, DIR_COEF]``
σ_t, log σ_t               ``table[i, SIGMA]``, ``table[i, LOG_SIGMA]``
=========================  ===========================================================

The table has one row per DDIM step (built by ``b2fast.core.schedule.build_step_table``) and is
indexed by a *device* tensor of step indices, one per sample, so no op ever syncs with the
host and a batch may mix steps (training micro-batches do).

σ_t = 0 (η = 0) is a deterministic step: x_t' = μ and log p is defined as 0, so the PPO ratio
is exactly 1 and carries no gradient, instead of NaN from 0/0.
"""
from __future__ import annotations

import math

import torch

from b2fast.kernels.table import (DIR_COEF, LOG_SIGMA, SIGMA, SQRT_1M_AB, SQRT_AB,  # noqa: F401 (the layout)
                                  SQRT_AB_PREV, TABLE_COLUMNS)

HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def cfg_combine(eps_uncond: torch.Tensor | None, eps_cond: torch.Tensor,
                guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance: ε̂ = ε_u + w·(ε_c − ε_u); no guidance when ``eps_uncond`` is None."""
    if eps_uncond is None:
        return eps_cond
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


def _per_sample(table: torch.Tensor, step_index: torch.Tensor, column: int, ndim: int,
                dtype: torch.dtype) -> torch.Tensor:
    """Gather one schedule column per sample and shape it to broadcast over (C, H, W)."""
    values = table[:, column].to(dtype).index_select(0, step_index.reshape(-1))
    return values.reshape(-1, *([1] * (ndim - 1)))


def ddim_mean(eps: torch.Tensor, x_t: torch.Tensor, table: torch.Tensor,
              step_index: torch.Tensor, clip_sample_range: float | None = None) -> torch.Tensor:
    """μ(x_t, ε̂) of the DDIM posterior, computed in ``eps.dtype`` (fp32 or fp64)."""
    dtype, nd = eps.dtype, eps.ndim
    x_t = x_t.to(dtype)
    # 1. predicted x̂0 from the ε-prediction
    x0 = (x_t - _per_sample(table, step_index, SQRT_1M_AB, nd, dtype) * eps) \
        / _per_sample(table, step_index, SQRT_AB, nd, dtype)
    # 2. optional clip (schedulers with clip_sample=True; SD uses False)
    if clip_sample_range is not None:
        x0 = x0.clamp(-clip_sample_range, clip_sample_range)
    # 3. μ = √ᾱ_t'·x̂0 + √(1−ᾱ_t'−σ²)·ε̂
    return _per_sample(table, step_index, SQRT_AB_PREV, nd, dtype) * x0 \
        + _per_sample(table, step_index, DIR_COEF, nd, dtype) * eps


def gaussian_logprob(x_prev: torch.Tensor, mean: torch.Tensor, table: torch.Tensor,
                     step_index: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """log N(x_prev; μ, σ²I) reduced over all non-batch elements (mean as in DDPO, or sum).

    Returns 0 for samples whose σ is 0 (deterministic step).
    """
    dtype, nd = mean.dtype, mean.ndim
    sigma = _per_sample(table, step_index, SIGMA, nd, dtype)
    log_sigma = _per_sample(table, step_index, LOG_SIGMA, nd, dtype)
    stochastic = sigma > 0
    safe_sigma = torch.where(stochastic, sigma, torch.ones_like(sigma))
    diff = x_prev.to(dtype) - mean
    elem = -(diff * diff) / (2 * safe_sigma * safe_sigma) - log_sigma - HALF_LOG_2PI
    elem = torch.where(stochastic, elem, torch.zeros_like(elem))
    flat = elem.reshape(elem.shape[0], -1)
    return flat.mean(dim=1) if reduction == "mean" else flat.sum(dim=1)


def ddim_step_with_logprob(eps_uncond: torch.Tensor | None, eps_cond: torch.Tensor,
                           guidance_scale: float, x_t: torch.Tensor, noise: torch.Tensor,
                           table: torch.Tensor, step_index: torch.Tensor,
                           cache_dtype: torch.dtype, clip_sample_range: float | None = None,
                           reduction: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
    """One stochastic DDIM step for sampling.

    Returns ``(x_prev, log_prob)``: x_t' = μ + σ·z stored in ``cache_dtype``, and log p computed
    on exactly that stored value (after the cast), in fp32 (fp64 when the inputs are fp64).
    """
    compute = torch.float64 if eps_cond.dtype == torch.float64 else torch.float32
    eps = cfg_combine(None if eps_uncond is None else eps_uncond.to(compute),
                      eps_cond.to(compute), guidance_scale)
    mean = ddim_mean(eps, x_t, table, step_index, clip_sample_range)
    sigma = _per_sample(table, step_index, SIGMA, mean.ndim, compute)
    x_prev = (mean + sigma * noise.to(compute)).to(cache_dtype)
    return x_prev, gaussian_logprob(x_prev, mean, table, step_index, reduction)


def ddim_logprob(eps_uncond: torch.Tensor | None, eps_cond: torch.Tensor, guidance_scale: float,
                 x_t: torch.Tensor, x_prev: torch.Tensor, table: torch.Tensor,
                 step_index: torch.Tensor, clip_sample_range: float | None = None,
                 reduction: str = "mean") -> torch.Tensor:
    """log p(x_prev | x_t) under the current ε-prediction; differentiable w.r.t. both ε halves.

    The gradient w.r.t. ε̂ is elementwise, b_t·(x_t' − μ)/(σ²·D), so autograd is exact and cheap.
    """
    compute = torch.float64 if eps_cond.dtype == torch.float64 else torch.float32
    eps = cfg_combine(None if eps_uncond is None else eps_uncond.to(compute),
                      eps_cond.to(compute), guidance_scale)
    mean = ddim_mean(eps, x_t, table, step_index, clip_sample_range)
    return gaussian_logprob(x_prev, mean, table, step_index, reduction)


def branch_fork(latents: torch.Tensor, branches: int,
                cache_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, C, H, W) → (P·K, C, H, W) in ``cache_dtype``, branches of one trunk adjacent.

    Also returns the group id of every branch, (P·K,) int64: branch ``g*K + k`` is branch k of
    trunk g.
    """
    forked = latents.to(cache_dtype).repeat_interleave(branches, dim=0)
    groups = torch.arange(latents.shape[0], device=latents.device).repeat_interleave(branches)
    return forked, groups


def fork_index(latents: torch.Tensor, index: torch.Tensor,
               cache_dtype: torch.dtype) -> torch.Tensor:
    """(P, C, H, W) and (M,) int64 → (M, C, H, W) in ``cache_dtype``: row i is latents[index[i]].

    Indices in [0, P), in any order, repeats allowed (particle resampling). ``branch_fork`` is
    the case index = arange(P).repeat_interleave(K).
    """
    return latents.index_select(0, index).to(cache_dtype)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, table: torch.Tensor,
              step_index: torch.Tensor) -> torch.Tensor:
    """The forward process at each sample's step: x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·e (in fp32).

    The denoising objectives (DRO, Diffusion-DPO) noise a clean latent with an explicit ``noise``
    so that the policy and the base model see the same x_t."""
    nd = x0.ndim
    return _per_sample(table, step_index, SQRT_AB, nd, torch.float32) * x0.float() \
        + _per_sample(table, step_index, SQRT_1M_AB, nd, torch.float32) * noise.float()
