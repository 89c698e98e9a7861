"""Plain-PyTorch references of every op: the spec that kernels, tests and benchmarks follow."""
from b2fast.ops.reference.ddim import (branch_fork, cfg_combine, ddim_logprob, ddim_mean,
                                       ddim_step_with_logprob, fork_index, gaussian_logprob)

__all__ = ["branch_fork", "cfg_combine", "ddim_logprob", "ddim_mean", "ddim_step_with_logprob",
           "fork_index", "gaussian_logprob"]
