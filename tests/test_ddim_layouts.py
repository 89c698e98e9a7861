"""The DDIM ops on inputs in other memory layouts than contiguous NCHW: channels_last (what a
channels_last UNet returns, ``model.channels_last``) and strided views. Every backend must give
what the same values give when contiguous, forward and backward: the compiled backends the same
bits (they read a contiguous copy, and a sample's bits never depend on its layout), the
reference within rounding (PyTorch may sum a channels_last tensor in another order).
"""
from __future__ import annotations

import pytest
import torch
from test_ddim_step import backend, schedule  # noqa: F401  (backend: the fixture)

from b2fast import ops


def _every_other_column(t: torch.Tensor) -> torch.Tensor:
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
    wide[..., ::2] = t
    return wide[..., ::2]


LAYOUTS = {"channels_last": lambda t: t.contiguous(memory_format=torch.channels_last),
           "transposed": lambda t: t.transpose(-1, -2).contiguous().transpose(-1, -2),
           "every other column": _every_other_column}


def _same(actual: torch.Tensor, expected: torch.Tensor, exact: bool) -> None:
    if exact:
        assert torch.equal(actual, expected), (actual - expected).abs().max()
    else:
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_ddim_ops_give_the_same_results_in_any_memory_layout(backend, layout, dtype):
    gen = torch.Generator().manual_seed(len(layout) * 7 + (dtype == torch.bfloat16))
    table = schedule(10, 1.0)[0].float()
    shape = (3, 4, 5, 7)
    eps_u, eps_c, x_t, noise = (torch.randn(shape, generator=gen).to(dtype) for _ in range(4))
    step = torch.tensor([0, 4, 9])
    relaid = [LAYOUTS[layout](t) for t in (eps_u, eps_c, x_t, noise)]
    assert not any(t.is_contiguous() for t in relaid)
    table, step = backend.to(table, step)
    exact = backend != "torch"

    plain = ops.ddim_step_with_logprob(*backend.to(eps_u, eps_c), 5.0, *backend.to(x_t, noise), table, step, dtype)
    other = ops.ddim_step_with_logprob(*backend.to(*relaid[:2]), 5.0, *backend.to(*relaid[2:]), table, step, dtype)
    for a, b in zip(other, plain):
        _same(a.cpu(), b.cpu(), exact)

    x_prev = plain[0]
    grads = []
    for inputs in ((eps_u, eps_c), relaid[:2]):
        leaves = [t.to(backend.device).detach().requires_grad_() for t in inputs]
        x = backend.to(relaid[2] if inputs is relaid[:2] else x_t)
        log_prob = ops.ddim_logprob(*leaves, 5.0, x, x_prev, table, step, None, "mean")
        (log_prob * torch.tensor([1.0, -2.0, 0.5], device=log_prob.device)).sum().backward()
        grads.append([log_prob.detach()] + [leaf.grad for leaf in leaves])
    for a, b in zip(grads[1], grads[0]):
        assert a.shape == b.shape and a.dtype == b.dtype
        _same(a.cpu(), b.cpu(), exact)
