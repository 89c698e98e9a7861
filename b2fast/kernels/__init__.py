"""Triton kernels of b2fast, one op per file (``b2fast/kernels/<op>.py``).

Only :mod:`b2fast.ops` imports them; each is tested against its reference in
:mod:`b2fast.ops.reference` (on CPU under ``TRITON_INTERPRET=1``).

Entry points: ``ddim_step.ddim_step_with_logprob``, ``ddim_logprob.ddim_logprob_forward``,
``ddim_logprob.ddim_logprob_backward``, ``branch_fork.branch_fork_out`` and
``fork_index.fork_index_out``; ``_common`` holds what they share (dtype rules, the table row, μ,
and the deterministic log p reduction).
"""
