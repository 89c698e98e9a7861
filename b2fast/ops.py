"""The op layer: one public function per op; it picks the backend, nothing above it knows which.

Backends, best first (DESIGN §3):

=========  ==========================================================  ================
name       what                                                        serves tensors on
=========  ==========================================================  ================
``cuda``   CUDA kernels of the compiled extension ``b2fast._C``        cuda
``triton`` Triton kernels in ``b2fast.kernels`` (none yet)             cuda
``cpp``    C++ CPU kernels of ``b2fast._C``                            cpu
``torch``  the plain-PyTorch reference (:mod:`b2fast.reference`)      any
=========  ==========================================================  ================

By default each call takes the best backend that has a kernel for the op on the tensors'
device, else the reference. ``B2FAST_BACKEND=<name>`` or :func:`set_backend` forces one backend
(ops it has no kernel for at all use the reference); if the forced backend cannot serve a call,
the call raises a one-line error saying why. :func:`backends` says what is live.

The compiled ops are reached as ``torch.ops.b2fast.<op>``, have Meta kernels and pass
``torch.library.opcheck``. The step index stays a device tensor: no op reads it on the host.
"""
from __future__ import annotations

import contextlib
import functools
import os
import warnings

import torch

from b2fast import reference

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


def _extension_op(op: str):
    """``torch.ops.b2fast.<op>``: one registered op serves both its CPU and CUDA kernels."""
    return getattr(torch.ops.b2fast, op)


def _ddim_step_compiled(eps_uncond, eps_cond, guidance_scale, x_t, noise, table, step_index,
                        cache_dtype, clip_sample_range, reduction):
    clip = None if clip_sample_range is None else float(clip_sample_range)
    return _extension_op("ddim_step_with_logprob")(
        eps_uncond, eps_cond, float(guidance_scale), x_t, noise, table, step_index, cache_dtype,
        clip, reduction == "mean")


# op → backend → implementation with the op's public signature.
_IMPLS = {
    "cfg_combine": {"torch": reference.cfg_combine},
    "ddim_step_with_logprob": {"cuda": _ddim_step_compiled, "cpp": _ddim_step_compiled,
                               "torch": reference.ddim_step_with_logprob},
    # Training log-prob: the reference is autograd-exact (its gradient is elementwise).
    "ddim_logprob": {"torch": reference.ddim_logprob},
    "branch_fork": {"torch": reference.branch_fork},
}


# ----------------------------------------------------------------------------------------------
# Backend choice


def _backend_unavailable(name: str) -> str | None:
    """Why backend ``name`` cannot run at all in this process, or None if it can."""
    if name not in KNOWN_BACKENDS:
        return f"unknown name; allowed: {', '.join(KNOWN_BACKENDS)}, auto"
    if name == "torch":
        return None
    if name == "triton":
        return "no Triton kernels in b2fast.kernels yet"
    if _C is None:
        return _C_ERROR
    if name == "cuda" and not _C.has_cuda():
        return "b2fast._C was built without CUDA kernels (see setup.py: needs nvcc)"
    if name == "cuda" and not torch.cuda.is_available():
        return "no CUDA device is visible"
    return None


@functools.lru_cache(maxsize=None)
def _kernel_missing(op: str, name: str, device_type: str) -> str | None:
    """Why backend ``name`` has no kernel for ``op`` on ``device_type``, or None if it has one."""
    if name == "torch":
        return None
    if name not in _IMPLS[op]:
        return f"no {name} kernel for {op}"
    if _SERVES[name] != device_type:
        return f"{name} serves {_SERVES[name]} tensors, got {device_type}"
    if name in ("cpp", "cuda"):
        key = _DISPATCH_KEYS[device_type]
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"b2fast::{op}", key):
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
            why = _kernel_missing(op, _forced, device_type)
        if why is not None:
            raise RuntimeError(f"b2fast.ops.{op}: backend {_forced!r} (forced by {_forced_by}) "
                               f"is not available: {why}")
        return _forced if _forced in _IMPLS[op] else "torch"
    for name in KNOWN_BACKENDS:
        if name in _IMPLS[op] and _backend_unavailable(name) is None \
                and _kernel_missing(op, name, device_type) is None:
            return name
    raise AssertionError("unreachable: the torch reference serves every op")


def _impl(op: str, tensor: torch.Tensor):
    """The implementation of ``op`` for tensors on ``tensor``'s device."""
    return _IMPLS[op][_choose(op, tensor.device.type)]


def set_backend(name: str | None) -> None:
    """Force every op onto backend ``name``; ``None`` or ``"auto"`` restores the default choice."""
    global _forced, _forced_by
    if name is None or name == "auto":
        _forced, _forced_by = None, ""
        return
    if name not in KNOWN_BACKENDS:
        raise ValueError(f"backend: unknown name {name!r}; allowed: "
                         f"{', '.join(KNOWN_BACKENDS)}, auto")
    why = _backend_unavailable(name)
    if why is not None:
        raise RuntimeError(f"backend {name!r} is not available: {why}")
    _forced, _forced_by = name, "set_backend()"


@contextlib.contextmanager
def use_backend(name: str | None):
    """``with use_backend("cpp"): ...`` forces a backend inside the block, then restores the
    previous choice exactly (including one made by B2FAST_BACKEND)."""
    global _forced, _forced_by
    previous = _forced, _forced_by
    set_backend(name)
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
    """Every backend that can run ``op`` on ``device`` (tests parametrise over these)."""
    device_type = torch.device(device).type
    return [name for name in KNOWN_BACKENDS
            if name in _IMPLS[op] and _backend_unavailable(name) is None
            and _kernel_missing(op, name, device_type) is None]


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
                         f"(b2fast.schedule.build_step_table), got {tuple(table.shape)}")
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
# Public ops (signatures and semantics of b2fast.reference.ddim)


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


def branch_fork(latents: torch.Tensor, branches: int,
                cache_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, C, H, W) → ((P·K, C, H, W) in ``cache_dtype``, group id of each branch (P·K,) int64)."""
    op = "branch_fork"
    if isinstance(branches, bool) or not isinstance(branches, int) or branches < 1:
        raise ValueError(f"{op}: branches must be an int >= 1, got {branches!r}")
    _check_dtype(op, "cache_dtype", cache_dtype)
    return _impl(op, latents)(latents, branches, cache_dtype)
