"""What every suite of ``python -m b2fast.bench`` shares: the device, the timer, summary
statistics, the dense-matmul ceiling and the FLOP counter.

Time: median (and p20, p80) over ``repeats`` calls after ``warmup`` calls; CUDA events on CUDA
(optionally after an L2-flushing write), ``time.perf_counter`` on the CPU. FLOPs: FlopCounterMode
with the fused attention kernels it misses added (2 FLOPs per multiply-add; elementwise ops not
counted)."""
from __future__ import annotations

import math
import platform
import statistics
import sys
import time
from typing import Callable

import torch


def time_calls(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int,
               flush: torch.Tensor | None = None) -> list[float]:
    """Milliseconds of each of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return times
    torch.cuda.synchronize(device)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(repeats)]
    for start, end in events:
        if flush is not None:
            flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) for start, end in events]


def sync(device: torch.device) -> None:
    """Wait for the GPU's queued work (a no-op on the CPU), before reading a wall clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def summarize(times: list[float]) -> dict:
    """median, p20, p80 of a list of times (ms)."""
    q = statistics.quantiles(times, n=5, method="inclusive") if len(times) > 1 else times * 4
    return {"ms": statistics.median(times), "ms_p20": q[0], "ms_p80": q[3]}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def progress(line: str) -> None:
    """One line of progress on stderr (stdout carries the report)."""
    print(f"bench: {line}", file=sys.stderr, flush=True)


def sig(x: float, digits: int = 3) -> str:
    """``x`` to ``digits`` significant digits, never in scientific notation (2950, 0.0123)."""
    if x == 0 or not math.isfinite(x):
        return str(x)
    return f"{x:.{max(0, digits - 1 - math.floor(math.log10(abs(x))))}f}"


def matmul_ceiling(device: torch.device, n: int, warmup: int, repeats: int,
                   dtype: torch.dtype = torch.float32) -> dict:
    """Dense ``a @ b`` of n×n matrices in ``dtype``: the ceiling a model in that dtype runs against
    (float32 for the rewards; the model dtype, float16 by default, for the SD suites on a GPU)."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    ms = summarize(time_calls(lambda: a @ b, device, warmup, repeats))["ms"]
    return {"n": n, "ms": ms, "tflops": 2 * n ** 3 / (ms * 1e-3) / 1e12}


def _native_mha_flops(query, key, value, embed_dim, num_head, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of ``aten._native_multi_head_attention`` (batch first): the inference fast path of
    ``nn.MultiheadAttention`` that open_clip's towers take, which FlopCounterMode does not count
    (ViT-H-14 read 216 of its 335 GFLOP without it): q, k, v and output projections, Q·Kᵀ, P·V."""
    b, lq, e = query
    lk = key[1]
    return 2 * b * e * e * (2 * lq + 2 * lk) + 4 * b * lq * lk * e


def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of the CPU flash attention that ``F.scaled_dot_product_attention`` runs on CPU
    tensors, which FlopCounterMode does not count (its CUDA kernels it does): the same formula."""
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query, key, value)


def _cpu_sdpa_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(grad_out, query, key, value)


def flop_counter_mode():
    """A ``FlopCounterMode`` (not yet entered) that also counts the fused attention of
    ``nn.MultiheadAttention`` and CPU ``scaled_dot_product_attention``, forward and backward.
    Its convention: 2 FLOPs per multiply-add of matmuls, convolutions and attention; elementwise
    ops are not counted."""
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    mapping = {aten._native_multi_head_attention: _native_mha_flops,
               aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
               aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flops}
    return FlopCounterMode(display=False, custom_mapping=mapping)


def flop_count(fn: Callable[[], object]) -> int:
    """FLOPs of one call of ``fn`` counted by :func:`flop_counter_mode` (matmuls, convolutions,
    attention, and the fused attention of ``nn.MultiheadAttention``)."""
    with flop_counter_mode() as counter:
        fn()
    return counter.get_total_flops()
