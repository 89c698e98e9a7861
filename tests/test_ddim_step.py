"""ddim_step_with_logprob, ddim_logprob and branch_fork on every live backend.

Truth is an independent float64 re-derivation of DDIM from ᾱ (not the reference module, not
the step table), checked itself against ``diffusers.DDIMScheduler.step``. Tolerances are
norm-wise relative errors (docs/algorithm.md, "Correctness tolerances"): fp32 < 1e-5,
bf16 < 1e-2 (fp16 between, fp64 ~exact).
"""
from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler

from b2fast import ops
from b2fast.ops import reference
from b2fast.core.schedule import build_step_table

OP = "ddim_step_with_logprob"
LIVE = ops.available_backends(OP, "cpu")


@pytest.fixture()
def cpp_live(skip_backend):
    if "cpp" not in LIVE:  # fails instead under B2FAST_REQUIRE=cpp (conftest.py)
        skip_backend("cpp", "cpu", f"cpp backend not live: {ops.backends('cpu')[OP]}")


needs_cpp = pytest.mark.usefixtures("cpp_live")
# Stable Diffusion 1.x scheduler config (its scheduler_config.json), clip_sample off.
SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
          beta_schedule="scaled_linear", set_alpha_to_one=False, steps_offset=1,
          clip_sample=False, timestep_spacing="leading", prediction_type="epsilon")
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# Rounding of one value stored in each dtype, plus fp32 compute: the bound on relative error.
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
# Every kernel backend on the device it serves (Triton on the CPU through TRITON_INTERPRET=1,
# see conftest.py); CUDA ones run on a GPU machine and skip, saying why, elsewhere.
BACKENDS = [("torch", "cpu"), ("cpp", "cpu"), ("triton", "cpu"),
            ("torch", "cuda"), ("cuda", "cuda"), ("triton", "cuda")]


class Backend:
    """A forced backend and the device its tensors live on."""

    def __init__(self, name: str, device: str):
        self.name, self.device = name, torch.device(device)

    def __eq__(self, other) -> bool:  # `backend == "torch"` reads naturally in tests
        return self.name == other

    def to(self, *tensors):
        moved = tuple(None if t is None else t.to(self.device) for t in tensors)
        return moved if len(moved) > 1 else moved[0]


@pytest.fixture(params=[pytest.param(b, marks=pytest.mark.gpu if b[1] == "cuda" else ()) for b in BACKENDS],
                ids=[f"{n}-{d}" for n, d in BACKENDS])
def backend(request, skip_backend):
    name, device = request.param
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    for op in ops._IMPLS:
        if name in ops._IMPLS[op] and name not in ops.available_backends(op, device):
            skip_backend(name, device, f"{name} backend not live for {op} on {device}: "
                         f"{ops._backend_unavailable(name) or ops._kernel_missing(op, name, device, True)}")
    with ops.use_backend(name):
        yield Backend(name, device)


def rel_err(actual: torch.Tensor, truth: torch.Tensor) -> float:
    """Norm-wise relative error max|a − t| / max|t| (log p can cross 0, so not elementwise)."""
    return ((actual.double() - truth.double()).abs().max() / truth.double().abs().max()).item()


def schedule(num_steps: int, eta: float, table_dtype=torch.float64):
    """(step table from b2fast.core.schedule, ᾱ_t and ᾱ_t' per step straight from diffusers' ᾱ)."""
    sched = DDIMScheduler(**SD)
    steps = build_step_table(sched, num_steps, eta)
    ab = sched.alphas_cumprod.double()
    t = steps.timesteps
    prev = t - 1000 // num_steps
    # set_alpha_to_one=False: the step below t=0 uses ᾱ_0
    ab_prev = torch.where(prev >= 0, ab[prev.clamp(min=0)], ab[0])
    return steps.table.to(table_dtype), ab[t], ab_prev


def truth_step(eps_u, eps_c, w, x_t, noise, ab_t, ab_prev, eta):
    """DDIM (Song et al. eq. 12 and 16) in float64; ᾱ given per sample. Returns μ, σ, x'."""
    f64 = lambda t: t.double()  # noqa: E731
    eps = f64(eps_c) if eps_u is None else f64(eps_u) + w * (f64(eps_c) - f64(eps_u))
    a, ap = (v.double().reshape(-1, *[1] * (eps.ndim - 1)) for v in (ab_t, ab_prev))
    x0 = (f64(x_t) - (1 - a).sqrt() * eps) / a.sqrt()
    sigma = eta * ((1 - ap) / (1 - a) * (1 - a / ap)).sqrt()
    mu = ap.sqrt() * x0 + (1 - ap - sigma ** 2).clamp(min=0).sqrt() * eps
    return mu, sigma, mu + sigma * f64(noise)


def truth_logprob(x_prev, mu, sigma, reduction="mean"):
    """Mean (or sum) over C·H·W of log N(x'; μ, σ²), 0 where σ = 0."""
    safe = torch.where(sigma > 0, sigma, torch.ones_like(sigma))
    elem = -(x_prev.double() - mu) ** 2 / (2 * safe ** 2) - safe.log() - 0.5 * math.log(2 * math.pi)
    flat = elem.flatten(1)
    lp = flat.mean(1) if reduction == "mean" else flat.sum(1)
    return torch.where(sigma.flatten() > 0, lp, torch.zeros_like(lp))


def make_inputs(shape, dtype, num_steps, seed, cfg=True):
    """Fresh random ε halves, latents ~2σ like SD's, noise, and a per-sample mix of steps."""
    g = torch.Generator().manual_seed(seed)

    def rand(scale=1.0):
        return (scale * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)

    eps_u = rand() if cfg else None
    eps_c, x_t, noise = rand(), rand(2.0), rand()
    step = torch.randint(0, num_steps, (shape[0],), generator=g)
    step[-1] = num_steps - 1  # always include the last step (σ smallest, ᾱ_t' = ᾱ_0)
    return eps_u, eps_c, x_t, noise, step


# ----------------------------------------------------------------------------------------------
# Truth itself and the table against diffusers


@pytest.mark.parametrize("num_steps", [20, 50])
def test_truth_and_ops_match_diffusers_ddim_step(backend, num_steps):
    table, ab_t, ab_prev = schedule(num_steps, eta=1.0)
    sched = DDIMScheduler(**SD)
    sched.set_timesteps(num_steps)
    eps_u, eps_c, x_t, noise, step = make_inputs((6, 4, 8, 8), torch.float64, num_steps, seed=1)
    x_prev, _ = ops.ddim_step_with_logprob(*backend.to(eps_u, eps_c), 7.5,
                                           *backend.to(x_t, noise, table, step), torch.float64)
    x_prev = x_prev.cpu()
    _, _, x_truth = truth_step(eps_u, eps_c, 7.5, x_t, noise, ab_t[step], ab_prev[step], 1.0)
    eps = eps_u + 7.5 * (eps_c - eps_u)
    for b, i in enumerate(step.tolist()):
        ref = sched.step(eps[b:b + 1], sched.timesteps[i], x_t[b:b + 1], eta=1.0,
                         variance_noise=noise[b:b + 1]).prev_sample
        # diffusers keeps ᾱ in fp32 (scalars rounded ~6e-8), hence an fp32-level tolerance
        assert rel_err(x_truth[b:b + 1], ref) < 1e-5
        assert rel_err(x_prev[b:b + 1], ref) < 1e-5


def test_logprob_matches_torch_normal(backend):
    table, ab_t, ab_prev = schedule(20, eta=1.0)
    eps_u, eps_c, x_t, noise, step = make_inputs((5, 4, 9, 9), torch.float64, 20, seed=2)
    x_prev, log_prob = (t.cpu() for t in ops.ddim_step_with_logprob(
        *backend.to(eps_u, eps_c), 5.0, *backend.to(x_t, noise, table, step), torch.float64))
    mu, sigma, _ = truth_step(eps_u, eps_c, 5.0, x_t, noise, ab_t[step], ab_prev[step], 1.0)
    expected = torch.distributions.Normal(mu, sigma).log_prob(x_prev).flatten(1).mean(1)
    assert log_prob.dtype == torch.float64
    assert rel_err(log_prob, expected) < 1e-10


# ----------------------------------------------------------------------------------------------
# Every backend vs float64 truth: dtypes, odd shapes, mixed steps, CFG on/off, reductions


@pytest.mark.parametrize("shape", [(1, 4, 8, 8), (3, 3, 5, 7), (4, 4, 9, 9), (2, 4, 65, 64)])
@pytest.mark.parametrize("in_dtype", DTYPES)
@pytest.mark.parametrize("cache_dtype", DTYPES)
def test_step_vs_float64_truth(backend, shape, in_dtype, cache_dtype):
    # fp64 compute reads an fp64 table; fp32 compute reads the fp32 table sampling uses
    table_dtype = torch.float64 if in_dtype == torch.float64 else torch.float32
    table, ab_t, ab_prev = schedule(20, eta=1.0, table_dtype=table_dtype)
    eps_u, eps_c, x_t, noise, step = make_inputs(shape, in_dtype, 20, seed=sum(shape))
    x_prev, log_prob = (t.cpu() for t in ops.ddim_step_with_logprob(
        *backend.to(eps_u, eps_c), 5.0, *backend.to(x_t, noise, table, step), cache_dtype))
    mu, sigma, x_truth = truth_step(eps_u, eps_c, 5.0, x_t, noise, ab_t[step], ab_prev[step], 1.0)
    compute = torch.float64 if in_dtype == torch.float64 else torch.float32
    assert x_prev.dtype == cache_dtype and x_prev.shape == shape
    assert log_prob.dtype == compute and log_prob.shape == (shape[0],)
    assert rel_err(x_prev, x_truth) < max(TOL[cache_dtype], TOL[compute])
    # log p is taken on the stored x', so only the compute dtype limits its error
    assert rel_err(log_prob, truth_logprob(x_prev, mu, sigma)) < TOL[compute]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("cfg", [True, False])
def test_step_reduction_and_no_cfg(backend, reduction, cfg):
    table, ab_t, ab_prev = schedule(20, eta=1.0, table_dtype=torch.float32)
    eps_u, eps_c, x_t, noise, step = make_inputs((3, 4, 9, 9), torch.float32, 20, seed=3, cfg=cfg)
    x_prev, log_prob = (t.cpu() for t in ops.ddim_step_with_logprob(
        *backend.to(eps_u, eps_c), 3.0, *backend.to(x_t, noise, table, step), torch.float32,
        reduction=reduction))
    mu, sigma, x_truth = truth_step(eps_u, eps_c, 3.0, x_t, noise, ab_t[step], ab_prev[step], 1.0)
    assert rel_err(x_prev, x_truth) < 1e-5
    assert rel_err(log_prob, truth_logprob(x_prev, mu, sigma, reduction)) < 1e-5


def test_step_clip_sample(backend):
    table, ab_t, ab_prev = schedule(20, eta=1.0)
    eps_u, eps_c, x_t, noise, step = make_inputs((4, 4, 8, 8), torch.float64, 20, seed=4)
    x_prev, _ = ops.ddim_step_with_logprob(*backend.to(eps_u, eps_c), 5.0,
                                           *backend.to(x_t, noise, table, step), torch.float64,
                                           clip_sample_range=1.0)
    x_prev = x_prev.cpu()
    a, ap = (v[step].reshape(-1, 1, 1, 1) for v in (ab_t, ab_prev))
    eps = eps_u + 5.0 * (eps_c - eps_u)
    x0 = ((x_t - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1.0, 1.0)
    sigma = ((1 - ap) / (1 - a) * (1 - a / ap)).sqrt()
    expected = ap.sqrt() * x0 + (1 - ap - sigma ** 2).sqrt() * eps + sigma * noise
    assert rel_err(x_prev, expected) < 1e-10


def test_eta_zero_is_deterministic_with_zero_logprob(backend):
    table, ab_t, ab_prev = schedule(20, eta=0.0, table_dtype=torch.float32)
    eps_u, eps_c, x_t, noise, step = make_inputs((4, 4, 8, 8), torch.float32, 20, seed=5)
    mu, _, _ = truth_step(eps_u, eps_c, 5.0, x_t, noise, ab_t[step], ab_prev[step], 0.0)
    eps_u, eps_c, x_t, noise, table, step = backend.to(eps_u, eps_c, x_t, noise, table, step)
    x_prev, log_prob = ops.ddim_step_with_logprob(eps_u, eps_c, 5.0, x_t, noise, table, step,
                                                  torch.float32)
    assert torch.isfinite(x_prev).all() and torch.isfinite(log_prob).all()
    assert torch.equal(log_prob, torch.zeros_like(log_prob))
    assert rel_err(x_prev.cpu(), mu) < 1e-5
    eps_u.requires_grad_(True)
    eps_c.requires_grad_(True)
    relogp = ops.ddim_logprob(eps_u, eps_c, 5.0, x_t, x_prev, table, step)
    assert torch.equal(relogp, torch.zeros_like(relogp))
    grads = torch.autograd.grad(relogp.sum(), (eps_u, eps_c))
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)  # σ = 0: no NaN, no signal


# ----------------------------------------------------------------------------------------------
# Numerics rule: log p at sampling = log p recomputed on the stored x' (on-policy ratio = 1)


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_steps", [20, 50])
def test_logprob_recorded_on_stored_sample(backend, cache_dtype, num_steps):
    table, _, _ = schedule(num_steps, eta=1.0, table_dtype=torch.float32)
    eps_u, eps_c, x_t, noise, step = backend.to(
        *make_inputs((8, 4, 16, 16), torch.float32, num_steps, seed=6))
    table = backend.to(table)
    x_prev, log_prob = ops.ddim_step_with_logprob(eps_u, eps_c, 5.0, x_t, noise, table, step,
                                                  cache_dtype)
    recomputed = ops.ddim_logprob(eps_u, eps_c, 5.0, x_t, x_prev, table, step)
    ratio = torch.exp(log_prob - recomputed)
    if backend == "torch":  # same operations in the same order: bitwise
        assert torch.equal(log_prob, recomputed)
    assert (ratio - 1).abs().max().item() < 1e-6


def test_deterministic_and_all_outputs_written(backend):
    """Poisoned outputs (deterministic mode fills torch.empty with NaN) and run-to-run equality,
    across thread counts (the C++ reduction uses fixed blocks, not per-thread partials)."""
    table, _, _ = schedule(20, eta=1.0, table_dtype=torch.float32)
    eps_u, eps_c, x_t, noise, step = make_inputs((3, 4, 67, 67), torch.float32, 20, seed=7)
    eps_u, eps_c, x_t, noise, table, step = backend.to(eps_u, eps_c, x_t, noise, table, step)
    args = (eps_u, eps_c, 5.0, x_t, noise, table, step, torch.float16)  # 17,956 > 4,096 elements
    threads = torch.get_num_threads()
    try:
        torch.use_deterministic_algorithms(True)
        torch.set_num_threads(2)  # whatever an earlier test left: 2 threads, then 1
        first = ops.ddim_step_with_logprob(*args)
        torch.set_num_threads(1)
        second = ops.ddim_step_with_logprob(*args)
    finally:
        torch.use_deterministic_algorithms(False)
        torch.set_num_threads(threads)
    assert torch.isfinite(first[0]).all() and torch.isfinite(first[1]).all()
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_step_traces_under_torch_compile_fullgraph(backend):
    """No graph break from backend choice or the op (CUDA-graph capture needs whole graphs)."""
    torch._dynamo.reset()  # the backend is baked in at trace time: drop graphs of other backends
    table, _, _ = schedule(20, eta=1.0, table_dtype=torch.float32)
    eps_u, eps_c, x_t, noise, step = make_inputs((3, 4, 5, 7), torch.float32, 20, seed=10)
    eps_u, eps_c, x_t, noise, table, step = backend.to(eps_u, eps_c, x_t, noise, table, step)
    args = (eps_u, eps_c, 5.0, x_t, noise, table, step, torch.float16)
    compiled = torch.compile(ops.ddim_step_with_logprob, backend="aot_eager", fullgraph=True)
    for got, want in zip(compiled(*args), ops.ddim_step_with_logprob(*args)):
        assert torch.equal(got, want)


# ----------------------------------------------------------------------------------------------
# Compiled op: registration, opcheck, argument checks


def _op_args(cfg=True, clip=None, out=torch.float16):
    table, _, _ = schedule(20, eta=1.0, table_dtype=torch.float32)
    eps_u, eps_c, x_t, noise, step = make_inputs((3, 4, 5, 7), torch.float32, 20, seed=8, cfg=cfg)
    return (eps_u, eps_c, 5.0, x_t, noise, table, step, out, clip, True)


def _registered_ops(name: str, skip_backend):
    """The torch.ops namespace of backend ``name``'s registered ops (cpp, or Triton under
    TRITON_INTERPRET=1 on the CPU), or a skip saying why it is not live here."""
    if name not in ops.available_backends("ddim_step_with_logprob", "cpu"):
        skip_backend(name, "cpu", f"{name} not live on the CPU: {ops._backend_unavailable(name)}")
    return getattr(torch.ops, ops._NAMESPACES[name])


@pytest.mark.parametrize("name", ["cpp", "triton"])
@pytest.mark.parametrize("kwargs", [{}, {"cfg": False}, {"clip": 1.0}, {"out": torch.float32}])
def test_registered_step_passes_opcheck(name, kwargs, skip_backend):
    torch.library.opcheck(_registered_ops(name, skip_backend).ddim_step_with_logprob.default, _op_args(**kwargs))


@needs_cpp
@pytest.mark.parametrize("index, change, message", [
    (3, lambda t: t[:, :2], "x_t must have the shape of eps_cond"),
    (4, lambda t: t.double()[..., :3], "noise must have the shape of eps_cond"),
    (5, lambda t: t[:, :5], "table must be (S, 6)"),
    (6, lambda t: t.int(), "step_index dtype Int is not supported"),
    (6, lambda t: t + 20, "is out of range"),
    (7, lambda _: torch.int32, "out_dtype Int is not supported"),
    (8, lambda _: -1.0, "clip_sample_range must be None (no clip) or > 0"),
])
def test_cpp_op_errors_name_the_argument(index, change, message):
    args = list(_op_args())
    args[index] = change(args[index])
    with pytest.raises(RuntimeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        torch.ops.b2fast.ddim_step_with_logprob(*args)


def test_ops_layer_validates_arguments():
    eps_u, eps_c, _, x_t, noise, table, step, *_ = _op_args()
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum'"):
        ops.ddim_step_with_logprob(eps_u, eps_c, 5.0, x_t, noise, table, step, torch.float32,
                                   reduction="max")
    with pytest.raises(ValueError, match="cache_dtype must be one of"):
        ops.ddim_step_with_logprob(eps_u, eps_c, 5.0, x_t, noise, table, step, torch.int8)
    with pytest.raises(ValueError, match="step_index must be int64 of shape"):
        ops.ddim_logprob(eps_u, eps_c, 5.0, x_t, x_t, table, step[:2])


# ----------------------------------------------------------------------------------------------
# Training log-prob gradients and the branch fork


def test_ddim_logprob_gradcheck_float64():
    table, _, _ = schedule(20, eta=1.0)
    eps_u, eps_c, x_t, noise, step = make_inputs((2, 2, 3, 3), torch.float64, 20, seed=9)
    x_prev, _ = ops.ddim_step_with_logprob(eps_u, eps_c, 5.0, x_t, noise, table, step,
                                           torch.float64)
    eps_u.requires_grad_(True)
    eps_c.requires_grad_(True)
    fn = lambda u, c: ops.ddim_logprob(u, c, 5.0, x_t, x_prev, table, step)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (eps_u, eps_c))


def reference_grads(eps_u, eps_c, w, x_t, x_prev, table, step, clip, reduction, weight):
    """d(Σ weight·log p)/d(ε_u, ε_c) by autograd through the reference, in float64."""
    leaves = [None if t is None else t.detach().double().requires_grad_(True) for t in (eps_u, eps_c)]
    log_prob = reference.ddim_logprob(leaves[0], leaves[1], w, x_t.double(), x_prev.double(),
                                      table.double(), step, clip, reduction)
    grads = torch.autograd.grad((log_prob * weight.double()).sum(), [t for t in leaves if t is not None])
    return log_prob.detach(), ([None] if eps_u is None else []) + list(grads)


@pytest.mark.parametrize("in_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cfg, clip, reduction", [(True, None, "mean"), (False, None, "mean"),
                                                  (True, 1.0, "mean"), (True, None, "sum")])
@pytest.mark.parametrize("shape", [(1, 4, 8, 8), (5, 3, 5, 7)])
def test_logprob_forward_backward_vs_float64_autograd(backend, in_dtype, cfg, clip, reduction, shape):
    """The training op: log p and both ε gradients against float64 autograd of the reference,
    with η = 0 rows (σ = 0) mixed in; gradients come back in the ε dtype."""
    table, _, _ = schedule(20, eta=1.0, table_dtype=torch.float32)
    table[::3] = schedule(20, eta=0.0, table_dtype=torch.float32)[0][::3]  # σ = 0 every third step
    eps_u, eps_c, x_t, noise, step = make_inputs(shape, in_dtype, 20, seed=11 + shape[0], cfg=cfg)
    if shape[0] > 1:
        step[0] = 0  # a σ = 0 row beside stochastic ones
    x_prev, _ = reference.ddim_step_with_logprob(eps_u, eps_c, 4.0, x_t, noise, table, step,
                                                 torch.bfloat16, clip, reduction)
    weight = torch.randn(shape[0], generator=torch.Generator().manual_seed(shape[0]))
    truth_lp, truth_grads = reference_grads(eps_u, eps_c, 4.0, x_t, x_prev, table, step, clip,
                                            reduction, weight)

    leaves = [None if t is None else t.clone().requires_grad_(True) for t in backend.to(eps_u, eps_c)]
    log_prob = ops.ddim_logprob(leaves[0], leaves[1], 4.0, *backend.to(x_t, x_prev, table, step),
                                clip, reduction)
    log_prob.backward(backend.to(weight))
    tol = TOL[torch.float32] if in_dtype == torch.float32 else TOL[in_dtype]
    assert log_prob.dtype == torch.float32
    assert rel_err(log_prob.detach().cpu(), truth_lp) < 1e-5
    deterministic = step.to(log_prob.device) % 3 == 0
    assert torch.isfinite(log_prob).all() and (log_prob[deterministic] == 0).all()
    for leaf, truth in zip(leaves, truth_grads):
        if leaf is None:
            continue
        assert leaf.grad.dtype == in_dtype and leaf.grad.shape == shape
        assert torch.isfinite(leaf.grad).all()
        assert (leaf.grad[deterministic] == 0).all()  # σ = 0: no gradient, no NaN
        assert rel_err(leaf.grad.cpu(), truth) < max(tol, 2e-5)


def test_ddim_logprob_gradcheck_float64_every_backend(backend):
    """The differentiable op passes gradcheck wherever it runs in float64."""
    table, _, _ = schedule(20, eta=1.0)
    eps_u, eps_c, x_t, noise, step = make_inputs((2, 2, 3, 3), torch.float64, 20, seed=12)
    x_prev, _ = reference.ddim_step_with_logprob(eps_u, eps_c, 5.0, x_t, noise, table, step,
                                                 torch.float64)
    eps_u, eps_c, x_t, x_prev, table, step = backend.to(eps_u, eps_c, x_t, x_prev, table, step)
    fn = lambda u, c: ops.ddim_logprob(u, c, 5.0, x_t, x_prev, table, step, 1.5)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (eps_u.requires_grad_(True), eps_c.requires_grad_(True)))


def test_same_sample_gives_same_bits_in_any_batch(backend):
    """Batch invariance: a sample's outputs do not depend on the batch it is embedded in. The ops
    on the whole batch give bitwise what they give on each sample alone (outputs concatenated)
    and on the samples shuffled in among other samples, in a batch twice the size."""
    table = backend.to(schedule(20, eta=1.0, table_dtype=torch.float32)[0])
    shape = (6, 4, 33, 31)  # > one reduction block per sample for every backend
    own = make_inputs(shape, torch.bfloat16, 20, seed=13)
    other = make_inputs(shape, torch.bfloat16, 20, seed=17)

    def run(eps_u, eps_c, x_t, noise, step):
        eps_u, eps_c, x_t, noise, step = backend.to(eps_u, eps_c, x_t, noise, step)
        x_prev, log_prob = ops.ddim_step_with_logprob(eps_u, eps_c, 5.0, x_t, noise, table, step,
                                                      torch.float16)
        u, c = (t.clone().requires_grad_(True) for t in (eps_u, eps_c))
        train_lp = ops.ddim_logprob(u, c, 5.0, x_t, x_prev, table, step)
        train_lp.sum().backward()
        return x_prev, log_prob, train_lp.detach(), u.grad, c.grad

    whole = run(*own)
    alone = zip(*(run(*(t[i:i + 1] for t in own)) for i in range(shape[0])))
    order = torch.randperm(12, generator=torch.Generator().manual_seed(0))  # own samples: 6..11
    mixed = run(*(torch.cat([o, t])[order] for o, t in zip(other, own)))
    rows = order.argsort()[6:]  # where each own sample sits in the mixed batch
    for full, parts, mix in zip(whole, alone, mixed):
        assert torch.equal(torch.cat(parts), full)
        assert torch.equal(mix[rows.to(mix.device)], full)


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape, branches", [((3, 4, 5, 7), 5), ((1, 4, 8, 8), 1), ((2, 3), 4)])
def test_branch_fork(backend, cache_dtype, shape, branches):
    latents = backend.to(torch.randn(shape))
    forked, groups = ops.branch_fork(latents, branches, cache_dtype)
    P = shape[0]
    assert forked.shape == (P * branches, *shape[1:]) and forked.dtype == cache_dtype
    assert groups.dtype == torch.int64
    assert groups.tolist() == [g for g in range(P) for _ in range(branches)]
    for row in range(P * branches):  # branch g*K + k is a copy of trunk g
        assert torch.equal(forked[row], latents[row // branches].to(cache_dtype))
    # into poisoned preallocated buffers: every element written, the buffers themselves returned
    out = torch.full_like(forked, float("nan"))
    ids = torch.full_like(groups, -7)
    got, got_ids = ops.branch_fork(latents, branches, cache_dtype, out=out, group_ids=ids)
    assert got is out and got_ids is ids
    assert torch.equal(out, forked) and torch.equal(ids, groups)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("name", ["cuda", "triton"])
def test_step_replays_in_a_cuda_graph(name):
    """A whole sampling step (fork + DDIM step) captured once, replayed on new inputs copied into
    its static buffers, gives what eager calls give: no host sync, no stray allocation."""
    if name not in ops.available_backends(OP, "cuda"):
        pytest.skip(f"{name} backend not live on cuda")
    table, _, _ = schedule(20, eta=1.0, table_dtype=torch.float32)
    static = [t.cuda() for t in make_inputs((2, 4, 16, 16), torch.bfloat16, 20, seed=14)]
    table = table.cuda()
    with ops.use_backend(name):
        def step_fn():
            x, _ = ops.branch_fork(static[2], 3, torch.float16)
            u, c, z = (t.repeat_interleave(3, 0) for t in (static[0], static[1], static[3]))
            return ops.ddim_step_with_logprob(u, c, 5.0, x, z, table, static[4].repeat_interleave(3),
                                              torch.float16)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            step_fn()  # warm-up (autotuning, lazy init) outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = step_fn()
        for seed in (15, 16):
            for buf, new in zip(static, make_inputs((2, 4, 16, 16), torch.bfloat16, 20, seed=seed)):
                buf.copy_(new)
            graph.replay()
            eager = step_fn()
            assert torch.equal(captured[0], eager[0]) and torch.equal(captured[1], eager[1])


@pytest.mark.parametrize("name", ["cpp", "triton"])
@pytest.mark.parametrize("cfg, clip", [(True, None), (False, None), (True, 1.0)])
def test_registered_training_ops_pass_opcheck(name, cfg, clip, skip_backend):
    registered = _registered_ops(name, skip_backend)
    eps_u, eps_c, w, x_t, noise, table, step, *_ = _op_args(cfg=cfg)
    x_prev = noise.to(torch.float16)
    torch.library.opcheck(registered.ddim_logprob.default, (eps_u, eps_c, w, x_t, x_prev, table, step, clip, True))
    grad = torch.randn(eps_c.shape[0])
    torch.library.opcheck(registered.ddim_logprob_backward.default,
                          (grad, eps_u, eps_c, w, x_t, x_prev, table, step, clip, False))
    out, ids = torch.empty(9, 4, 5, 7, dtype=torch.float16), torch.empty(9, dtype=torch.int64)
    torch.library.opcheck(registered.branch_fork_out.default, (eps_c, 3, out, ids))
