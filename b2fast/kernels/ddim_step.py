"""Triton kernel of the fused DDIM sampling step with log-prob (spec:
b2fast.ops.reference.ddim.ddim_step_with_logprob; CPU twin: csrc/ddim_step.cpp).

One pass over the inputs per (sample, chunk) program, in the compute dtype:
    ε̂ = ε_u + w(ε_c − ε_u) → x̂0 (optionally clamped) → μ → x' = μ + σz, stored in the cache dtype
    → log-density of the *stored* x' summed into the chunk's partial (0 when σ = 0).
Per-step scalars come from the (S, 6) table through the device step index (no host reads).
The partials are summed by the fixed-order second pass of ``_common`` (batch-invariant bits).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from b2fast.kernels._common import (LAUNCH_OPTIONS, acc_type, autotune_blocks, cast_to,
                                    compute_dtype, ddim_mean, finish_log_prob,
                                    gaussian_log_density_sum, load_step_row, new_partials, prepare,
                                    to_acc)


# Tuning reruns the kernel: restore an out that aliases x_t, re-zero the unused partials.
@autotune_blocks(restore_value=["out_ptr"], reset_to_zero=["partial_ptr"])
@triton.jit
def _ddim_step_kernel(eu_ptr, ec_ptr, xt_ptr, z_ptr, table_ptr, idx_ptr, out_ptr, partial_ptr,
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
    z = to_acc(tl.load(z_ptr + offs, mask=mask, other=0.0), ACC)
    stored = cast_to(mu + sigma * z, out_ptr.dtype.element_ty)
    tl.store(out_ptr + offs, stored, mask=mask)
    # log p of the *stored* x' (docs/algorithm.md, "Numerics rules")
    partial = gaussian_log_density_sum(to_acc(stored, ACC), mu, mask, sigma, log_sigma, ACC)
    tl.store(partial_ptr + b * partial_stride + chunk, tl.where(ok, partial, float("nan")))


def ddim_step_with_logprob(eps_uncond, eps_cond, guidance_scale, x_t, noise, table, step_index,
                           cache_dtype, clip_sample_range=None, reduction="mean", *, out=None,
                           log_prob=None):
    """(x_prev in ``cache_dtype``, log p (B,) in the compute dtype); see the reference.

    ``out`` / ``log_prob``: optional preallocated contiguous outputs (``out`` may alias x_t).
    """
    (eu, ec, xt, z, table, idx), batch, per_sample = prepare(
        "ddim_step_with_logprob", eps_uncond, eps_cond, x_t, noise, table, step_index,
        clip_sample_range, reduction)
    compute = compute_dtype(ec)
    if out is None:
        out = torch.empty(ec.shape, dtype=cache_dtype, device=ec.device)
    if log_prob is None:
        log_prob = torch.empty(batch, dtype=compute, device=ec.device)
    if out.shape != ec.shape or out.dtype != cache_dtype or not out.is_contiguous() \
            or log_prob.shape != (batch,) or log_prob.dtype != compute:
        raise ValueError("ddim_step_with_logprob: out/log_prob do not match the inputs")
    partials = new_partials(batch, per_sample, ec.device)
    if batch and per_sample:
        grid = lambda meta: (batch, triton.cdiv(per_sample, meta["BLOCK"]))  # noqa: E731
        _ddim_step_kernel[grid](
            ec if eu is None else eu, ec, xt, z, table, idx, out, partials,
            float(guidance_scale), float(clip_sample_range or 0.0), table.shape[0], per_sample,
            partials.stride(0), HAS_UNCOND=eu is not None, CLIP=clip_sample_range is not None,
            ACC=acc_type(compute), **LAUNCH_OPTIONS)
    finish_log_prob(partials, log_prob, per_sample, reduction)
    return out, log_prob
