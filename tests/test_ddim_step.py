"""ddim_step_with_logprob, ddim_logprob and branch_fork on every live backend.

Truth is an independent float64 re-derivation of DDIM from ᾱ (not the reference module, not
the step table), checked itself against ``diffusers.DDIMScheduler.step``. Tolerances are
norm-wise relative errors, DESIGN §5: fp32 < 1e-5, bf16 < 1e-2 (fp16 between, fp64 ~exact).
"""
from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler

from b2fast import ops
from b2fast.schedule import build_step_table

OP = "ddim_step_with_logprob"
LIVE = ops.available_backends(OP, "cpu")
needs_cpp = pytest.mark.skipif("cpp" not in LIVE,
                               reason=f"cpp backend not live: {ops.backends('cpu')[OP]}")
# Stable Diffusion 1.x scheduler config (its scheduler_config.json), clip_sample off.
SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
          beta_schedule="scaled_linear", set_alpha_to_one=False, steps_offset=1,
          clip_sample=False, timestep_spacing="leading", prediction_type="epsilon")
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# Rounding of one value stored in each dtype, plus fp32 compute: the bound on relative error.
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


@pytest.fixture(params=["torch", "cpp"])
def backend(request):
    if request.param not in LIVE:
        pytest.skip(f"{request.param} backend not live: {ops.backends('cpu')[OP]}")
    with ops.use_backend(request.param):
        yield request.param


def rel_err(actual: torch.Tensor, truth: torch.Tensor) -> float:
    """Norm-wise relative error max|a − t| / max|t| (log p can cross 0, so not elementwise)."""
    return ((actual.double() - truth.double()).abs().max() / truth.double().abs().max()).item()


def schedule(num_steps: int, eta: float, table_dtype=torch.float64):
    """(step table from b2fast.schedule, ᾱ_t and ᾱ_t' per step straight from diffusers' ᾱ)."""
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
    x_prev, _ = ops.ddim_step_with_logprob(eps_u, eps_c, 7.5, x_t, noise, table, step,
                                           torch.float64)
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
    x_prev, log_prob = ops.ddim_step_with_logprob(eps_u, eps_c, 5.0, x_t, noise, table, step,
                                                  torch.float64)
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
    x_prev, log_prob = ops.ddim_step_with_logprob(eps_u, eps_c, 5.0, x_t, noise, table, step,
                                                  cache_dtype)
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
    x_prev, log_prob = ops.ddim_step_with_logprob(eps_u, eps_c, 3.0, x_t, noise, table, step,
                                                  torch.float32, reduction=reduction)
    mu, sigma, x_truth = truth_step(eps_u, eps_c, 3.0, x_t, noise, ab_t[step], ab_prev[step], 1.0)
    assert rel_err(x_prev, x_truth) < 1e-5
    assert rel_err(log_prob, truth_logprob(x_prev, mu, sigma, reduction)) < 1e-5


def test_step_clip_sample(backend):
    table, ab_t, ab_prev = schedule(20, eta=1.0)
    eps_u, eps_c, x_t, noise, step = make_inputs((4, 4, 8, 8), torch.float64, 20, seed=4)
    x_prev, _ = ops.ddim_step_with_logprob(eps_u, eps_c, 5.0, x_t, noise, table, step,
                                           torch.float64, clip_sample_range=1.0)
    a, ap = (v[step].reshape(-1, 1, 1, 1) for v in (ab_t, ab_prev))
    eps = eps_u + 5.0 * (eps_c - eps_u)
    x0 = ((x_t - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1.0, 1.0)
    sigma = ((1 - ap) / (1 - a) * (1 - a / ap)).sqrt()
    expected = ap.sqrt() * x0 + (1 - ap - sigma ** 2).sqrt() * eps + sigma * noise
    assert rel_err(x_prev, expected) < 1e-10


def test_eta_zero_is_deterministic_with_zero_logprob(backend):
    table, ab_t, ab_prev = schedule(20, eta=0.0, table_dtype=torch.float32)
    eps_u, eps_c, x_t, noise, step = make_inputs((4, 4, 8, 8), torch.float32, 20, seed=5)
    x_prev, log_prob = ops.ddim_step_with_logprob(eps_u, eps_c, 5.0, x_t, noise, table, step,
                                                  torch.float32)
    mu, _, _ = truth_step(eps_u, eps_c, 5.0, x_t, noise, ab_t[step], ab_prev[step], 0.0)
    assert torch.isfinite(x_prev).all() and torch.isfinite(log_prob).all()
    assert torch.equal(log_prob, torch.zeros_like(log_prob))
    assert rel_err(x_prev, mu) < 1e-5
    relogp = ops.ddim_logprob(eps_u, eps_c, 5.0, x_t, x_prev, table, step)
    assert torch.equal(relogp, torch.zeros_like(relogp))


# ----------------------------------------------------------------------------------------------
# Numerics rule: log p at sampling = log p recomputed on the stored x' (on-policy ratio = 1)


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_steps", [20, 50])
def test_logprob_recorded_on_stored_sample(backend, cache_dtype, num_steps):
    table, _, _ = schedule(num_steps, eta=1.0, table_dtype=torch.float32)
    eps_u, eps_c, x_t, noise, step = make_inputs((8, 4, 16, 16), torch.float32, num_steps, seed=6)
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
    args = (eps_u, eps_c, 5.0, x_t, noise, table, step, torch.float16)  # 17,956 > 4,096 elements
    threads = torch.get_num_threads()
    try:
        torch.use_deterministic_algorithms(True)
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


@needs_cpp
@pytest.mark.parametrize("kwargs", [{}, {"cfg": False}, {"clip": 1.0}, {"out": torch.float32}])
def test_cpp_op_passes_opcheck(kwargs):
    torch.library.opcheck(torch.ops.b2fast.ddim_step_with_logprob.default, _op_args(**kwargs))


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


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_branch_fork(cache_dtype):
    latents = torch.randn(3, 4, 5, 7)
    forked, groups = ops.branch_fork(latents, 5, cache_dtype)
    assert forked.shape == (15, 4, 5, 7) and forked.dtype == cache_dtype
    assert groups.dtype == torch.int64
    assert groups.tolist() == [g for g in range(3) for _ in range(5)]
    for row in range(15):  # branch g*K + k is a copy of trunk g
        assert torch.equal(forked[row], latents[row // 5].to(cache_dtype))
    with pytest.raises(ValueError, match="branches must be an int >= 1"):
        ops.branch_fork(latents, 0, cache_dtype)
