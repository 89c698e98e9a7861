"""The ``kernels`` suite of ``python -m b2fast.bench``: throughput of the elementwise ops.

For each case and each backend live on the device (``ops.available_backends``, forced with
``ops.use_backend``) it reports time per call, achieved GB/s, that as % of the copy bandwidth
measured in the same run, and the speed-up vs the eager ``torch`` reference measured in the
same run. These ops are < 0.01% of the FLOPs, so the unit is bandwidth (docs/algorithm.md,
"Measuring speed").

Inputs (per shape B×C×H×W of one ε half; SD default 40×4×64×64 = 8 prompts × 5 branches, the
UNet batch being 2B for CFG): ε_u, ε_c in ``--dtype``; x_t, x_prev in ``--cache-dtype``; noise
fp32; the 20-step SD 1.x DDIM table (η = 1) in fp32; step indices drawn at random per sample
(training micro-batches mix steps); guidance scale 5.

Bytes, the same count for every backend (what a fused kernel must move, so GB/s ratios are
speed ratios; the reference moves more through its temporaries, which is why it is slower):
every tensor the call reads is counted once in its own dtype, every tensor it writes once —

* ddim_step_with_logprob: read ε_u, ε_c, x_t, noise, table, step index; write x_prev
  (cache dtype) and log p (B fp32).
* ddim_logprob_fwd (inputs not requiring grad): read ε_u, ε_c, x_t, x_prev, table, step index;
  write log p.
* ddim_logprob_fwd_bwd: the forward's bytes, plus the backward's: read ∂L/∂log p (B fp32),
  ε_u, ε_c, x_t, x_prev, table, step index; write ∂L/∂ε_u and ∂L/∂ε_c (ε dtype). Timed as
  ``ddim_logprob`` followed by ``torch.autograd.grad`` w.r.t. both ε halves.
* branch_fork: read the B // K trunk latents (cache dtype); write the (B // K)·K forked
  latents (cache dtype) and their group ids (int64). Timed with preallocated ``out=`` buffers.
* fork_index: resample B particles (FK steering): read the index (B int64, drawn uniformly
  with repeats) and B rows of the latents (cache dtype); write the B resampled latents (cache
  dtype). Timed with a preallocated ``out=`` buffer; the torch reference is
  ``index_select`` + ``.to`` + ``copy_``.

Copy bandwidth: ``dst.copy_(src)`` of a ``--copy-mib`` fp32 tensor, read + write bytes / time.

Time: median (and p20, p80) over ``--repeats`` calls after ``--warmup`` calls. On CUDA each
call is bracketed by CUDA events and preceded by a 256 MiB write that flushes the L2 cache
(inputs of the SD shape would otherwise sit in H100's 50 MB L2), as ``triton.testing.do_bench``
does; on the CPU, ``time.perf_counter`` (the ops are synchronous there).

JSON (``--json``): ``suite``, ``date`` (UTC ISO 8601), ``device``, ``device_type``, ``torch``,
``cuda`` (torch's CUDA version or null), ``b2fast``, ``threads``, ``eps_dtype``,
``cache_dtype``, ``noise_dtype``, ``steps``, ``branches``, ``warmup``, ``repeats``, ``timer``,
``backends`` (``ops.backends(device)``), ``copy`` {``bytes``, ``ms``, ``gbps``} and ``records``,
one per case × backend × shape: ``case``, ``op``, ``backend``, ``shape`` (list), ``label``,
``bytes``, ``ms`` (median), ``ms_p20``, ``ms_p80``, ``gbps``, ``pct_of_copy``,
``speedup_vs_torch`` — or, for a kernel that raised, ``error`` (one line) instead of the
timings: the run goes on, the row says "failed" and the exit code is 1.
"""
from __future__ import annotations

import argparse
import datetime
import sys
from dataclasses import dataclass
from typing import Callable

import torch

import b2fast
from b2fast import ops
from b2fast.bench.common import device_name, progress, sig, summarize, time_calls
from b2fast.distributed import resolve_device
from b2fast.utils import one_line

NUM_STEPS, ETA, GUIDANCE = 20, 1.0, 5.0  # SD sampling as in the default config
L2_FLUSH_BYTES = 256 * 2 ** 20            # > any GPU's L2 (H100: 50 MB)
DEFAULTS = {  # (warmup, repeats, copy MiB)
    "cuda": (10, 100, 1024), "cpu": (3, 20, 256), "quick": (1, 3, 16)}


@dataclass
class Case:
    """One timed call: ``fn()`` runs the op once on prebuilt inputs; ``bytes`` as documented."""

    name: str
    op: str            # the ops-layer name (for available_backends)
    label: str         # shape column of the table
    shape: tuple[int, ...]
    bytes: int
    fn: Callable[[], object]


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def sd_step_table(device: torch.device) -> torch.Tensor:
    """The (20, 6) fp32 DDIM table of SD 1.x's scheduler config, η = 1."""
    from diffusers import DDIMScheduler

    from b2fast.core.schedule import build_step_table
    from b2fast.testing.tiny_sd import SD_SCHEDULER
    return build_step_table(DDIMScheduler(**SD_SCHEDULER), NUM_STEPS, ETA).table.to(
        device, torch.float32)


# ----------------------------------------------------------------------------------------------
# Cases


def _step_cases(shape, eps_dtype, cache_dtype, table, device, gen) -> list[Case]:
    """The sampling step and the log-prob forward and forward+backward on one shape."""
    B = shape[0]
    eps_u = torch.randn(shape, generator=gen, device=device).to(eps_dtype)
    eps_c = torch.randn(shape, generator=gen, device=device).to(eps_dtype)
    x_t = torch.randn(shape, generator=gen, device=device).to(cache_dtype)
    noise = torch.randn(shape, generator=gen, device=device)
    step = torch.randint(0, NUM_STEPS, (B,), generator=gen, device=device)
    with ops.use_backend("torch"):  # a realistic x_prev: the step's own sample
        x_prev, log_p = ops.ddim_step_with_logprob(eps_u, eps_c, GUIDANCE, x_t, noise, table, step,
                                                   cache_dtype)
    grad_u, grad_c = (t.detach().clone().requires_grad_(True) for t in (eps_u, eps_c))
    grad_out = torch.ones_like(log_p)
    label = "x".join(map(str, shape))

    def fwd_bwd():
        lp = ops.ddim_logprob(grad_u, grad_c, GUIDANCE, x_t, x_prev, table, step)
        return torch.autograd.grad(lp, (grad_u, grad_c), grad_out)

    step_bytes = nbytes(eps_u, eps_c, x_t, noise, table, step, x_prev, log_p)
    fwd_bytes = nbytes(eps_u, eps_c, x_t, x_prev, table, step, log_p)
    bwd_bytes = nbytes(grad_out, eps_u, eps_c, x_t, x_prev, table, step, eps_u, eps_c)
    return [
        Case("ddim_step_with_logprob", "ddim_step_with_logprob", label, shape, step_bytes,
             lambda: ops.ddim_step_with_logprob(eps_u, eps_c, GUIDANCE, x_t, noise, table, step,
                                                cache_dtype)),
        Case("ddim_logprob_fwd", "ddim_logprob", label, shape, fwd_bytes,
             lambda: ops.ddim_logprob(eps_u, eps_c, GUIDANCE, x_t, x_prev, table, step)),
        Case("ddim_logprob_fwd_bwd", "ddim_logprob", label, shape, fwd_bytes + bwd_bytes, fwd_bwd),
    ]


def _fork_case(shape, branches, cache_dtype, device, gen) -> Case:
    """branch_fork of B // K trunks (at least 1) into K branches each, into preallocated buffers."""
    trunks = max(1, shape[0] // branches)
    latents = torch.randn((trunks, *shape[1:]), generator=gen, device=device).to(cache_dtype)
    out = torch.empty((trunks * branches, *shape[1:]), dtype=cache_dtype, device=device)
    group_ids = torch.empty(trunks * branches, dtype=torch.int64, device=device)
    label = "x".join(map(str, latents.shape)) + f" K={branches}"
    return Case("branch_fork", "branch_fork", label, tuple(latents.shape),
                nbytes(latents, out, group_ids),
                lambda: ops.branch_fork(latents, branches, cache_dtype, out=out,
                                        group_ids=group_ids))


def _fork_index_case(shape, cache_dtype, device, gen) -> Case:
    """fork_index of B particles into B resampled ones (random indices with repeats), into a
    preallocated buffer."""
    latents = torch.randn(shape, generator=gen, device=device).to(cache_dtype)
    index = torch.randint(0, shape[0], (shape[0],), generator=gen, device=device)
    out = torch.empty_like(latents)
    return Case("fork_index", "fork_index", "x".join(map(str, shape)), tuple(shape),
                nbytes(index, latents, out),
                lambda: ops.fork_index(latents, index, cache_dtype, out=out))


def build_cases(args, shape, eps_dtype, cache_dtype, table, device) -> list[Case]:
    gen = torch.Generator(device).manual_seed(0)
    cases = _step_cases(shape, eps_dtype, cache_dtype, table, device, gen)
    cases.append(_fork_case(shape, args.branches, cache_dtype, device, gen))
    cases.append(_fork_index_case(shape, cache_dtype, device, gen))
    return [c for c in cases if c.name in args.ops]


# ----------------------------------------------------------------------------------------------
# Timing


def gbps(num_bytes: int, ms: float) -> float:
    return num_bytes / (ms * 1e-3) / 1e9


def copy_bandwidth(device: torch.device, mib: int, warmup: int, repeats: int) -> dict:
    """Read + write GB/s of ``dst.copy_(src)`` on an fp32 tensor of ``mib`` MiB."""
    src = torch.ones(mib * 2 ** 20 // 4, device=device)
    dst = torch.empty_like(src)
    ms = summarize(time_calls(lambda: dst.copy_(src), device, warmup, repeats))["ms"]
    moved = 2 * nbytes(src)
    return {"bytes": moved, "ms": ms, "gbps": gbps(moved, ms)}


# ----------------------------------------------------------------------------------------------
# The run


def backends_to_run(op: str, device: torch.device, requested: list[str] | None) -> list[str]:
    """torch first (the baseline), then the other live backends (triton on cpu only if named)."""
    live = ops.available_backends(op, device)
    if requested is None:
        chosen = [b for b in live if not (b == "triton" and device.type == "cpu")]
    else:
        chosen = [b for b in live if b in requested]
        for name in requested:
            if name not in live:
                print(f"bench: {name} has no live kernel for {op} on {device.type}: skipped "
                      f"(b2fast.backends(): {ops.backends(device)[op]})", file=sys.stderr)
    return ["torch"] + [b for b in chosen if b != "torch"]


def _time_backend(case: Case, backend: str, device, args, flush) -> dict:
    """The timing stats of ``case`` forced onto ``backend``, or {"error": ...} if a kernel
    raised (a broken kernel must not lose a long run's other rows; the baseline must work)."""
    try:
        with ops.use_backend(backend):
            return summarize(time_calls(case.fn, device, args.warmup, args.repeats, flush))
    except Exception as exc:
        if backend == "torch":
            raise
        return {"error": one_line(exc)}


def measure_case(case: Case, device, args, flush, copy_gbps: float, progress) -> list[dict]:
    """One record per backend; the torch reference first, it is the baseline."""
    records = []
    for backend in backends_to_run(case.op, device, args.backends):
        record = {"case": case.name, "op": case.op, "backend": backend,
                  "shape": list(case.shape), "label": case.label, "bytes": case.bytes,
                  **_time_backend(case, backend, device, args, flush)}
        head = f"{case.name:<24} {backend:<7} {case.label:<18}"
        if "error" in record:
            progress(f"{head} FAILED {record['error']}")
        else:
            rate = gbps(case.bytes, record["ms"])
            record.update(gbps=rate, pct_of_copy=100 * rate / copy_gbps,
                          speedup_vs_torch=records[0]["ms"] / record["ms"] if records else 1.0)
            progress(f"{head} {sig(record['ms'])} ms {sig(rate)} GB/s")
        records.append(record)
    return records


def _fill_defaults(args: argparse.Namespace, device: torch.device) -> None:
    warmup, repeats, copy_mib = DEFAULTS["quick" if args.quick else device.type]
    args.warmup = args.warmup or warmup
    args.repeats = args.repeats or repeats
    args.copy_mib = args.copy_mib or copy_mib
    args.dtype = args.dtype or ("float16" if device.type == "cuda" else "float32")


def measure(args: argparse.Namespace) -> dict:
    """Run the suite; the JSON document (header and records) described in the module doc."""
    device = resolve_device(args.device)
    _fill_defaults(args, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    progress(f"backends {ops.backends(device)}")
    eps_dtype, cache_dtype = getattr(torch, args.dtype), getattr(torch, args.cache_dtype)
    copy = copy_bandwidth(device, args.copy_mib, args.warmup, args.repeats)
    progress(f"copy bandwidth {sig(copy['gbps'])} GB/s")
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=device) \
        if device.type == "cuda" else None
    table = sd_step_table(device)
    records = []
    for shape in args.shapes:
        for case in build_cases(args, shape, eps_dtype, cache_dtype, table, device):
            records += measure_case(case, device, args, flush, copy["gbps"], progress)
    return {
        "suite": "kernels",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device), "device_type": device.type, "torch": torch.__version__,
        "cuda": torch.version.cuda, "b2fast": b2fast.__version__,
        "threads": torch.get_num_threads(), "eps_dtype": args.dtype,
        "cache_dtype": args.cache_dtype, "noise_dtype": "float32", "steps": NUM_STEPS,
        "branches": args.branches, "warmup": args.warmup, "repeats": args.repeats,
        "timer": "cuda events, L2 flushed" if device.type == "cuda" else "time.perf_counter",
        "backends": ops.backends(device), "copy": copy, "records": records,
    }


def format_report(doc: dict) -> str:
    """The Markdown table, headed by device, versions, settings and the copy bandwidth."""
    n = doc["threads"]
    threads = f", {n} thread{'s' * (n != 1)}" if doc["device_type"] == "cpu" else ""
    cuda = f" (CUDA {doc['cuda']})" if doc["device_type"] == "cuda" else ""
    lines = [
        f"## b2fast kernels on {doc['device']} ({doc['device_type']}{threads})",
        "",
        f"torch {doc['torch']}{cuda}, b2fast {doc['b2fast']}, {doc['date']}",
        f"copy bandwidth {sig(doc['copy']['gbps'])} GB/s (fp32 .copy_ of "
        f"{doc['copy']['bytes'] // 2 // 2 ** 20} MiB, read + write)",
        f"eps {doc['eps_dtype']}, cache {doc['cache_dtype']}, noise {doc['noise_dtype']}, "
        f"{doc['steps']}-step table, mixed step indices; median of {doc['repeats']} calls after "
        f"{doc['warmup']} warm-up ({doc['timer']}); bytes: each tensor read or written once",
        "",
        "| op | backend | shape | ms | GB/s | % of copy | × vs torch |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in doc["records"]:
        if "error" in r:
            lines.append(f"| {r['case']} | {r['backend']} | {r['label']} | failed: "
                         f"{r['error'][:60]} | | | |")
            continue
        lines.append(f"| {r['case']} | {r['backend']} | {r['label']} | {sig(r['ms'])} | "
                     f"{sig(r['gbps'])} | {sig(r['pct_of_copy'])} | "
                     f"{sig(r['speedup_vs_torch'])} |")
    return "\n".join(lines)
