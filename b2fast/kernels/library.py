"""The Triton kernels as torch ops ``torch.ops.b2fast_triton.<op>``, with the schemas of the
compiled ops ``torch.ops.b2fast.<op>`` (csrc/), so :mod:`b2fast.ops` calls both the same way.

Why torch ops and not plain functions: ``torch.compile`` then treats each kernel as one opaque
node (fake implementations below give its output shapes), so a compiled denoising step has no
graph break, and ``torch.library.opcheck`` can check them like the C++ ops.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from b2fast.kernels import branch_fork, ddim_logprob, ddim_step, fork_index
from b2fast.kernels._common import compute_dtype


def _reduction(reduce_mean: bool) -> str:
    return "mean" if reduce_mean else "sum"


@torch.library.custom_op("b2fast_triton::ddim_step_with_logprob", mutates_args=())
def ddim_step_with_logprob(eps_uncond: Optional[Tensor], eps_cond: Tensor, guidance_scale: float,
                           x_t: Tensor, noise: Tensor, table: Tensor, step_index: Tensor,
                           out_dtype: torch.dtype, clip_sample_range: Optional[float],
                           reduce_mean: bool) -> tuple[Tensor, Tensor]:
    return ddim_step.ddim_step_with_logprob(eps_uncond, eps_cond, guidance_scale, x_t, noise,
                                            table, step_index, out_dtype, clip_sample_range,
                                            _reduction(reduce_mean))


@ddim_step_with_logprob.register_fake
def _(eps_uncond, eps_cond, guidance_scale, x_t, noise, table, step_index, out_dtype,
      clip_sample_range, reduce_mean):
    return (eps_cond.new_empty(eps_cond.shape, dtype=out_dtype),
            eps_cond.new_empty(eps_cond.shape[:1], dtype=compute_dtype(eps_cond)))


@torch.library.custom_op("b2fast_triton::ddim_logprob", mutates_args=())
def ddim_logprob_op(eps_uncond: Optional[Tensor], eps_cond: Tensor, guidance_scale: float,
                    x_t: Tensor, x_prev: Tensor, table: Tensor, step_index: Tensor,
                    clip_sample_range: Optional[float], reduce_mean: bool) -> Tensor:
    return ddim_logprob.ddim_logprob_forward(eps_uncond, eps_cond, guidance_scale, x_t, x_prev,
                                             table, step_index, clip_sample_range,
                                             _reduction(reduce_mean))


@ddim_logprob_op.register_fake
def _(eps_uncond, eps_cond, guidance_scale, x_t, x_prev, table, step_index, clip_sample_range,
      reduce_mean):
    return eps_cond.new_empty(eps_cond.shape[:1], dtype=compute_dtype(eps_cond))


@torch.library.custom_op("b2fast_triton::ddim_logprob_backward", mutates_args=())
def ddim_logprob_backward(grad_log_prob: Tensor, eps_uncond: Optional[Tensor], eps_cond: Tensor,
                          guidance_scale: float, x_t: Tensor, x_prev: Tensor, table: Tensor,
                          step_index: Tensor, clip_sample_range: Optional[float],
                          reduce_mean: bool) -> tuple[Tensor, Tensor]:
    """(grad ε_u, grad ε_c); grad ε_u is an empty (0,) tensor without ε_u, as in the C++ op."""
    grad_uncond, grad_cond = ddim_logprob.ddim_logprob_backward(
        grad_log_prob, eps_uncond, eps_cond, guidance_scale, x_t, x_prev, table, step_index,
        clip_sample_range, _reduction(reduce_mean))
    if grad_uncond is None:
        grad_uncond = eps_cond.new_empty((0,))
    return grad_uncond, grad_cond


@ddim_logprob_backward.register_fake
def _(grad_log_prob, eps_uncond, eps_cond, guidance_scale, x_t, x_prev, table, step_index,
      clip_sample_range, reduce_mean):
    grad_uncond = eps_cond.new_empty((0,)) if eps_uncond is None else torch.empty_like(eps_uncond)
    return grad_uncond, torch.empty_like(eps_cond)


@torch.library.custom_op("b2fast_triton::branch_fork_out", mutates_args=("out", "group_ids"))
def branch_fork_out(latents: Tensor, branches: int, out: Tensor, group_ids: Tensor) -> None:
    branch_fork.branch_fork_out(latents, branches, out, group_ids)


@branch_fork_out.register_fake
def _(latents, branches, out, group_ids):
    return None


@torch.library.custom_op("b2fast_triton::fork_index_out", mutates_args=("out",))
def fork_index_out(latents: Tensor, index: Tensor, out: Tensor) -> None:
    fork_index.fork_index_out(latents, index, out)


@fork_index_out.register_fake
def _(latents, index, out):
    return None
