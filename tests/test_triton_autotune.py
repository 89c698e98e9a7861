"""The Triton kernels under the autotuner as it runs on a GPU: several block configs, each rerun to be
timed before the best one runs. Timing reruns a kernel on the real arguments, so ``ddim_step_with_logprob``
with ``out`` aliasing ``x_t`` must have its input restored after each rerun (``restore_value``) and the
per-chunk partial sums must be zeroed before the final run (``reset_to_zero``), or the step is applied
several times and a smaller block's chunks are summed into a larger one's log p.

Without a GPU the interpreter runs one block config (the autotuner then times nothing); here the GPU
configs are installed on CPU tensors under TRITON_INTERPRET=1 with a stand-in timer that runs each
config three times and makes the first timed config win: the largest block, timed first, so that the
last one timed, the smallest, leaves the most chunks behind.
"""
from __future__ import annotations

import pytest
import torch

from b2fast import ops
from b2fast.core.schedule import build_step_table
from diffusers import DDIMScheduler

SHAPE = (3, 4, 32, 32)  # 4096 elements per sample: every GPU block config is tried


@pytest.fixture()
def gpu_autotuning(monkeypatch, skip_backend):
    """Every Triton kernel autotunes over the GPU block configs, largest first; returns the timings."""
    if "triton" not in ops.available_backends("ddim_step_with_logprob", "cpu"):
        skip_backend("triton", "cpu", "the Triton kernels do not run here (TRITON_INTERPRET=1 and triton needed)")
    from b2fast.kernels import _common, branch_fork, ddim_logprob, ddim_step, fork_index

    timed = []

    def timer(kernel_call, quantiles=None, **_):
        for _ in range(3):
            kernel_call()
        timed.append(len(timed))
        return [float(timed[-1])] * (len(quantiles) if quantiles else 1)

    configs = sorted(_common.GPU_BLOCK_CONFIGS, key=lambda c: -c.kwargs["BLOCK"])
    monkeypatch.setattr(_common, "MIN_BLOCK", min(c.kwargs["BLOCK"] for c in configs))
    for kernel in (ddim_step._ddim_step_kernel, ddim_logprob._logprob_fwd_kernel, ddim_logprob._logprob_bwd_kernel,
                   branch_fork._branch_fork_kernel, fork_index._fork_index_kernel):
        monkeypatch.setattr(kernel, "configs", configs)
        monkeypatch.setattr(kernel, "cache", {})
        monkeypatch.setitem(kernel.__dict__, "do_bench", timer)
    with ops.use_backend("triton"):
        yield timed


def _inputs(seed: int):
    gen = torch.Generator().manual_seed(seed)
    eps_u, eps_c, x_t, noise = (torch.randn(SHAPE, generator=gen) for _ in range(4))
    table = build_step_table(DDIMScheduler(), 10, 1.0).table.float()
    return eps_u, eps_c, x_t, noise, table, torch.tensor([0, 4, 9])


def test_a_step_written_over_its_input_is_applied_once_and_its_log_p_sums_one_partition(gpu_autotuning):
    eps_u, eps_c, x_t, noise, table, step = _inputs(0)
    with ops.use_backend("torch"):
        want_x, want_lp = ops.ddim_step_with_logprob(eps_u, eps_c, 5.0, x_t, noise, table, step, torch.float32)
    from b2fast.kernels.ddim_step import ddim_step_with_logprob

    x = x_t.clone()
    got_x, got_lp = ddim_step_with_logprob(eps_u, eps_c, 5.0, x, noise, table, step, torch.float32, out=x)
    assert len(gpu_autotuning) == 4  # all four configs were timed, three runs each
    assert got_x.data_ptr() == x.data_ptr() and torch.equal(got_x, want_x)
    torch.testing.assert_close(got_lp, want_lp, rtol=1e-6, atol=1e-6)


def test_log_p_and_its_gradient_and_the_forks_are_exact_after_autotuning(gpu_autotuning):
    eps_u, eps_c, x_t, noise, table, step = _inputs(1)
    with ops.use_backend("torch"):
        x_prev, _ = ops.ddim_step_with_logprob(eps_u, eps_c, 5.0, x_t, noise, table, step, torch.float32)
    results = []
    for backend in ("torch", "triton"):
        with ops.use_backend(backend):
            leaves = [eps_u.clone().requires_grad_(), eps_c.clone().requires_grad_()]
            log_p = ops.ddim_logprob(*leaves, 5.0, x_t, x_prev, table, step)
            (log_p * torch.tensor([1.0, -2.0, 0.5])).sum().backward()
            index = torch.tensor([2, 0, 0, 1, 2])
            results.append([log_p.detach(), *(leaf.grad for leaf in leaves),
                            ops.branch_fork(x_t, 3, torch.bfloat16)[0], ops.fork_index(x_t, index, torch.bfloat16)])
    assert len(gpu_autotuning) == 4 * 4  # log p forward and backward and both forks timed all four configs
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)

