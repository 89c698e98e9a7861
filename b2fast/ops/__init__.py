"""The op layer: one public function per op; it picks the backend, nothing above it knows which.

Backends, best first (docs/algorithm.md, "Kernel backends"):

=========  ==========================================================  ================
name       what                                                        serves tensors on
=========  ==========================================================  ================
``cuda``   CUDA kernels of the compiled extension ``b2fast._C``        cuda
``triton`` Triton kernels in ``b2fast.kernels``                       cuda (cpu: tests)
``cpp``    C++ CPU kernels of ``b2fast._C``                            cpu
``torch``  the plain-PyTorch reference (:mod:`b2fast.ops.reference`)      any
=========  ==========================================================  ================

By default each call takes the best backend that has a kernel for the op on the tensors'
device, else the reference. Under ``TRITON_INTERPRET=1`` the Triton kernels also run on CPU
tensors (slowly, for tests); they are then used on the CPU only when forced. ``B2FAST_BACKEND=<name>`` or :func:`set_backend` forces one backend
(ops it has no kernel for at all use the reference); if the forced backend cannot serve a call,
the call raises a one-line error saying why. :func:`backends` says what is live.

The compiled ops are reached as ``torch.ops.b2fast.<op>``, have Meta kernels and pass
``torch.library.opcheck``. The step index stays a device tensor: no op reads it on the host.
``cfg_combine`` has no kernel of its own: every kernel fuses it into the step it feeds.
"""
from __future__ import annotations

import contextlib
import functools
import os
import warnings

import torch

from b2fast.ops import reference

KNOWN_BACKENDS = ("cuda", "triton", "cpp", "torch")  # preference order
_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}
_SERVES = {"cuda": "cuda", "triton": "cuda", "cpp": "cpu"}  # device type each kernel backend serves


def _load_extension():
    """Import b2fast._C; on any failure warn once (this runs once per process) and carry on."""
    try:
        from b2fast import _C
        return _C, ""
    except Exception as exc:  # missing, or built against another torch (undefined symbols)
        reason = f"b2fast._C not loaded ({type(exc).__name__}: {exc})"
        warnings.warn(f"{reason}; using the PyTorch reference ops. Build it with "
                      "`pip install --no-build-isolation -e .`", RuntimeWarning, stacklevel=3)
        return None, reason


_C, _C_ERROR = _load_extension()
_forced: str | None = None
_forced_by = ""


def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


@functools.lru_cache(maxsize=None)
def _load_triton() -> str:
    """Register the Triton kernels as ``torch.ops.b2fast_triton.*``; returns why not, or ''.
    Runs on first use: triton is optional and slow to import."""
    try:
        import b2fast.kernels.library  # noqa: F401
    except Exception as exc:  # not installed, or no working backend for this platform
        return f"Triton kernels not importable ({type(exc).__name__}: {exc}); `pip install triton`"
    _register_logprob_autograd("b2fast_triton")
    return ""


# Each kernel backend registers the same op schemas (csrc/*.h) in its own namespace.
_NAMESPACES = {"cuda": "b2fast", "cpp": "b2fast", "triton": "b2fast_triton"}


def _registered(backend: str, op: str):
    """``torch.ops.<namespace>.<op>`` of a kernel backend."""
    return getattr(getattr(torch.ops, _NAMESPACES[backend]), op)


def _clip(clip_sample_range) -> float | None:
    return None if clip_sample_range is None else float(clip_sample_range)


def _ddim_step_kernel(backend: str):
    def call(eps_uncond, eps_cond, guidance_scale, x_t, noise, table, step_index, cache_dtype,
             clip_sample_range, reduction):
        return _registered(backend, "ddim_step_with_logprob")(
            eps_uncond, eps_cond, float(guidance_scale), x_t, noise, table, step_index,
            cache_dtype, _clip(clip_sample_range), reduction == "mean")
    return call


def _ddim_logprob_kernel(backend: str):
    def call(eps_uncond, eps_cond, guidance_scale, x_t, x_prev, table, step_index,
             clip_sample_range, reduction):
        return _registered(backend, "ddim_logprob")(
            eps_uncond, eps_cond, float(guidance_scale), x_t, x_prev, table, step_index,
            _clip(clip_sample_range), reduction == "mean")
    return call


def _branch_fork_kernel(backend: str):
    def call(latents, branches, out, group_ids):
        _registered(backend, "branch_fork_out")(latents, branches, out, group_ids)
    return call


def _branch_fork_reference(latents, branches, out, group_ids):
    forked, groups = reference.branch_fork(latents, branches, out.dtype)
    out.copy_(forked)
    group_ids.copy_(groups)


def _fork_index_kernel(backend: str):
    def call(latents, index, out):
        _registered(backend, "fork_index_out")(latents, index, out)
    return call


def _fork_index_reference(latents, index, out):
    out.copy_(reference.fork_index(latents, index, out.dtype))


def _register_logprob_autograd(namespace: str) -> None:
    """Make ``<namespace>::ddim_logprob`` differentiable through its backward kernel, which
    recomputes μ from the saved inputs (nothing else is kept for backward)."""
    backward_op = getattr(getattr(torch.ops, namespace), "ddim_logprob_backward")

    def setup_context(ctx, inputs, output):
        eps_uncond, eps_cond, w, x_t, x_prev, table, step_index, clip, reduce_mean = inputs
        ctx.has_uncond = eps_uncond is not None
        ctx.save_for_backward(eps_uncond if ctx.has_uncond else eps_cond, eps_cond, x_t, x_prev,
                              table, step_index)
        ctx.scalars = (w, clip, reduce_mean)

    def backward(ctx, grad_log_prob):
        eps_uncond, eps_cond, x_t, x_prev, table, step_index = ctx.saved_tensors
        w, clip, reduce_mean = ctx.scalars
        grad_uncond, grad_cond = backward_op(
            grad_log_prob.contiguous(), eps_uncond if ctx.has_uncond else None, eps_cond, w,
            x_t, x_prev, table, step_index, clip, reduce_mean)
        return (grad_uncond if ctx.has_uncond else None, grad_cond) + (None,) * 7

    torch.library.register_autograd(f"{namespace}::ddim_logprob", backward,
                                    setup_context=setup_context)


if _C is not None and torch._C._dispatch_has_kernel("b2fast::ddim_logprob_backward"):
    _register_logprob_autograd("b2fast")


# op → backend → implementation with the op's public signature (the forks: their out= form).
_IMPLS = {
    "cfg_combine": {"torch": reference.cfg_combine},
    "ddim_step_with_logprob": {**{b: _ddim_step_kernel(b) for b in ("cuda", "triton", "cpp")},
                               "torch": reference.ddim_step_with_logprob},
    "ddim_logprob": {**{b: _ddim_logprob_kernel(b) for b in ("cuda", "triton", "cpp")},
                     "torch": reference.ddim_logprob},
    "branch_fork": {**{b: _branch_fork_kernel(b) for b in ("cuda", "triton", "cpp")},
                    "torch": _branch_fork_reference},
    "fork_index": {**{b: _fork_index_kernel(b) for b in ("cuda", "triton", "cpp")},
                   "torch": _fork_index_reference},
}
# Name of the registered op behind each op (cpp/cuda backends).
_REGISTERED = {"ddim_step_with_logprob": "ddim_step_with_logprob",
               "ddim_logprob": "ddim_logprob", "branch_fork": "branch_fork_out",
               "fork_index": "fork_index_out"}


# ----------------------------------------------------------------------------------------------
# Backend choice


def _backend_unavailable(name: str) -> str | None:
    """Why backend ``name`` cannot run at all in this process, or None if it can."""
    if name not in KNOWN_BACKENDS:
        return f"unknown name; allowed: {', '.join(KNOWN_BACKENDS)}, auto"
    if name == "torch":
        return None
    if name == "triton":
        if not torch.cuda.is_available() and not _triton_interpreting():  # checked first: no slow import
            return ("no CUDA device is visible and the Triton kernels run on CUDA tensors "
                    "(set TRITON_INTERPRET=1 to run them on the CPU, slowly, for tests)")
        return _load_triton() or None
    if _C is None:
        return _C_ERROR
    if name == "cuda" and not _C.has_cuda():
        return "b2fast._C was built without CUDA kernels (see setup.py: needs nvcc)"
    if name == "cuda" and not torch.cuda.is_available():
        return "no CUDA device is visible"
    return None


def _serves(name: str, device_type: str, forced: bool) -> bool:
    """Does kernel backend ``name`` run on ``device_type``?  The Triton interpreter runs on the
    CPU, but only for a forced choice: it is far slower than the C++ kernels."""
    if name == "triton" and device_type == "cpu":
        return forced and _triton_interpreting()
    return _SERVES[name] == device_type


@functools.lru_cache(maxsize=None)
def _kernel_missing(op: str, name: str, device_type: str, forced: bool = False) -> str | None:
    """Why backend ``name`` has no kernel for ``op`` on ``device_type``, or None if it has one."""
    if name == "torch":
        return None
    if name not in _IMPLS[op]:
        return f"no {name} kernel for {op}"
    if not _serves(name, device_type, forced):
        hint = " (set TRITON_INTERPRET=1 to run them on the CPU)" if name == "triton" else ""
        return f"{name} serves {_SERVES[name]} tensors, got {device_type}{hint}"
    if name == "triton" and device_type == "cuda" and not torch.cuda.is_available():
        return "no CUDA device is visible"
    if name in ("cpp", "cuda"):
        key = _DISPATCH_KEYS[device_type]
        registered = f"b2fast::{_REGISTERED[op]}"
        if not torch._C._dispatch_has_kernel(registered):
            return f"b2fast._C has no op {registered} (rebuild: pip install --no-build-isolation -e .)"
        if not torch._C._dispatch_has_kernel_for_dispatch_key(registered, key):
            return f"b2fast._C has no {key} kernel for {op}"
    return None


# Evaluated once while torch.compile traces (its checks call into C++), so a compiled caller
# keeps the backend chosen at compile time.
@torch.compiler.assume_constant_result
def _choose(op: str, device_type: str) -> str:
    """The backend that runs ``op`` on ``device_type`` now (raises if a forced one cannot)."""
    if _forced is not None:
        why = _backend_unavailable(_forced)
        if why is None and _forced in _IMPLS[op]:
            why = _kernel_missing(op, _forced, device_type, forced=True)
        if why is not None:
            raise RuntimeError(f"b2fast.ops.{op}: backend {_forced!r} (forced by {_forced_by}) "
                               f"is not available: {why}")
        return _forced if _forced in _IMPLS[op] else "torch"
    for name in KNOWN_BACKENDS:
        if name in _IMPLS[op] and (name == "torch" or _serves(name, device_type, False)) \
                and _backend_unavailable(name) is None \
                and _kernel_missing(op, name, device_type) is None:
            return name
    raise AssertionError("unreachable: the torch reference serves every op")


def _impl(op: str, tensor: torch.Tensor):
    """The implementation of ``op`` for tensors on ``tensor``'s device."""
    return _IMPLS[op][_choose(op, tensor.device.type)]


def _cannot_serve(name: str, device_type: str) -> str | None:
    """Why forced backend ``name`` runs none of its kernel ops on ``device_type``, or None."""
    missing = [_kernel_missing(op, name, device_type, forced=True) for op in _IMPLS if name in _IMPLS[op]]
    return None if any(why is None for why in missing) else next((why for why in missing if why), None)


def set_backend(name: str | None, by: str = "set_backend()",
                device: torch.device | str | None = None) -> None:
    """Force every op onto backend ``name``; ``None`` or ``"auto"`` restores the default choice.
    ``by`` names who forced it in later error messages. With ``device`` (where the tensors will
    live), a backend that cannot serve that device is refused here too, not at the first op."""
    global _forced, _forced_by
    if name is None or name == "auto":
        _forced, _forced_by = None, ""
        return
    if name not in KNOWN_BACKENDS:
        raise ValueError(f"backend: unknown name {name!r}; allowed: "
                         f"{', '.join(KNOWN_BACKENDS)}, auto")
    why = _backend_unavailable(name)
    if why is None and device is not None:
        why = _cannot_serve(name, torch.device(device).type)
    if why is not None:
        raise RuntimeError(f"backend {name!r} is not available: {why}")
    _forced, _forced_by = name, by


@contextlib.contextmanager
def use_backend(name: str | None, device: torch.device | str | None = None):
    """``with use_backend("cpp"): ...`` forces a backend inside the block, then restores the
    previous choice exactly (including one made by B2FAST_BACKEND)."""
    global _forced, _forced_by
    previous = _forced, _forced_by
    set_backend(name, device=device)
    try:
        yield
    finally:
        _forced, _forced_by = previous


def get_backend() -> str | None:
    """The forced backend name, or None when each op picks the best available."""
    return _forced


def backend_for(op: str, device: torch.device | str = "cpu") -> str:
    """Name of the backend that ``op`` runs on for tensors on ``device``."""
    return _choose(op, torch.device(device).type)


def available_backends(op: str, device: torch.device | str = "cpu") -> list[str]:
    """Every backend that can run ``op`` on ``device`` when forced (tests parametrise over these)."""
    device_type = torch.device(device).type
    return [name for name in KNOWN_BACKENDS
            if name in _IMPLS[op] and _backend_unavailable(name) is None
            and _kernel_missing(op, name, device_type, forced=True) is None]


def backends(device: torch.device | str | None = None) -> dict[str, str]:
    """op → backend that serves it on ``device`` (default: cuda if visible, else cpu), followed by
    why each better backend is not live, e.g. ``'torch (cpp: b2fast._C not loaded (...))'``."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    report = {}
    for op, impls in _IMPLS.items():
        chosen = _choose(op, device.type)
        better = KNOWN_BACKENDS[:KNOWN_BACKENDS.index(chosen)]
        reasons = [f"{name}: {_backend_unavailable(name) or _kernel_missing(op, name, device.type)}"
                   for name in better if name in impls and _SERVES[name] == device.type]
        report[op] = chosen + (f" ({'; '.join(reasons)})" if reasons else "")
    return report


def _set_backend_from_env() -> None:
    """Read B2FAST_BACKEND; an unusable value raises at the first op call, never at import."""
    global _forced, _forced_by
    name = os.environ.get("B2FAST_BACKEND", "").strip().lower()
    if name not in ("", "auto"):
        _forced, _forced_by = name, "B2FAST_BACKEND"


_set_backend_from_env()


# ----------------------------------------------------------------------------------------------
# Argument checks (shapes and dtypes only: no tensor values, so no host sync)


def _check_step_args(op: str, eps_uncond, eps_cond, x_t, other, other_name: str, table,
                     step_index, clip_sample_range, reduction: str) -> None:
    if eps_cond.ndim < 1 or eps_cond.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{op}: eps_cond must be a (B, ...) float tensor, got {eps_cond.dtype} "
                         f"of shape {tuple(eps_cond.shape)}")
    for name, t in (("eps_uncond", eps_uncond), ("x_t", x_t), (other_name, other)):
        if t is not None and t.shape != eps_cond.shape:
            raise ValueError(f"{op}: {name} must have the shape of eps_cond "
                             f"{tuple(eps_cond.shape)}, got {tuple(t.shape)}")
    if table.ndim != 2 or table.shape[1] != reference.ddim.TABLE_COLUMNS:
        raise ValueError(f"{op}: table must be (S, {reference.ddim.TABLE_COLUMNS}) "
                         f"(b2fast.core.schedule.build_step_table), got {tuple(table.shape)}")
    if step_index.dtype != torch.int64 or tuple(step_index.shape) != (eps_cond.shape[0],):
        raise ValueError(f"{op}: step_index must be int64 of shape ({eps_cond.shape[0]},), got "
                         f"{step_index.dtype} of shape {tuple(step_index.shape)}")
    if clip_sample_range is not None and not clip_sample_range > 0:
        raise ValueError(f"{op}: clip_sample_range must be None (no clip) or > 0, got "
                         f"{clip_sample_range}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"{op}: reduction must be 'mean' or 'sum', got {reduction!r}")


def _check_dtype(op: str, name: str, dtype) -> None:
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{op}: {name} must be one of float32, float64, float16, bfloat16, "
                         f"got {dtype}")


# ----------------------------------------------------------------------------------------------
# Public ops (signatures and semantics of b2fast.ops.reference.ddim)


def cfg_combine(eps_uncond: torch.Tensor | None, eps_cond: torch.Tensor,
                guidance_scale: float) -> torch.Tensor:
    """ε̂ = ε_u + w·(ε_c − ε_u); ε_c when ``eps_uncond`` is None."""
    return _impl("cfg_combine", eps_cond)(
        eps_uncond, eps_cond, guidance_scale)


def ddim_step_with_logprob(eps_uncond: torch.Tensor | None, eps_cond: torch.Tensor,
                           guidance_scale: float, x_t: torch.Tensor, noise: torch.Tensor,
                           table: torch.Tensor, step_index: torch.Tensor,
                           cache_dtype: torch.dtype, clip_sample_range: float | None = None,
                           reduction: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
    """One stochastic DDIM sampling step: ``(x_prev in cache_dtype, log p (B,))``.

    log p is computed on the stored (cast) x_prev, in fp32 (fp64 for fp64 eps). Sampling only:
    the compiled kernels record no autograd graph; train with :func:`ddim_logprob`.
    """
    op = "ddim_step_with_logprob"
    _check_step_args(op, eps_uncond, eps_cond, x_t, noise, "noise", table, step_index,
                     clip_sample_range, reduction)
    _check_dtype(op, "cache_dtype", cache_dtype)
    return _impl(op, eps_cond)(
        eps_uncond, eps_cond, guidance_scale, x_t, noise, table, step_index, cache_dtype,
        clip_sample_range, reduction)


def ddim_logprob(eps_uncond: torch.Tensor | None, eps_cond: torch.Tensor, guidance_scale: float,
                 x_t: torch.Tensor, x_prev: torch.Tensor, table: torch.Tensor,
                 step_index: torch.Tensor, clip_sample_range: float | None = None,
                 reduction: str = "mean") -> torch.Tensor:
    """log p(x_prev | x_t) under the current ε-prediction, (B,); differentiable w.r.t. both ε."""
    op = "ddim_logprob"
    _check_step_args(op, eps_uncond, eps_cond, x_t, x_prev, "x_prev", table, step_index,
                     clip_sample_range, reduction)
    return _impl(op, eps_cond)(
        eps_uncond, eps_cond, guidance_scale, x_t, x_prev, table, step_index, clip_sample_range,
        reduction)


def _check_out(op: str, out: torch.Tensor, shape: tuple, dtype: torch.dtype, device: torch.device) -> None:
    """A preallocated output: the right shape, dtype and device, and contiguous (every backend
    writes rows of it in place, so all of them take the same buffers)."""
    if tuple(out.shape) != shape or out.dtype != dtype or out.device != device or not out.is_contiguous():
        raise ValueError(f"{op}: out must be a contiguous {shape} {dtype} tensor on {device}, got "
                         f"{tuple(out.shape)} {out.dtype} on {out.device}"
                         f"{'' if out.is_contiguous() else ', not contiguous'}")


def branch_fork(latents: torch.Tensor, branches: int, cache_dtype: torch.dtype,
                out: torch.Tensor | None = None,
                group_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, C, H, W) → ((P·K, C, H, W) in ``cache_dtype``, group id of each branch (P·K,) int64).

    Branch ``g*K + k`` is branch k of trunk g. Pass ``out``/``group_ids`` to write into
    preallocated buffers (nothing is allocated then: CUDA-graph friendly).
    """
    op = "branch_fork"
    if isinstance(branches, bool) or not isinstance(branches, int) or branches < 1:
        raise ValueError(f"{op}: branches must be an int >= 1, got {branches!r}")
    _check_dtype(op, "cache_dtype", cache_dtype)
    if latents.ndim < 1:
        raise ValueError(f"{op}: latents must be (P, ...), got a 0-d tensor")
    shape = (latents.shape[0] * branches, *latents.shape[1:])
    if out is None:
        out = torch.empty(shape, dtype=cache_dtype, device=latents.device)
    else:
        _check_out(op, out, shape, cache_dtype, latents.device)
    if group_ids is None:
        group_ids = torch.empty(shape[0], dtype=torch.int64, device=latents.device)
    elif tuple(group_ids.shape) != shape[:1] or group_ids.dtype != torch.int64 or not group_ids.is_contiguous():
        raise ValueError(f"{op}: group_ids must be contiguous int64 of shape ({shape[0]},), got "
                         f"{group_ids.dtype} of shape {tuple(group_ids.shape)}"
                         f"{'' if group_ids.is_contiguous() else ', not contiguous'}")
    _impl(op, latents)(latents, branches, out, group_ids)
    return out, group_ids


def fork_index(latents: torch.Tensor, index: torch.Tensor, cache_dtype: torch.dtype | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """(P, C, H, W) and (M,) int64 → (M, C, H, W) in ``cache_dtype``: row i is latents[index[i]].

    Particle resampling (FK steering): indices in any order, repeats allowed; :func:`branch_fork`
    is index = arange(P).repeat_interleave(K). ``cache_dtype`` defaults to ``out``'s dtype, else
    ``latents``'. Pass ``out`` (not overlapping ``latents``) to write into a preallocated buffer
    (nothing is allocated then: CUDA-graph friendly). Index values are never read on the host:
    one outside [0, P) raises on the CPU, fires a device-side assert in the CUDA kernel, and
    gives a NaN row from the Triton kernel.
    """
    op = "fork_index"
    if latents.ndim < 1 or latents.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{op}: latents must be a (P, ...) float tensor, got {latents.dtype} "
                         f"of shape {tuple(latents.shape)}")
    if cache_dtype is None:
        cache_dtype = latents.dtype if out is None else out.dtype
    _check_dtype(op, "cache_dtype", cache_dtype)
    if not isinstance(index, torch.Tensor) or index.ndim != 1 or index.dtype != torch.int64 \
            or index.device != latents.device:
        got = (f"{index.dtype} of shape {tuple(index.shape)} on {index.device}"
               if isinstance(index, torch.Tensor) else type(index).__name__)
        raise ValueError(f"{op}: index must be a 1-D int64 tensor on {latents.device}, got {got}")
    if latents.shape[0] == 0 and index.shape[0] > 0:
        raise ValueError(f"{op}: index has {index.shape[0]} entries but latents has no rows")
    shape = (index.shape[0], *latents.shape[1:])
    if out is None:
        out = torch.empty(shape, dtype=cache_dtype, device=latents.device)
    else:
        _check_out(op, out, shape, cache_dtype, latents.device)
        # (not while torch.compile traces, where the check would break the graph: the compiled
        # kernels check again when they run, and the reference gathers into a temporary anyway)
        if out.numel() and not torch.compiler.is_compiling() and torch._C._overlaps(out, latents):
            raise ValueError(f"{op}: out must not overlap latents (rows still to be read would be "
                             "overwritten); write into another buffer")
    _impl(op, latents)(latents, index, out)
    return out
