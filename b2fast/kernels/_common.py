"""Pieces shared by the DDIM Triton kernels: dtype handling, the per-step table row, μ, the
block configs, and the deterministic second pass that turns per-chunk partial sums into log p.

Why these rules (see csrc/ddim_step.cpp for the same ones on the CPU):

* Math runs in the compute dtype ``ACC`` (fp32; fp64 when eps_cond is fp64) in the reference's
  operation order, kernels launch with ``enable_fp_fusion=False`` (no FMA contraction) and divide
  with IEEE rounding (``div``), so every elementwise value is rounded exactly as the op-by-op
  PyTorch reference rounds it.
* Conversions follow torch's: 16-bit types go through fp32 (as c10 does), and bf16 is rounded
  to nearest-even on the bits, like ``c10::BFloat16``. Doing it by hand also works around the
  Triton interpreter, whose fp32→bf16 cast truncates.
* Reductions are deterministic and batch-invariant: a program reduces one chunk of one sample
  (fp64 sum) into a partials buffer, and a second kernel sums each sample's partials with a
  fixed tree (no atomics). The chunk size is autotuned with ``key=["per_sample"]``, so the
  partition, hence the bits of a sample's log p, never depend on the batch it sits in.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from b2fast.kernels.table import DIR_COEF, LOG_SIGMA, SIGMA, SQRT_1M_AB, SQRT_AB, SQRT_AB_PREV, TABLE_COLUMNS

# load_step_row reads the row's scalars at offsets 0 … 5 in this order
assert (SQRT_AB, SQRT_1M_AB, SQRT_AB_PREV, DIR_COEF, SIGMA, LOG_SIGMA) == tuple(range(TABLE_COLUMNS))

INTERPRET = os.environ.get("TRITON_INTERPRET", "") == "1"
HALF_LOG_2PI: tl.constexpr = tl.constexpr(0.5 * math.log(2.0 * math.pi))
N_COLS: tl.constexpr = tl.constexpr(TABLE_COLUMNS)
LAUNCH_OPTIONS = {"enable_fp_fusion": False}  # ignored by the interpreter

_TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64}

# The chunk sizes tuned over on a GPU; the interpreter is slow per program, not per element, so
# one big block is fastest there.
GPU_BLOCK_CONFIGS = [triton.Config({"BLOCK": block}, num_warps=warps)
                     for block, warps in ((512, 4), (1024, 4), (2048, 8), (4096, 8))]
BLOCK_CONFIGS = [triton.Config({"BLOCK": 1024}, num_warps=4)] if INTERPRET else GPU_BLOCK_CONFIGS
MIN_BLOCK = min(c.kwargs["BLOCK"] for c in BLOCK_CONFIGS)


def prune_blocks(configs, named_args, **kwargs):
    """Skip blocks larger than one sample (all but the smallest such config do the same work)."""
    limit = max(triton.next_power_of_2(named_args["per_sample"]), MIN_BLOCK)
    return [c for c in configs if c.kwargs["BLOCK"] <= limit]


def autotune_blocks(**kwargs):
    """``triton.autotune`` over the chunk size, keyed on the per-sample element count only."""
    return triton.autotune(configs=BLOCK_CONFIGS, key=["per_sample"],
                           prune_configs_by={"early_config_prune": prune_blocks}, **kwargs)


# -- host side ---------------------------------------------------------------------------------
def compute_dtype(eps_cond: torch.Tensor) -> torch.dtype:
    return torch.float64 if eps_cond.dtype == torch.float64 else torch.float32


def acc_type(dtype: torch.dtype):
    """The Triton compute dtype for a torch compute dtype."""
    return _TL_DTYPES[dtype]


def prepare(op, eps_uncond, eps_cond, x_t, other, table, step_index, clip, reduction):
    """Check the arguments of the DDIM ops; returns them contiguous, plus (B, D).

    Light checks only (shapes, dtypes, options); b2fast.ops validates fully before dispatch.
    The step index values are never read on the host: the kernels guard them on the device.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"{op}: reduction must be 'mean' or 'sum', got {reduction!r}")
    if clip is not None and not clip > 0:
        raise ValueError(f"{op}: clip_sample_range must be None or > 0, got {clip}")
    tensors = [eps_cond, x_t, other] + ([] if eps_uncond is None else [eps_uncond])
    for t in tensors:
        if t.shape != eps_cond.shape or not t.is_floating_point():
            raise ValueError(f"{op}: every input must be a float tensor of shape "
                             f"{tuple(eps_cond.shape)}, got {t.dtype} {tuple(t.shape)}")
    if eps_cond.dim() < 1 or table.dim() != 2 or table.shape[1] != TABLE_COLUMNS \
            or step_index.shape != (eps_cond.shape[0],) or step_index.dtype != torch.int64:
        raise ValueError(f"{op}: need eps (B, ...), table (S, {TABLE_COLUMNS}) and step_index "
                         f"(B,) int64; got {tuple(eps_cond.shape)}, {tuple(table.shape)}, "
                         f"{tuple(step_index.shape)} {step_index.dtype}")
    batch = eps_cond.shape[0]
    per_sample = eps_cond.numel() // batch if batch else 0
    contig = [None if t is None else t.contiguous()
              for t in (eps_uncond, eps_cond, x_t, other, table, step_index)]
    return contig, batch, per_sample


def new_partials(batch, per_sample, device):
    """Zeroed (B, most chunks any config uses) fp64 buffer of per-chunk sums: chunks a larger
    block leaves unused stay 0, so the second pass needs no host-side knowledge of the config
    the autotuner picked (and torch.compile can trace the launchers)."""
    return torch.zeros(batch, max(triton.cdiv(per_sample, MIN_BLOCK), 1), dtype=torch.float64,
                       device=device)


def finish_log_prob(partials, log_prob, per_sample, reduction):
    """Second pass: log p[b] = Σ partials[b] (÷ D for mean), one fixed fp64 tree per sample."""
    if log_prob.shape[0]:
        _finish_kernel[(log_prob.shape[0],)](
            partials, log_prob, partials.shape[1], partials.stride(0), per_sample,
            MEAN=reduction == "mean", BLOCK_P=triton.next_power_of_2(partials.shape[1]))
    return log_prob


# -- device side -------------------------------------------------------------------------------
@triton.jit
def _finish_kernel(partial_ptr, log_prob_ptr, n_chunks, stride, per_sample,
                   MEAN: tl.constexpr, BLOCK_P: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_P)
    total = tl.sum(tl.load(partial_ptr + b * stride + offs, mask=offs < n_chunks, other=0.0),
                   axis=0)
    if MEAN:
        total = total / per_sample  # fp64; 0/0 = NaN for an empty sample, like torch.mean
    tl.store(log_prob_ptr + b, total.to(log_prob_ptr.dtype.element_ty))


@triton.jit
def div(x, y):
    """x / y rounded to nearest as torch does (Triton's fp32 ``/`` is the ~2-ulp div.full)."""
    if x.dtype == tl.float32:
        return tl.math.div_rn(x, y)
    else:
        return x / y


@triton.jit
def to_acc(x, ACC: tl.constexpr):
    """Widen a loaded value to ACC exactly (bf16 through its bits, as the interpreter's bf16
    casts are not exact)."""
    if x.dtype == tl.bfloat16:
        x = (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    return x.to(ACC)


@triton.jit
def cast_to(x, DST: tl.constexpr):
    """Round x (fp32/fp64) to DST as torch's ``.to(DST)`` does."""
    if DST == tl.bfloat16:
        f = x.to(tl.float32)
        bits = f.to(tl.uint32, bitcast=True)
        bits = bits + (((bits >> 16) & 1) + 0x7FFF)  # round to nearest even, as c10::BFloat16
        bits = tl.where(f != f, 0x7FC00000, bits)  # canonical NaN
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    elif DST == tl.float16:
        return x.to(tl.float32).to(tl.float16)
    else:
        return x.to(DST)


@triton.jit
def load_step_row(table_ptr, idx_ptr, b, num_steps, ACC: tl.constexpr):
    """The sample's schedule row (6 scalars in ACC) and whether its step index is in range.

    An out-of-range index reads no memory: its scalars are NaN and callers poison that sample's
    outputs with NaN (the assert fires only in Triton's debug mode, TRITON_DEBUG=1, compiled).
    """
    idx = tl.load(idx_ptr + b)
    ok = (idx >= 0) & (idx < num_steps)
    tl.device_assert(ok, "step_index out of range: need 0 <= step_index < table rows")
    row = table_ptr + tl.where(ok, idx, 0) * N_COLS
    nan = float("nan")
    sqrt_ab = tl.load(row + 0, mask=ok, other=nan).to(ACC)
    sqrt_1m_ab = tl.load(row + 1, mask=ok, other=nan).to(ACC)
    sqrt_ab_prev = tl.load(row + 2, mask=ok, other=nan).to(ACC)
    dir_coef = tl.load(row + 3, mask=ok, other=nan).to(ACC)
    sigma = tl.load(row + 4, mask=ok, other=nan).to(ACC)
    log_sigma = tl.load(row + 5, mask=ok, other=nan).to(ACC)
    return sqrt_ab, sqrt_1m_ab, sqrt_ab_prev, dir_coef, sigma, log_sigma, ok


@triton.jit
def ddim_mean(eu_ptr, ec_ptr, xt_ptr, offs, mask, w, clip, sqrt_ab, sqrt_1m_ab, sqrt_ab_prev,
              dir_coef, HAS_UNCOND: tl.constexpr, CLIP: tl.constexpr, ACC: tl.constexpr):
    """(μ, unclamped x̂0) of the elements at offs, in the reference's order:
    ε̂ = ε_u + w(ε_c − ε_u); x̂0 = (x_t − √(1−ᾱ)ε̂)/√ᾱ; μ = √ᾱ'·clamp(x̂0) + c·ε̂."""
    eps = to_acc(tl.load(ec_ptr + offs, mask=mask, other=0.0), ACC)
    if HAS_UNCOND:
        eu = to_acc(tl.load(eu_ptr + offs, mask=mask, other=0.0), ACC)
        eps = eu + tl.full((), w, ACC) * (eps - eu)
    x_t = to_acc(tl.load(xt_ptr + offs, mask=mask, other=0.0), ACC)
    x0 = div(x_t - sqrt_1m_ab * eps, sqrt_ab)
    x0_used = x0
    if CLIP:
        r = tl.full((), clip, ACC)
        x0_used = tl.where(x0 < -r, -r, tl.where(x0 > r, r, x0))  # torch.clamp; NaN stays NaN
    return sqrt_ab_prev * x0_used + dir_coef * eps, x0


@triton.jit
def gaussian_log_density_sum(x_prev, mu, mask, sigma, log_sigma, ACC: tl.constexpr):
    """Σ over the chunk's valid elements of log N(x'; μ, σ²), in fp64, ordered exactly as
    reference.gaussian_logprob; 0 when σ = 0 (deterministic step, log p = 0)."""
    stochastic = sigma > 0
    safe_sigma = tl.where(stochastic, sigma, 1.0)
    diff = x_prev - mu
    elem = div(-(diff * diff), 2 * safe_sigma * safe_sigma) - log_sigma \
        - tl.full((), HALF_LOG_2PI, ACC)
    partial = tl.sum(tl.where(mask, elem.to(tl.float64), 0.0), axis=0)
    return tl.where(stochastic, partial, 0.0)
