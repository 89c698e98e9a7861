"""Triton kernel of the branch fork (spec: b2fast.ops.reference.branch_fork): trunk latents
(P, ...) → K adjacent branches each, written into preallocated buffers.

Each (trunk, chunk) program reads its chunk once and writes it K times, cast to the cache dtype
with torch's rounding; chunk 0 also writes the K group ids. No allocation, no host sync.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from b2fast.kernels._common import (LAUNCH_OPTIONS, acc_type, autotune_blocks, cast_to,
                                    compute_dtype, to_acc)


@autotune_blocks()
@triton.jit
def _branch_fork_kernel(src_ptr, out_ptr, gid_ptr, branches, per_sample,
                        ACC: tl.constexpr, BLOCK: tl.constexpr):
    g = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    local = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = local < per_sample
    value = cast_to(to_acc(tl.load(src_ptr + g * per_sample + local, mask=mask), ACC),
                    out_ptr.dtype.element_ty)
    for k in range(branches):
        row = g * branches + k
        tl.store(out_ptr + row * per_sample + local, value, mask=mask)
        tl.store(gid_ptr + row, g, mask=chunk == 0)


def branch_fork_out(latents, branches, out, group_ids):
    """out[g*K + k] = latents[g] cast to out.dtype; group_ids[g*K + k] = g. In place."""
    rows = latents.shape[0] * branches
    if branches < 1 or out.shape != (rows, *latents.shape[1:]) or group_ids.shape != (rows,) \
            or group_ids.dtype != torch.int64 or not out.is_floating_point():
        raise ValueError(f"branch_fork_out: need branches >= 1, out {(rows, *latents.shape[1:])} "
                         f"float and group_ids ({rows},) int64; got {branches}, "
                         f"{tuple(out.shape)} {out.dtype}, {tuple(group_ids.shape)} "
                         f"{group_ids.dtype}")
    src = latents.contiguous()
    dst = out if out.is_contiguous() else torch.empty(out.shape, dtype=out.dtype, device=out.device)
    gid = group_ids if group_ids.is_contiguous() else torch.empty_like(group_ids)
    per_sample = src[0].numel() if src.shape[0] else 0
    if rows and per_sample:
        grid = lambda meta: (src.shape[0], triton.cdiv(per_sample, meta["BLOCK"]))  # noqa: E731
        _branch_fork_kernel[grid](src, dst, gid, branches, per_sample,
                                  ACC=acc_type(compute_dtype(src)), **LAUNCH_OPTIONS)
    elif rows:  # zero-size samples: only the group ids carry information
        gid.copy_(torch.arange(src.shape[0], device=gid.device).repeat_interleave(branches))
    if dst is not out:
        out.copy_(dst)
    if gid is not group_ids:
        group_ids.copy_(gid)
