"""Compile every Triton kernel of ``b2fast.kernels`` for NVIDIA GPUs on a machine without one.

Triton's compiler and the ptxas it ships need no GPU: ``triton.compile`` of a kernel's source with
an explicit ``GPUTarget`` runs the whole pipeline (Triton IR → LLVM → PTX → cubin). Run with
``TRITON_INTERPRET`` unset (the interpreter replaces the kernels by Python functions). Prints one
JSON line per compile: kernel, case, arch, error (None when it compiled) and what the PTX holds
(``div_rn``: IEEE-rounded division; ``fma``: a fused multiply-add of the compute dtype).
Exit code 3 when this Triton has no CUDA backend.
"""
from __future__ import annotations

import json
import sys

import triton
import triton.language as tl
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

from b2fast.kernels import _common, branch_fork, ddim_logprob, ddim_step, fork_index

TL = {"fp16": tl.float16, "bf16": tl.bfloat16, "fp32": tl.float32, "fp64": tl.float64}
# (eps, cached latents, step table): what the samplers and the update pass to the DDIM ops
DDIM_CASES = [("fp32", "fp32", "fp32"), ("fp16", "fp16", "fp32"), ("bf16", "bf16", "fp32"),
              ("fp32", "bf16", "fp32"), ("fp64", "fp64", "fp64")]
FORK_CASES = [("fp32", "fp32"), ("fp32", "bf16"), ("bf16", "bf16"), ("fp16", "fp16"), ("fp64", "fp64")]
MAIN_ARCH, OTHER_ARCHS = 90, (80, 100)  # H100; A100 and B200 for the first case of each kernel


def _acc(eps: str) -> str:
    return "fp64" if eps == "fp64" else "fp32"


def ddim_pointers(kernel: str, eps: str, cache: str, table: str) -> dict[str, str]:
    acc = _acc(eps)
    common = {"eu_ptr": eps, "ec_ptr": eps, "xt_ptr": cache, "table_ptr": table, "idx_ptr": "i64",
              "partial_ptr": "fp64"}
    return {"step": {**common, "z_ptr": eps, "out_ptr": cache},
            "logprob_fwd": {**common, "xp_ptr": cache},
            "logprob_bwd": {**common, "xp_ptr": cache, "grad_ptr": acc, "grad_eu_ptr": eps,
                            "grad_ec_ptr": eps}}[kernel]


def compile_one(kernel, pointers: dict, constexprs: dict, arch: int, options: dict) -> dict:
    fn = kernel.fn if isinstance(kernel, Autotuner) else kernel
    signature = {}
    for param in fn.params:
        name = param.name
        if param.is_constexpr:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*" + pointers[name]
        else:
            signature[name] = "fp64" if name in ("w", "clip") else "i32"
    source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    target = triton.backends.compiler.GPUTarget("cuda", arch, 32)
    try:
        compiled = triton.compile(source, target=target, options=options)
    except Exception as exc:  # noqa: BLE001 - reported, the test names it
        return {"error": f"{type(exc).__name__}: {str(exc)[:500]}"}
    ptx = compiled.asm["ptx"]
    acc = "f64" if constexprs.get("ACC") == tl.float64 else "f32"
    return {"error": None, "cubin": bool(compiled.asm.get("cubin")), "div_rn": f"div.rn.{acc}" in ptx,
            "fma": f"fma.rn.{acc}" in ptx}


def cases():
    """(kernel name, kernel, case label, pointer dtypes, constexprs, compile options as launched)."""
    blocks = [(c.kwargs["BLOCK"], {**_common.LAUNCH_OPTIONS, "num_warps": c.num_warps})
              for c in _common.GPU_BLOCK_CONFIGS]
    ddim = {"step": ddim_step._ddim_step_kernel, "logprob_fwd": ddim_logprob._logprob_fwd_kernel,
            "logprob_bwd": ddim_logprob._logprob_bwd_kernel}
    for name, kernel in ddim.items():
        for eps, cache, table in DDIM_CASES:
            for flags in (True, False):
                for block, options in blocks:
                    consts = {"HAS_UNCOND": flags, "CLIP": flags, "ACC": TL[_acc(eps)], "BLOCK": block}
                    if name == "logprob_bwd":
                        consts["MEAN"] = flags
                    yield (name, kernel, f"eps {eps}, latents {cache}, table {table}, flags {flags}, BLOCK {block}",
                           ddim_pointers(name, eps, cache, table), consts, options)
    for name, kernel, pointers in (("branch_fork", branch_fork._branch_fork_kernel, ("src_ptr", "out_ptr")),
                                   ("fork_index", fork_index._fork_index_kernel, ("src_ptr", "out_ptr"))):
        for src, out in FORK_CASES:
            for block, options in blocks:
                types = {pointers[0]: src, pointers[1]: out, "gid_ptr": "i64", "idx_ptr": "i64"}
                yield (name, kernel, f"latents {src} -> {out}, BLOCK {block}", types,
                       {"ACC": TL[_acc(src)], "BLOCK": block}, options)
    for acc in ("fp32", "fp64"):
        for mean in (True, False):
            yield ("finish", _common._finish_kernel, f"log p {acc}, mean {mean}",
                   {"partial_ptr": "fp64", "log_prob_ptr": acc}, {"MEAN": mean, "BLOCK_P": 64}, {})


def kernel_names() -> list[str]:
    """Every Triton kernel object defined in the kernel modules (what the cases must cover)."""
    found = set()
    for module in (_common, branch_fork, ddim_logprob, ddim_step, fork_index):
        for attr, value in vars(module).items():
            fn = value.fn if isinstance(value, Autotuner) else value
            if isinstance(fn, JITFunction) and fn.__module__ == module.__name__ and attr.endswith("_kernel"):
                found.add(f"{module.__name__}.{attr}")
    return sorted(found)


def main() -> int:
    if "nvidia" not in triton.backends.backends:
        print("this Triton has no CUDA backend", file=sys.stderr)
        return 3
    print(json.dumps({"kernels": kernel_names()}))
    first = set()
    for name, kernel, label, pointers, consts, options in cases():
        fn = kernel.fn if isinstance(kernel, Autotuner) else kernel
        qualified = f"{fn.__module__}.{fn.__name__}"
        archs = [MAIN_ARCH] + ([] if name in first else list(OTHER_ARCHS))
        first.add(name)
        for arch in archs:
            result = compile_one(kernel, pointers, consts, arch, options)
            print(json.dumps({"kernel": name, "qualified": qualified, "case": label, "arch": arch, **result}),
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
