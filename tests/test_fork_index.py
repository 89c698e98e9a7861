"""fork_index (out[i] = latents[index[i]] in the cache dtype) on every live backend: equal to
``latents.index_select(0, index).to(dtype)``, equal to branch_fork for its index, argument
errors, the registered ops under opcheck, and a CUDA-graph replay on a GPU."""
from __future__ import annotations

import zlib

import pytest
import torch

from b2fast import ops

OP = "fork_index"
# Every kernel backend on the device it serves (Triton on the CPU through TRITON_INTERPRET=1,
# see conftest.py); CUDA ones run on a GPU machine and skip, saying why, elsewhere.
BACKENDS = [("torch", "cpu"), ("cpp", "cpu"), ("triton", "cpu"),
            ("torch", "cuda"), ("cuda", "cuda"), ("triton", "cuda")]
DTYPES = [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
          (torch.float64, torch.float16), (torch.bfloat16, torch.float32),
          (torch.float16, torch.float64)]  # (latents, cache)
# name → index of M entries into P = 5 rows
INDICES = {"resample": lambda g: torch.randint(0, 5, (5,), generator=g),
           "permutation": lambda g: torch.randperm(5, generator=g),
           "more rows": lambda g: torch.randint(0, 5, (12,), generator=g),
           "fewer rows, repeats": lambda g: torch.tensor([3, 3, 0]),
           "empty": lambda g: torch.empty(0, dtype=torch.int64)}


def _live(name: str, device: str) -> str | None:
    """Why backend ``name`` cannot run fork_index on ``device``, or None."""
    if name not in ops.available_backends(OP, device):
        return (f"{name} backend not live for {OP} on {device}: "
                f"{ops._backend_unavailable(name) or ops._kernel_missing(OP, name, device, True)}")
    return None


@pytest.fixture(params=[pytest.param(b, marks=pytest.mark.gpu if b[1] == "cuda" else ())
                        for b in BACKENDS], ids=[f"{n}-{d}" for n, d in BACKENDS])
def backend(request, skip_backend):
    """(name, device) of a forced backend, which the test body runs under."""
    name, device = request.param
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    why = _live(name, device)
    if why:
        skip_backend(name, device, why)
    with ops.use_backend(name):
        yield name, torch.device(device)


@pytest.mark.parametrize("in_dtype, cache_dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("pattern", INDICES)
def test_equals_index_select(backend, in_dtype, cache_dtype, pattern):
    _, device = backend
    gen = torch.Generator().manual_seed(zlib.crc32(f"{pattern} {in_dtype} {cache_dtype}".encode()))
    latents = torch.randn(5, 3, 7, 4, generator=gen).to(in_dtype).transpose(2, 3).to(device)
    index = INDICES[pattern](gen).to(device)
    want = latents.index_select(0, index).to(cache_dtype)
    got = ops.fork_index(latents, index, cache_dtype)
    assert got.dtype == cache_dtype and torch.equal(got, want)
    # into a poisoned preallocated buffer: every element written, the buffer itself returned
    out = torch.full_like(want, float("nan"))
    assert ops.fork_index(latents, index, out=out) is out and torch.equal(out, want)


def test_equals_branch_fork(backend):
    _, device = backend
    latents = torch.randn(3, 4, 5, 7, device=device)
    index = torch.arange(3, device=device).repeat_interleave(4)
    forked, _ = ops.branch_fork(latents, 4, torch.float16)
    assert torch.equal(ops.fork_index(latents, index, torch.float16), forked)


def test_traces_under_torch_compile_fullgraph(backend):
    """No graph break from the checks, the backend choice or the op."""
    _, device = backend
    torch._dynamo.reset()  # the backend is baked in at trace time: drop graphs of other backends
    latents, index = torch.randn(4, 3, 5, device=device), torch.tensor([3, 3, 0], device=device)
    out = torch.empty(3, 3, 5, dtype=torch.bfloat16, device=device)
    compiled = torch.compile(ops.fork_index, backend="aot_eager", fullgraph=True)
    assert compiled(latents, index, out=out) is out
    assert torch.equal(out, latents.index_select(0, index).bfloat16())


def test_out_of_range_index(backend):
    """CPU kernels raise before writing; Triton (no host sync, no device assert outside debug
    mode) gives the row NaN. CUDA's device-side assert is not tested: it breaks the context."""
    name, device = backend
    if device.type == "cuda" and name != "triton":
        pytest.skip("an out-of-range index fires a device-side assert on CUDA")
    latents, out = torch.randn(3, 4, device=device), torch.zeros(2, 4, device=device)
    index = torch.tensor([1, 3], device=device)
    if name == "triton":
        ops.fork_index(latents, index, out=out)
        assert torch.equal(out[0], latents[1]) and out[1].isnan().all()
        return
    with pytest.raises(IndexError if name == "torch" else RuntimeError, match="out of range"):
        ops.fork_index(latents, index, out=out)
    if name == "cpp":
        assert not out.any()  # nothing written


_LATENTS, _INDEX = torch.randn(3, 4, 5), torch.tensor([0, 2])
_GOT = "index must be a 1-D int64 tensor on cpu, got "


@pytest.mark.parametrize("change, message", [
    ({"cache_dtype": torch.int8}, "cache_dtype must be one of"),
    ({"latents": _LATENTS.long()}, "latents must be a (P, ...) float tensor"),
    ({"index": _INDEX.int()}, _GOT + "torch.int32"),
    ({"index": _INDEX[None]}, _GOT + "torch.int64 of shape (1, 2)"),
    ({"index": [0, 2]}, _GOT + "list"),
    ({"index": _INDEX.to("meta")}, _GOT + "torch.int64 of shape (2,) on meta"),
    ({"latents": _LATENTS[:0]}, "index has 2 entries but latents has no rows"),
    ({"out": torch.empty(3, 4, 5)}, "out must be a contiguous (2, 4, 5) torch.float32 tensor on cpu, got (3, 4, 5)"),
    ({"out": torch.empty(2, 4, 5), "cache_dtype": torch.float16},
     "out must be a contiguous (2, 4, 5) torch.float16"),
    ({"out": _LATENTS[1:]}, "out must not overlap latents"),
    # refused by every backend alike (the C++ kernels cannot write strided rows; the others could)
    ({"out": torch.empty(2, 5, 4).transpose(1, 2)}, "got (2, 4, 5) torch.float32 on cpu, not contiguous"),
])
def test_rejects_bad_arguments(change, message):
    args = {"latents": _LATENTS, "index": _INDEX, "cache_dtype": None, "out": None, **change}
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ops.fork_index(**args)


def test_cache_dtype_defaults_to_out_then_latents():
    latents, index = torch.randn(3, 4, dtype=torch.float64), torch.tensor([2, 0])
    assert ops.fork_index(latents, index).dtype == torch.float64
    out = torch.empty(2, 4, dtype=torch.bfloat16)
    assert ops.fork_index(latents, index, out=out) is out
    assert torch.equal(out, latents[[2, 0]].bfloat16())


# ----------------------------------------------------------------------------------------------
# The registered ops


def _registered(name: str, skip_backend):
    why = _live(name, "cpu")
    if why:
        skip_backend(name, "cpu", why)
    return getattr(torch.ops, ops._NAMESPACES[name]).fork_index_out.default


@pytest.mark.parametrize("name", ["cpp", "triton"])
@pytest.mark.parametrize("in_dtype, out_dtype, rows", [(torch.float32, torch.float16, 7),
                                                       (torch.bfloat16, torch.float32, 2),
                                                       (torch.float32, torch.float32, 0)],
                         ids=["fp32-fp16-M7", "bf16-fp32-M2", "fp32-fp32-M0"])
def test_registered_op_passes_opcheck(name, in_dtype, out_dtype, rows, skip_backend):
    op = _registered(name, skip_backend)
    latents = torch.randn(3, 4, 5, dtype=in_dtype)
    index = torch.randint(0, 3, (rows,))
    torch.library.opcheck(op, (latents, index, torch.empty(rows, 4, 5, dtype=out_dtype)))


@pytest.mark.parametrize("change, message", [
    (lambda a: a.update(index=a["index"].int()), "index dtype Int is not supported"),
    (lambda a: a.update(index=a["index"][None]), "index must be (M,)"),
    (lambda a: a.update(out=a["out"][:1]), "out must be (M, ...) = [2, 4, 5]"),
    (lambda a: a.update(out=a["out"].int()), "out dtype Int is not supported"),
    (lambda a: a.update(out=a["latents"][:2]), "out must not overlap latents"),
    (lambda a: a.update(out=a["out"].transpose(1, 2).contiguous().transpose(1, 2)),
     "out must be contiguous"),
])
def test_cpp_op_errors_name_the_argument(change, message, skip_backend):
    op = _registered("cpp", skip_backend)
    args = {"latents": torch.randn(3, 4, 5), "index": torch.tensor([2, 0]),
            "out": torch.empty(2, 4, 5)}
    change(args)
    with pytest.raises(RuntimeError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
        op(args["latents"], args["index"], args["out"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("name", ["cuda", "triton"])
def test_replays_in_a_cuda_graph(name):
    """Captured once, replayed on new latents and indices copied into its static buffers: no
    host sync, no allocation, the same result as an eager call."""
    if name not in ops.available_backends(OP, "cuda"):
        pytest.skip(f"{name} backend not live on cuda")
    latents = torch.randn(6, 4, 16, 16, device="cuda")
    index = torch.zeros(6, dtype=torch.int64, device="cuda")
    out = torch.empty(6, 4, 16, 16, dtype=torch.float16, device="cuda")
    with ops.use_backend(name):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            ops.fork_index(latents, index, out=out)  # warm-up (autotuning) outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            ops.fork_index(latents, index, out=out)
        for seed in (1, 2):
            gen = torch.Generator("cuda").manual_seed(seed)
            latents.copy_(torch.randn(latents.shape, generator=gen, device="cuda"))
            index.copy_(torch.randint(0, 6, (6,), generator=gen, device="cuda"))
            graph.replay()
            assert torch.equal(out, latents.index_select(0, index).half())


def test_branch_fork_rejects_bad_arguments():
    """The B² fork (index = repeat(arange(P), K)) checks its buffers as fork_index does."""
    latents = torch.randn(3, 4, 5, 7)
    with pytest.raises(ValueError, match="branches must be an int >= 1"):
        ops.branch_fork(latents, 0, torch.float32)
    with pytest.raises(ValueError, match=r"out must be a contiguous \(6, 4, 5, 7\) torch.float16"):
        ops.branch_fork(latents, 2, torch.float16, out=torch.empty(6, 4, 5, 7))
    with pytest.raises(ValueError, match="group_ids must be contiguous int64"):
        ops.branch_fork(latents, 2, torch.float32, group_ids=torch.empty(6, dtype=torch.int32))
    # strided buffers are refused before any backend runs, so every backend takes the same ones
    with pytest.raises(ValueError, match="not contiguous"):
        ops.branch_fork(latents, 2, torch.float32, out=torch.empty(6, 4, 7, 5).transpose(2, 3))
    with pytest.raises(ValueError, match="not contiguous"):
        ops.branch_fork(latents, 2, torch.float32, group_ids=torch.empty(12, dtype=torch.int64)[::2])
