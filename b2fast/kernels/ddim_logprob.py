"""Triton kernels of the training log-prob (spec: b2fast.ops.reference.ddim.ddim_logprob) and of
its gradient w.r.t. both ε halves.

Forward: per (sample, chunk) program, μ from the current ε-prediction, then the log-density of
the given x' summed into the chunk's partial; ``_common`` sums the partials in a fixed order.
Backward: elementwise, recomputes μ (saves nothing), in the compute dtype:
    dε̂ = g_b·(x' − μ)/σ² · (c − √ᾱ'·√(1−ᾱ)/√ᾱ · [−r ≤ x̂0 ≤ r])   (0 when σ = 0)
    g_b = grad[b]/D for mean; grad_ε_c = w·dε̂, grad_ε_u = (1 − w)·dε̂ (grad_ε_c = dε̂ without CFG).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from b2fast.kernels._common import (LAUNCH_OPTIONS, acc_type, autotune_blocks, cast_to,
                                    compute_dtype, ddim_mean, div, finish_log_prob,
                                    gaussian_log_density_sum, load_step_row, new_partials, prepare,
                                    to_acc)


@autotune_blocks(reset_to_zero=["partial_ptr"])  # tuning reruns: re-zero the unused partials
@triton.jit
def _logprob_fwd_kernel(eu_ptr, ec_ptr, xt_ptr, xp_ptr, table_ptr, idx_ptr, partial_ptr,
                        w: tl.float64, clip: tl.float64, num_steps, per_sample, partial_stride,
                        HAS_UNCOND: tl.constexpr, CLIP: tl.constexpr, ACC: tl.constexpr,
                        BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    sqrt_ab, sqrt_1m_ab, sqrt_ab_prev, dir_coef, sigma, log_sigma, ok = load_step_row(
        table_ptr, idx_ptr, b, num_steps, ACC)
    local = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = local < per_sample
    offs = b * per_sample + local
    mu, _ = ddim_mean(eu_ptr, ec_ptr, xt_ptr, offs, mask, w, clip, sqrt_ab, sqrt_1m_ab,
                      sqrt_ab_prev, dir_coef, HAS_UNCOND, CLIP, ACC)
    x_prev = to_acc(tl.load(xp_ptr + offs, mask=mask, other=0.0), ACC)
    partial = gaussian_log_density_sum(x_prev, mu, mask, sigma, log_sigma, ACC)
    tl.store(partial_ptr + b * partial_stride + chunk, tl.where(ok, partial, float("nan")))


@autotune_blocks()
@triton.jit
def _logprob_bwd_kernel(grad_ptr, eu_ptr, ec_ptr, xt_ptr, xp_ptr, table_ptr, idx_ptr,
                        grad_eu_ptr, grad_ec_ptr, w: tl.float64, clip: tl.float64, num_steps,
                        per_sample, HAS_UNCOND: tl.constexpr, CLIP: tl.constexpr,
                        MEAN: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    sqrt_ab, sqrt_1m_ab, sqrt_ab_prev, dir_coef, sigma, log_sigma, ok = load_step_row(
        table_ptr, idx_ptr, b, num_steps, ACC)
    local = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = local < per_sample
    offs = b * per_sample + local
    mu, x0 = ddim_mean(eu_ptr, ec_ptr, xt_ptr, offs, mask, w, clip, sqrt_ab, sqrt_1m_ab,
                       sqrt_ab_prev, dir_coef, HAS_UNCOND, CLIP, ACC)
    g = to_acc(tl.load(grad_ptr + b), ACC)
    if MEAN:
        g = div(g, tl.full((), per_sample, ACC))
    # dμ/dε̂: the x̂0 path counts only where the clamp passes it (inclusive, like clamp's grad)
    x0_path = div(sqrt_ab_prev * sqrt_1m_ab, sqrt_ab)
    dmu = dir_coef - x0_path
    if CLIP:
        r = tl.full((), clip, ACC)
        dmu = tl.where((x0 >= -r) & (x0 <= r), dmu, dir_coef)
    stochastic = sigma > 0
    safe_sigma = tl.where(stochastic, sigma, 1.0)
    x_prev = to_acc(tl.load(xp_ptr + offs, mask=mask, other=0.0), ACC)
    d_eps = div(g * (x_prev - mu), safe_sigma * safe_sigma) * dmu
    d_eps = tl.where(stochastic, d_eps, 0.0)  # σ = 0: deterministic step, no gradient
    d_eps = tl.where(ok, d_eps, float("nan"))  # bad step index: poison
    wt = tl.full((), w, ACC)
    if HAS_UNCOND:
        tl.store(grad_ec_ptr + offs, cast_to(wt * d_eps, grad_ec_ptr.dtype.element_ty), mask=mask)
        tl.store(grad_eu_ptr + offs, cast_to((1 - wt) * d_eps, grad_eu_ptr.dtype.element_ty),
                 mask=mask)
    else:
        tl.store(grad_ec_ptr + offs, cast_to(d_eps, grad_ec_ptr.dtype.element_ty), mask=mask)


def ddim_logprob_forward(eps_uncond, eps_cond, guidance_scale, x_t, x_prev, table, step_index,
                         clip_sample_range=None, reduction="mean", *, log_prob=None):
    """log p(x_prev | x_t), (B,) in the compute dtype (fp32; fp64 when eps_cond is fp64)."""
    (eu, ec, xt, xp, table, idx), batch, per_sample = prepare(
        "ddim_logprob", eps_uncond, eps_cond, x_t, x_prev, table, step_index,
        clip_sample_range, reduction)
    compute = compute_dtype(ec)
    if log_prob is None:
        log_prob = torch.empty(batch, dtype=compute, device=ec.device)
    partials = new_partials(batch, per_sample, ec.device)
    if batch and per_sample:
        grid = lambda meta: (batch, triton.cdiv(per_sample, meta["BLOCK"]))  # noqa: E731
        _logprob_fwd_kernel[grid](
            ec if eu is None else eu, ec, xt, xp, table, idx, partials, float(guidance_scale),
            float(clip_sample_range or 0.0), table.shape[0], per_sample, partials.stride(0),
            HAS_UNCOND=eu is not None, CLIP=clip_sample_range is not None,
            ACC=acc_type(compute), **LAUNCH_OPTIONS)
    return finish_log_prob(partials, log_prob, per_sample, reduction)


def ddim_logprob_backward(grad_log_prob, eps_uncond, eps_cond, guidance_scale, x_t, x_prev,
                          table, step_index, clip_sample_range=None, reduction="mean"):
    """(grad_eps_uncond or None, grad_eps_cond), each in its input's dtype and shape."""
    (eu, ec, xt, xp, table, idx), batch, per_sample = prepare(
        "ddim_logprob_backward", eps_uncond, eps_cond, x_t, x_prev, table, step_index,
        clip_sample_range, reduction)
    if grad_log_prob.shape != (batch,):
        raise ValueError(f"ddim_logprob_backward: grad_log_prob must be ({batch},), got "
                         f"{tuple(grad_log_prob.shape)}")
    grad_ec = torch.empty_like(ec)
    grad_eu = None if eu is None else torch.empty_like(eu)
    if batch and per_sample:
        grid = lambda meta: (batch, triton.cdiv(per_sample, meta["BLOCK"]))  # noqa: E731
        _logprob_bwd_kernel[grid](
            grad_log_prob.contiguous(), ec if eu is None else eu, ec, xt, xp, table, idx,
            grad_ec if grad_eu is None else grad_eu, grad_ec, float(guidance_scale),
            float(clip_sample_range or 0.0), table.shape[0], per_sample,
            HAS_UNCOND=eu is not None, CLIP=clip_sample_range is not None,
            MEAN=reduction == "mean", ACC=acc_type(compute_dtype(ec)), **LAUNCH_OPTIONS)
    return grad_eu, grad_ec
