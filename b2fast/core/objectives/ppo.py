"""DDPO-style PPO-clip objective on per-step log-probs (docs/algorithm.md, "Policy update").

Notation:

=========================================  ===================================================
symbol                                     here
=========================================  ===================================================
log p_θ(x_t' | x_t), log p_old             ``log_prob``, ``old_log_prob`` (one per sample)
r = exp(log p_θ − log p_old)               ``ratio``
A = clamp(z, −c, c)·(β+ if z > 0 else β−)  :func:`advantage_weights`
L = max(−A·r, −A·clip(r, 1−ε, 1+ε))        :func:`ppo_clip_loss`, per sample
=========================================  ===================================================

A "sample" is one (trajectory, interval step) pair. Losses are returned per sample so the
trainer can weight and sum them across gradient-accumulation micro-batches itself.
"""
from __future__ import annotations

import torch


def advantage_weights(z: torch.Tensor, adv_clip: float = 5.0, pos_weight: float = 1.0,
                      neg_weight: float = 1.0) -> torch.Tensor:
    """A = clamp(z, −adv_clip, adv_clip)·(β+ if z > 0 else β−).

    The clamp bounds the step a prompt with a tiny reward spread (std_p ≈ 0, huge z) can force;
    β+ ≠ β− lets positives and negatives pull with different strength.
    """
    if adv_clip <= 0:
        raise ValueError(f"adv_clip must be > 0, got {adv_clip}")
    weight = torch.where(z > 0, torch.full_like(z, pos_weight), torch.full_like(z, neg_weight))
    return z.clamp(-adv_clip, adv_clip) * weight


def ppo_clip_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                  clip_range: float = 0.1) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-sample PPO-clip loss L = max(−A·r, −A·clip(r, 1−ε, 1+ε)), no reduction.

    dL/dlog p_θ is −A·r where the unclipped term is chosen and 0 where the clipped one is,
    so a sample whose ratio has already moved ε in the direction A favours stops pulling.
    Stats (detached, as in DDPO): ``clipfrac`` = mean(|r − 1| > ε),
    ``approx_kl`` = ½·mean((log p_θ − log p_old)²), ``ratio_mean`` = mean(r).
    """
    if not log_prob.shape == old_log_prob.shape == advantages.shape:
        raise ValueError(f"log_prob, old_log_prob and advantages must have one shape, got "
                         f"{tuple(log_prob.shape)}, {tuple(old_log_prob.shape)}, "
                         f"{tuple(advantages.shape)}")
    if clip_range <= 0:
        raise ValueError(f"clip_range must be > 0, got {clip_range}")
    log_ratio = log_prob - old_log_prob.detach()
    ratio = torch.exp(log_ratio)
    advantages = advantages.detach()
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped)
    with torch.no_grad():
        stats = {"clipfrac": ((ratio - 1.0).abs() > clip_range).float().mean(),
                 "approx_kl": 0.5 * (log_ratio ** 2).mean(),
                 "ratio_mean": ratio.mean()}
    return loss, stats
