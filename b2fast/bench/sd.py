"""What the ``sample``, ``train`` and ``stage`` suites of ``python -m b2fast.bench`` share.

* The model: SD 1.x with random weights (:func:`b2fast.testing.random_sd.save_random_sd15`; the
  tiny test model with ``--quick``), saved once per process in the model dtype to a temporary
  folder and loaded through :class:`b2fast.core.policy.Policy`, exactly as a user's checkpoint is.
* Two policies, loaded one at a time so each case's peak memory is its own: **b2fast** with the
  config's ``model`` section as given (every fast-path option applies, and gradient
  checkpointing with ``train.gradient_checkpointing``), and the **baseline** with only its path,
  dtype and LoRA fields, attention on PyTorch SDPA and every other field at its default: eager,
  as the research scripts run. Both get the same LoRA initialisation (``seed``).
* One measurement per case (:func:`measure_call`): ``--warmup`` untimed calls, ``--repeats``
  timed calls (CUDA events on cuda, ``time.perf_counter`` on cpu, see
  :func:`b2fast.bench.kernels.time_calls`), the peak CUDA memory allocated during them (weights
  included), the time spent inside one module (the UNet) during the timed calls, and the FLOPs
  of one more, untimed call counted by ``FlopCounterMode`` (:data:`FLOP_CONVENTION`).
* The ceiling: a dense square matmul in the model dtype on cuda (float16 by default), float32
  on cpu, timed in the same run.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import gc
import tempfile
import time
from typing import Callable

import torch

import b2fast
from b2fast.bench.common import device_name, progress, sig, summarize, time_calls
from b2fast.distributed import resolve_device
from b2fast.bench.common import flop_counter_mode, matmul_ceiling
from b2fast.config import Config, ModelConfig, to_dict
from b2fast.utils import one_line

FLOP_CONVENTION = ("FlopCounterMode on one untimed call of the timed function: 2 FLOPs per "
                   "multiply-add of matmuls, convolutions and attention (forward; training also "
                   "counts the backward's); elementwise ops not counted")
MODELS = {False: "SD 1.x architecture with random weights (UNet 860M, VAE 84M, CLIP ViT-L/14 text "
                 "encoder 123M)",
          True: "tiny SD (b2fast.testing.tiny_sd) with random weights"}
DEFAULTS = {  # (warm-up calls, timed calls, ceiling matmul n, trajectories per training call)
    "cuda": (1, 3, 8192, 8), "cpu": (1, 2, 1024, 4), "quick": (1, 2, 256, 2)}

_FOLDERS: dict[tuple, tempfile.TemporaryDirectory] = {}


class _Silent:
    """A progress bar that shows nothing (``policy_update`` sets its total and reports its units to one)."""
    total: int | None = None

    def update(self, n: int) -> None:
        pass

    def refresh(self) -> None:
        pass


SILENT = _Silent()


def start(args) -> torch.device:
    """The suite's device, with the device-dependent defaults of the options left unset filled
    in (the device goes into the config too); says which kernel backends are live."""
    from b2fast import ops

    device = resolve_device(args.device)
    if device.type == "cuda":  # events, synchronize and memory statistics then mean this GPU
        torch.cuda.set_device(device)
    warmup, repeats, matmul_n, trajectories = DEFAULTS["quick" if args.quick else device.type]
    args.warmup = args.warmup or warmup
    args.repeats = args.repeats or repeats
    args.matmul_n = matmul_n
    if hasattr(args, "trajectories"):
        args.trajectories = args.trajectories or trajectories
    args.cfg.device = str(device)
    progress(f"backends {ops.backends(device)}")
    return device


# ----------------------------------------------------------------------------------------------
# The model and the two policies


def model_folder(cfg: Config, quick: bool) -> str:
    """The random-weight model of this run, built once per process (``all`` shares it) into a
    temporary folder removed at exit: SD 1.x saved in ``model.dtype``, or the tiny model."""
    from b2fast.testing.random_sd import save_random_sd15
    from b2fast.testing.tiny_sd import save_tiny_sd

    key = (quick, None if quick else cfg.model.dtype)
    if key not in _FOLDERS:
        folder = tempfile.TemporaryDirectory(prefix="b2fast-bench-sd-")
        progress(f"building {MODELS[quick]}")
        if quick:
            save_tiny_sd(folder.name)
        else:
            save_random_sd15(folder.name, getattr(torch, cfg.model.dtype))
        _FOLDERS[key] = folder
    return _FOLDERS[key].name


def baseline_model_config(model: ModelConfig) -> ModelConfig:
    """``model``'s path, dtype and LoRA; every other field (fast paths) at its default, and
    attention on PyTorch SDPA, diffusers' own default, whatever 'auto' would pick."""
    return ModelConfig(path=model.path, revision=model.revision, dtype=model.dtype,
                       lora_rank=model.lora_rank, lora_alpha=model.lora_alpha,
                       lora_targets=list(model.lora_targets), attention="sdpa")


def load_policy(cfg: Config, folder: str, device: torch.device, baseline: bool):
    """The b2fast policy (``cfg.model`` as given, and gradient checkpointing when
    ``train.gradient_checkpointing``, as the trainer sets it up) or the baseline's (see the
    module doc)."""
    from b2fast.core.policy import Policy

    model = dataclasses.replace(cfg.model, path=folder)
    torch.manual_seed(cfg.seed)  # the same LoRA initialisation for both
    policy = Policy(baseline_model_config(model) if baseline else model, device,
                    cfg.sampling.num_steps, cfg.sampling.eta)
    if cfg.train.gradient_checkpointing and not baseline:
        policy.enable_gradient_checkpointing()
    return policy


def backend_context(cfg: Config):
    """The config's ``backend`` forced around the b2fast measurements (the baseline calls the
    plain-PyTorch reference itself); a backend that cannot run is a one-line error."""
    from b2fast import ops

    if cfg.backend == "auto":
        return contextlib.nullcontext()
    device = None if cfg.device == "auto" else cfg.device  # start() puts the resolved device here
    try:
        with ops.use_backend(cfg.backend, device=device):  # raises here when the backend cannot run
            pass
    except RuntimeError as exc:
        raise ValueError(f"backend: {exc}") from None
    return ops.use_backend(cfg.backend)


def prompts_of(cfg: Config, n: int) -> list[str]:
    """The first ``n`` prompts of the config's prompt set, cycled."""
    from b2fast.prompts import load_prompts

    prompts = load_prompts(cfg.prompts.source, cfg.prompts.split)
    return [prompts[i % len(prompts)] for i in range(n)]


def free(device: torch.device) -> None:
    """Drop what the last case left on the GPU, so the next one's peak memory is its own (CPU
    memory is not measured, and a collection costs ~0.3 s with diffusers loaded)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# Measuring


class ModuleShare:
    """Time and FLOPs inside ``module``'s forward calls while active: the UNet's share of a call.

    Time: CUDA events recorded as each call enters and leaves (GPU time between them) on cuda,
    ``time.perf_counter`` on cpu. FLOPs: the growth of ``counter``'s total during the calls.
    ``module=None`` watches nothing.
    """

    def __init__(self, module: torch.nn.Module | None, device: torch.device, counter=None):
        self.module, self.cuda, self.counter = module, device.type == "cuda", counter
        self.handles: list = []
        self.reset()

    def reset(self) -> None:
        self.spans: list[tuple] = []
        self.flops = 0

    def _mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _enter(self, module, args) -> None:
        self._start = self._mark()
        self._flops_at_start = self.counter.get_total_flops() if self.counter else 0

    def _leave(self, module, args, output) -> None:
        self.spans.append((self._start, self._mark()))
        if self.counter:
            self.flops += self.counter.get_total_flops() - self._flops_at_start

    def ms(self) -> float:
        """Milliseconds inside the module since the last reset."""
        if self.cuda:
            torch.cuda.synchronize()
            return sum(start.elapsed_time(end) for start, end in self.spans)
        return sum(end - start for start, end in self.spans) * 1e3

    def __enter__(self) -> "ModuleShare":
        if self.module is not None:
            self.handles = [self.module.register_forward_pre_hook(self._enter),
                            self.module.register_forward_hook(self._leave)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()


def measure_call(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int,
                 module: torch.nn.Module | None = None,
                 count_fn: Callable[[], object] | None = None) -> dict:
    """``ms``, ``ms_p20``, ``ms_p80`` per call; ``peak_gib`` (cuda, else None); ``flops`` of one
    call of ``count_fn`` (default ``fn``: the same work by a path FlopCounterMode sees, for a
    ``fn`` that replays CUDA graphs); with ``module``, ``module_ms`` (mean per timed call) and
    ``module_flops`` per call. The module is watched during the warm-up too, so a compiled
    module recompiles (if its hooks make it) before the timing starts."""
    free(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    with ModuleShare(module, device) as share:
        for _ in range(warmup):
            fn()
        share.reset()
        stats = summarize(time_calls(fn, device, 0, repeats))
        module_ms = share.ms() / repeats
    stats["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30 \
        if device.type == "cuda" else None
    with flop_counter_mode() as counter, ModuleShare(module, device, counter) as share:
        (count_fn or fn)()
    stats["flops"] = counter.get_total_flops()
    stats.update(module_ms=module_ms if module is not None else None,
                 module_flops=share.flops if module is not None else None)
    return stats


def rate_fields(m: dict, ceiling_tflops: float) -> dict:
    """The record fields of one :func:`measure_call` result: time, peak memory, FLOPs of the
    call, and TFLOP/s of the watched module (its FLOPs over its time: ``flops_of`` 'unet') or,
    without one, of the whole call ('call'), with its % of the ceiling."""
    watched = m["module_flops"] is not None
    flops, ms = (m["module_flops"], m["module_ms"]) if watched else (m["flops"], m["ms"])
    tflops = flops / (ms * 1e-3) / 1e12 if ms > 0 else None
    return {"ms": m["ms"], "ms_p20": m["ms_p20"], "ms_p80": m["ms_p80"], "peak_gib": m["peak_gib"],
            "gflop": m["flops"] / 1e9, "flops_of": "unet" if watched else "call",
            "unet_ms": m["module_ms"], "tflops": tflops,
            "pct_of_ceiling": None if tflops is None else 100 * tflops / ceiling_tflops}


def guarded(what: str, fn: Callable[[], dict], device: torch.device) -> dict:
    """``fn()``, or ``{"error": one line}`` if it raised (an OOM costs its row, not the run)."""
    try:
        return fn()
    except Exception as exc:
        error = one_line(exc, 280)
    progress(f"{what}: FAILED {error}")
    free(device)  # out of the except block: the traceback no longer holds the failed call's tensors
    return {"error": error}


def ceiling(device: torch.device, dtype: str, n: int, warmup: int, repeats: int) -> dict:
    """Dense n×n matmul TFLOP/s in the model dtype on cuda; float32 on cpu, the dtype of
    --quick's models (a bf16 model on a CPU may then exceed 100%)."""
    name = dtype if device.type == "cuda" else "float32"
    result = matmul_ceiling(device, n, max(warmup, 3), max(repeats, 5), getattr(torch, name))
    progress(f"{name} matmul {n}³ {sig(result['tflops'])} TFLOP/s")
    return {"dtype": name, **result}


def measure_methods(args, measure_method) -> tuple[torch.device, dict, list[dict]]:
    """(device, ceiling, records): ``measure_method(folder, device, ceiling_tflops, baseline)``
    for b2fast, then the baseline, each policy freed before the next loads; speed-ups added."""
    device = start(args)
    ceil = ceiling(device, args.cfg.model.dtype, args.matmul_n, args.warmup, args.repeats)
    folder = model_folder(args.cfg, args.quick)
    records = []
    for baseline in (False, True):
        records += measure_method(folder, device, ceil["tflops"], baseline)
        free(device)  # the method's policy (and optimizer), gone with its frame
    add_speedups(records, ("case", "interval"))
    return device, ceil, records


def add_speedups(records: list[dict], keys: tuple[str, ...]) -> None:
    """``speedup_vs_baseline`` = baseline ms / ms of the row with the same ``keys``; 1 for the
    baseline itself; None where either failed."""
    base = {tuple(r[k] for k in keys): r for r in records
            if r["method"] == "baseline" and "error" not in r}
    for r in records:
        if "error" in r:
            continue
        other = base.get(tuple(r[k] for k in keys))
        r["speedup_vs_baseline"] = other["ms"] / r["ms"] if other else None


# ----------------------------------------------------------------------------------------------
# Reporting


def header(suite: str, args, device: torch.device) -> dict:
    """The JSON fields every SD suite starts with."""
    import diffusers

    from b2fast import ops

    return {
        "suite": suite,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device), "device_type": device.type, "torch": torch.__version__,
        "cuda": torch.version.cuda, "diffusers": diffusers.__version__,
        "b2fast": b2fast.__version__, "threads": torch.get_num_threads(),
        "model": MODELS[args.quick], "dtype": args.cfg.model.dtype, "preset": args.config,
        "quick": args.quick, "overrides": list(args.overrides),
        "config": to_dict(args.cfg), "warmup": args.warmup, "repeats": args.repeats,
        "timer": "cuda events" if device.type == "cuda" else "time.perf_counter",
        "flops": FLOP_CONVENTION, "backends": ops.backends(device),
    }


def header_lines(doc: dict, what: str) -> list[str]:
    """Title, versions, model, overrides, ceiling and timing lines of a Markdown report."""
    n = doc["threads"]
    threads = f", {n} thread{'s' * (n != 1)}" if doc["device_type"] == "cpu" else ""
    cuda = f" (CUDA {doc['cuda']})" if doc["device_type"] == "cuda" else ""
    lines = [f"## b2fast {doc['suite']} on {doc['device']} ({doc['device_type']}{threads})", "",
             f"torch {doc['torch']}{cuda}, diffusers {doc['diffusers']}, b2fast {doc['b2fast']}, "
             f"{doc['date']}",
             f"model: {doc['model']}, {doc['dtype']}; {what}",
             f"config: {doc['preset'] or 'defaults'}{' + --quick settings' * doc['quick']}, overrides: "
             f"{' '.join(doc['overrides']) or 'none'}"]
    if "ceiling" in doc:
        c = doc["ceiling"]
        lines.append(f"ceiling: {c['dtype']} matmul {c['n']}³ {sig(c['tflops'])} TFLOP/s, measured "
                     f"in this run; FLOPs: {doc['flops']}")
    n = doc["repeats"]
    lines.append(f"median of {n} call{'s' * (n != 1)} after {doc['warmup']} warm-up ({doc['timer']})")
    return lines


def cell(value, digits: int = 3) -> str:
    return "-" if value is None else sig(value, digits)
