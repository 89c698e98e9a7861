"""Column layout of the (S, 6) per-step schedule table that every DDIM op reads.

It sits with the kernels, the lowest layer, so that the Triton kernels, the plain-PyTorch
reference (``b2fast.ops.reference.ddim``) and the schedule builder (``b2fast.core.schedule``)
share one definition without an upward import; ``csrc/ddim_math.h`` holds the same order.
"""
SQRT_AB, SQRT_1M_AB, SQRT_AB_PREV, DIR_COEF, SIGMA, LOG_SIGMA = range(6)
TABLE_COLUMNS = 6
