"""Schedules: the per-step DDIM (or LCM) scalar table, and the backward-progressive interval schedule.

The step table is computed once from a diffusers scheduler (so any SD scheduler config gives
the same timesteps and ᾱ that diffusers' own ``DDIMScheduler.step`` would use), in float64,
and kept on the device in fp32; the ops index it with a device tensor.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from b2fast.config import LR_SCHEDULES
from b2fast.ops.reference.ddim import (DIR_COEF, LOG_SIGMA, SIGMA, SQRT_1M_AB, SQRT_AB,
                                       SQRT_AB_PREV, TABLE_COLUMNS)
from b2fast.utils import did_you_mean, load_callable


@dataclass
class StepTable:
    """DDIM timesteps t_0 > … > t_{S-1} and the (S, 6) table of per-step scalars."""

    timesteps: torch.Tensor      # (S,) int64, e.g. 951, 901, …, 1 for SD with S = 20
    table: torch.Tensor          # (S, 6) fp32 (or fp64), columns as in reference.ddim
    clip_sample_range: float | None
    noisy_last: bool = False     # RLCM's last step: a noisy action x = √(1−σ²)·d + σ·z whose image is d

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.numel())

    def to(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> "StepTable":
        return StepTable(self.timesteps.to(device), self.table.to(device, dtype),
                         self.clip_sample_range, self.noisy_last)

    def image_latents(self, x_last: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """What the image decodes from, given the last step's output and its noise: that output,
        or for ``noisy_last`` the action's mean d = (x − σ·z)/√(1 − σ²) (RLCM scores the noisy
        action but shows d)."""
        if not self.noisy_last:
            return x_last
        sigma = float(self.table[-1, SIGMA])
        return ((x_last.float() - sigma * noise.float()) / math.sqrt(1 - sigma ** 2)).to(x_last.dtype)


def build_step_table(scheduler, num_steps: int, eta: float) -> StepTable:
    """Per-step scalars of DDIM with ``eta`` on ``scheduler``'s ᾱ and timestep spacing (fp64)."""
    if scheduler.config.prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"scheduler prediction_type: b2fast supports 'epsilon' and 'v_prediction' models, "
                         f"got {scheduler.config.prediction_type!r}")
    scheduler.set_timesteps(num_steps)
    timesteps = scheduler.timesteps.to(torch.int64).cpu()
    alphas_cumprod = scheduler.alphas_cumprod.to(torch.float64).cpu()
    final = float(scheduler.final_alpha_cumprod)
    stride = scheduler.config.num_train_timesteps // num_steps
    table = torch.zeros(num_steps, TABLE_COLUMNS, dtype=torch.float64)
    for i, t in enumerate(timesteps.tolist()):
        ab = alphas_cumprod[t].item()
        prev = t - stride
        ab_prev = alphas_cumprod[prev].item() if prev >= 0 else final
        variance = (1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)
        sigma = eta * math.sqrt(max(variance, 0.0))
        table[i, SQRT_AB] = math.sqrt(ab)
        table[i, SQRT_1M_AB] = math.sqrt(1 - ab)
        table[i, SQRT_AB_PREV] = math.sqrt(ab_prev)
        table[i, DIR_COEF] = math.sqrt(max(1 - ab_prev - sigma ** 2, 0.0))
        table[i, SIGMA] = sigma
        table[i, LOG_SIGMA] = math.log(sigma) if sigma > 0 else 0.0
    clip = float(scheduler.config.clip_sample_range) if scheduler.config.clip_sample else None
    return StepTable(timesteps, table, clip)



def lcm_timesteps(lcm, num_steps: int, rlcm_compat: bool = False) -> torch.Tensor:
    """(K,) int64: diffusers' ``LCMScheduler.set_timesteps`` (evenly spaced indices into the
    training grid of ``original_inference_steps`` origin steps), or RLCM's every ⌊origin/K⌋-th
    from the top (K = 4 of 50: 999, 759, 519, 279 instead of diffusers' 999, 759, 499, 259)."""
    if not rlcm_compat:
        lcm.set_timesteps(num_steps)
        return lcm.timesteps.to(torch.int64).cpu()
    origin_steps = lcm.config.original_inference_steps
    if not 1 <= num_steps <= origin_steps:
        raise ValueError(f"sampling.num_steps: an LCM takes 1 to {origin_steps} steps, got {num_steps}")
    stride = lcm.config.num_train_timesteps // origin_steps
    origin = torch.arange(1, origin_steps + 1, dtype=torch.int64) * stride - 1
    return origin.flip(0)[::origin_steps // num_steps][:num_steps].clone()


def build_lcm_table(scheduler, num_steps: int, rlcm_compat: bool = False) -> StepTable:
    """Per-step scalars of multistep latent-consistency sampling, in the DDIM table's layout.

    LCM step t → t': x̂₀ = (x_t − √(1−ᾱ_t)·ε̂)/√ᾱ_t, d = c_out(t)·x̂₀ + c_skip(t)·x_t, and the
    action x_t' = √ᾱ_t'·d + √(1−ᾱ_t')·z. Writing x_t = √ᾱ_t·x̂₀ + √(1−ᾱ_t)·ε̂ turns the mean into
    the DDIM form μ = A·x̂₀ + B·ε̂ with A = √ᾱ_t'·(c_out + c_skip·√ᾱ_t), B = √ᾱ_t'·c_skip·√(1−ᾱ_t)
    and σ = √(1−ᾱ_t'), so every DDIM kernel (step, log-prob, all backends) runs LCM unchanged.
    The last step returns d itself (σ = 0: deterministic, log p = 0, never trained), as diffusers'
    ``LCMScheduler.step`` does; with ``rlcm_compat`` it is a noisy action x' = √ᾱ'·d + √(1−ᾱ')·z
    with ᾱ' = ᾱ_t (RLCM's code), whose image is still d (``StepTable.image_latents``).
    ``scheduler`` is any diffusers scheduler of the model (its config gives ᾱ;
    ``LCMScheduler.from_config`` adds the LCM settings).
    """
    from diffusers import LCMScheduler

    if scheduler.config.prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"scheduler prediction_type: b2fast supports 'epsilon' and 'v_prediction' models, "
                         f"got {scheduler.config.prediction_type!r}")
    lcm = scheduler if isinstance(scheduler, LCMScheduler) else LCMScheduler.from_config(scheduler.config)
    if lcm.config.clip_sample or lcm.config.thresholding:
        raise ValueError("scheduler: an LCM policy needs clip_sample and thresholding off in the model's "
                         "scheduler config (clipping x̂₀ breaks the step's Gaussian form); set them to false")
    timesteps = lcm_timesteps(lcm, num_steps, rlcm_compat)
    alphas_cumprod = lcm.alphas_cumprod.to(torch.float64).cpu()
    table = torch.zeros(num_steps, TABLE_COLUMNS, dtype=torch.float64)
    for i, t in enumerate(timesteps.tolist()):
        last = i == num_steps - 1
        ab = alphas_cumprod[t].item()
        ab_prev = alphas_cumprod[t if last else timesteps[i + 1]].item()
        c_skip, c_out = lcm.get_scalings_for_boundary_condition_discrete(t)
        noisy = not last or rlcm_compat
        scale = math.sqrt(ab_prev) if noisy else 1.0            # x' = scale·d + σ·z
        sigma = math.sqrt(1 - ab_prev) if noisy else 0.0
        table[i, SQRT_AB] = math.sqrt(ab)
        table[i, SQRT_1M_AB] = math.sqrt(1 - ab)
        table[i, SQRT_AB_PREV] = scale * (c_out + c_skip * math.sqrt(ab))
        table[i, DIR_COEF] = scale * c_skip * math.sqrt(1 - ab)
        table[i, SIGMA] = sigma
        table[i, LOG_SIGMA] = math.log(sigma) if sigma > 0 else 0.0
    return StepTable(timesteps, table, None, noisy_last=rlcm_compat)


def step_gains(table: torch.Tensor) -> torch.Tensor:
    """(S,) |∂μ/∂ε| / σ_t per step: how strongly a step's log-prob gradient is amplified.

    d log p / dε = (∂μ/∂ε)·(x' − μ)/σ² = (∂μ/∂ε)·z/σ, with ∂μ/∂ε = √(1−ᾱ'−σ²) − √ᾱ'·√(1−ᾱ)/√ᾱ
    (x̂₀ unclipped). With "leading" spacing and steps_offset 1 the step to t = 1 has a σ an order
    of magnitude below its neighbours' and a gain 5–14× theirs; zero-σ steps (η = 0) get +inf.
    """
    table = table.double()
    slope = table[:, DIR_COEF] - table[:, SQRT_AB_PREV] * table[:, SQRT_1M_AB] / table[:, SQRT_AB]
    return torch.where(table[:, SIGMA] > 0, slope.abs() / table[:, SIGMA].clamp_min(1e-300),
                       torch.full_like(slope, math.inf))


def trained_steps(table: torch.Tensor, max_step_gain: float) -> torch.Tensor:
    """(S,) bool: the steps ``train.max_step_gain`` lets the update train (all when it is 0).
    Deterministic steps (σ = 0, e.g. an LCM's last) carry no gradient and are never trained,
    unless every step is deterministic (η = 0: nothing to leave out)."""
    gains = step_gains(table)
    stochastic = torch.isfinite(gains)
    if not stochastic.any():
        return torch.ones(gains.shape, dtype=torch.bool)
    if max_step_gain == 0:
        return stochastic
    return gains <= max_step_gain * gains[stochastic].median()


# ----------------------------------------------------------------------------------------------
# Backward progressive interval schedule: stage s → number L_s of trained (last) steps.

IntervalSchedule = Callable[[int, int, int, int], int]


def linear_plateaus(stage: int, num_stages: int, min_len: int, max_len: int) -> int:
    """Reference schedule: L_s = L_min + ⌊s·(L_max − L_min + 1)/N⌋, equal plateaus, capped at L_max."""
    return min(max_len, min_len + (stage * (max_len - min_len + 1)) // num_stages)


def constant_max(stage: int, num_stages: int, min_len: int, max_len: int) -> int:
    """Whole interval from the start (no progression): plain DDPO-style training of L_max steps."""
    return max_len


BUILTIN_SCHEDULES: dict[str, IntervalSchedule] = {
    "linear": linear_plateaus,
    "constant": constant_max,
}


def stage_lr(lr: float, kind: str, stage: int, num_stages: int, warmup_stages: int = 0) -> float:
    """The learning rate of ``stage``: ``lr`` ('constant'), or cosine-annealed from ``lr`` at stage 0
    towards 0 ('cosine'), scaled by (stage + 1) / (warmup_stages + 1) during the first ``warmup_stages``
    stages. A function of the stage alone, so a resumed run continues it exactly."""
    warmup = min(1.0, (stage + 1) / (warmup_stages + 1))
    if kind == "constant":
        return lr * warmup
    if kind == "cosine":
        return lr * warmup * 0.5 * (1.0 + math.cos(math.pi * stage / num_stages))
    raise ValueError(f"train.lr_schedule: got {kind!r}{did_you_mean(kind, LR_SCHEDULES)}, "
                     f"expected one of {LR_SCHEDULES}")


def resolve_schedule(name: str) -> IntervalSchedule:
    """A built-in schedule name, or ``module:function`` with the signature of ``linear_plateaus``."""
    if name in BUILTIN_SCHEDULES:
        return BUILTIN_SCHEDULES[name]
    if ":" not in name:
        raise ValueError(f"schedule.kind: unknown schedule {name!r}{did_you_mean(name, BUILTIN_SCHEDULES)}; use one of "
                         f"{sorted(BUILTIN_SCHEDULES)} or 'module:function'")
    return load_callable(name, "schedule.kind")
