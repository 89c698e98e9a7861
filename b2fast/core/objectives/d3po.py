"""D3PO's pair loss on per-step log-probs (Yang et al., "Using Human Feedback to Fine-tune
Diffusion Models without Any Reward Model"; docs/algorithm.md, "Objectives").

For a (winner, loser) pair of one B² group and one branch-window step k:

=========================================  ===================================================
symbol                                     here
=========================================  ===================================================
ℓ_θ(k), ℓ_ref(k)                           ``log_prob_*``, ``ref_log_prob_*``
ρ(k) = clamp(exp(ℓ_θ − ℓ_ref), 1−ε, 1+ε)   hard clamp: no gradient outside the band
L(k) = −log σ(β·[log ρ_w − log ρ_l])       :func:`d3po_loss`, per (pair, step)
=========================================  ===================================================

The reference is the frozen base model (the UNet with its LoRA adapters disabled), not the
sampling policy as in PPO. The pair's trunk steps are identical for both members, so their terms
cancel exactly; only the branch window is ever computed.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def d3po_loss(log_prob_w: torch.Tensor, log_prob_l: torch.Tensor, ref_log_prob_w: torch.Tensor,
              ref_log_prob_l: torch.Tensor, beta: float = 0.1, clip: float = 0.1
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-(pair, step) loss −log σ(β·[log ρ_w − log ρ_l]), no reduction.

    A tie (equal clamped ratios) gives log 2; a ratio already outside [1−ε, 1+ε] gives its member no
    gradient. Stats (detached): ``accuracy`` = mean(log ρ_w > log ρ_l) (the implicit preference
    accuracy), ``clipfrac`` = fraction of the 2·n ratios clamped, ``logit`` = mean β·(log ρ_w − log ρ_l).
    """
    shapes = {tuple(t.shape) for t in (log_prob_w, log_prob_l, ref_log_prob_w, ref_log_prob_l)}
    if len(shapes) != 1:
        raise ValueError(f"d3po_loss: the four log-prob tensors must have one shape, got {sorted(shapes)}")
    if beta <= 0 or not 0 < clip < 1:
        raise ValueError(f"d3po_loss: need beta > 0 and 0 < clip < 1, got beta={beta}, clip={clip}")
    log_ratio_w = log_prob_w - ref_log_prob_w.detach()
    log_ratio_l = log_prob_l - ref_log_prob_l.detach()
    # the clamp of log ρ equals log of the clamped ρ, and has the same zero gradient outside the band
    low, high = math.log1p(-clip), math.log1p(clip)
    clamped_w, clamped_l = log_ratio_w.clamp(low, high), log_ratio_l.clamp(low, high)
    logit = beta * (clamped_w - clamped_l)
    loss = -F.logsigmoid(logit)
    with torch.no_grad():
        outside = torch.cat([(log_ratio_w < low) | (log_ratio_w > high), (log_ratio_l < low) | (log_ratio_l > high)])
        stats = {"accuracy": (clamped_w > clamped_l).float().mean(),
                 "clipfrac": outside.float().mean(),
                 "logit": logit.mean()}
    return loss, stats
