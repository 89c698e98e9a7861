"""Triton kernel of the fork by index (spec: b2fast.ops.reference.fork_index): out[i] =
latents[index[i]] cast to out's dtype, written into a preallocated buffer.

Each (row, chunk) program reads index[i] on the device, then that chunk of latents[index[i]],
and writes it cast with torch's rounding. No allocation, no host sync. An index outside [0, P)
reads no memory: its row is NaN (and a device assert fires in Triton's debug mode).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from b2fast.kernels._common import (LAUNCH_OPTIONS, acc_type, autotune_blocks, cast_to,
                                    compute_dtype, to_acc)


@autotune_blocks()
@triton.jit
def _fork_index_kernel(src_ptr, idx_ptr, out_ptr, trunks, per_sample,
                       ACC: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    local = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = local < per_sample
    row = tl.load(idx_ptr + i)
    ok = (row >= 0) & (row < trunks)
    tl.device_assert(ok, "fork_index: index out of range: need 0 <= index < latents.shape[0]")
    value = to_acc(tl.load(src_ptr + tl.where(ok, row, 0) * per_sample + local, mask=mask & ok),
                   ACC)
    value = tl.where(ok, value, float("nan"))
    tl.store(out_ptr + i * per_sample + local, cast_to(value, out_ptr.dtype.element_ty), mask=mask)


def fork_index_out(latents, index, out):
    """out[i] = latents[index[i]] cast to out.dtype. In place."""
    want = (index.shape[0], *latents.shape[1:]) if index.dim() == 1 else None
    if latents.dim() < 1 or want is None or index.dtype != torch.int64 \
            or out.shape != want or not out.is_floating_point():
        raise ValueError(f"fork_index_out: need latents (P, ...), index (M,) int64 and out "
                         f"(M, ...) float; got {tuple(latents.shape)}, {tuple(index.shape)} "
                         f"{index.dtype}, {tuple(out.shape)} {out.dtype}")
    if out.numel() and torch._C._overlaps(out, latents):
        raise ValueError("fork_index_out: out must not overlap latents")
    src = latents.contiguous()
    dst = out if out.is_contiguous() else torch.empty(out.shape, dtype=out.dtype, device=out.device)
    per_sample = out[0].numel() if out.shape[0] else 0
    if per_sample:
        grid = lambda meta: (index.shape[0], triton.cdiv(per_sample, meta["BLOCK"]))  # noqa: E731
        _fork_index_kernel[grid](src, index.contiguous(), dst, src.shape[0], per_sample,
                                 ACC=acc_type(compute_dtype(src)), **LAUNCH_OPTIONS)
    if dst is not out:
        out.copy_(dst)
