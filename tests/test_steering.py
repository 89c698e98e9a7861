"""FK steering (b2fast.core.steering): the pure pieces against hand computations, exactness on a
1-D Gaussian diffusion with an analytic ε, and the toy model (λ = 0 is plain sampling bit for
bit; duplicated particles diverge); the ``steer`` config section and its training refusal."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from b2fast.config import Config, ConfigError, SamplingConfig, SteerConfig, validate
from b2fast.core.steering import (FKResult, Particles, draw_ancestors, effective_sample_size, fk_loop,
                                  fk_sample, fork_rows, log_potential, noise_source, normalise_log_weights,
                                  resampling_steps, weigh_and_resample)
from b2fast.ops.reference import ddim
from b2fast.ops.reference.ddim import DIR_COEF, SIGMA, SQRT_1M_AB, SQRT_AB, SQRT_AB_PREV


pytestmark = pytest.mark.usefixtures("one_thread")


def fk(**kw) -> SteerConfig:
    return SteerConfig(**{"kind": "fk", **kw})


# ---------------------------------------------------------------------------------------------
# Schedule, potentials, weights


@pytest.mark.parametrize("num_steps, expected", [
    (100, [5, 10, 15, 20, 25, 30, 99]),          # the paper's text-to-image runs
    (20, [1, 2, 3, 4, 5, 6, 19]),                # every 5 of 100 -> every 1 of 20
    (50, [3, 6, 9, 12, 15, 49]),                 # 2.5 rounds half up to 3
    (10, [1, 2, 3, 9]),                          # 0.5 -> 1 (every >= 1), end 3
    (1, [0]),                                    # only the last step
])
def test_resampling_schedule_scales_with_the_step_count(num_steps, expected):
    assert resampling_steps(5, 5, 30, num_steps) == expected


def test_resampling_schedule_never_passes_the_last_step():
    assert resampling_steps(20, 20, 80, 100) == [20, 40, 60, 80, 99]
    assert resampling_steps(90, 50, 300, 20) == [18, 19]


def test_log_weight_normalisation_and_ess_by_hand():
    log_w = torch.tensor([[1.0, 1.0, 2.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0]], dtype=torch.float64).log()
    w = normalise_log_weights(log_w).exp()
    assert torch.allclose(w, torch.tensor([[0.25, 0.25, 0.5], [1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3]], dtype=torch.float64))
    # ESS = 1 / sum w^2: 1 / (1/16 + 1/16 + 1/4) = 8/3; one particle: 1; equal weights: N
    assert torch.allclose(effective_sample_size(log_w), torch.tensor([8 / 3, 1.0, 3.0], dtype=torch.float64))
    # log space: a shift of 1000 (exp overflows) changes nothing
    assert torch.allclose(normalise_log_weights(log_w[:1] + 1000.0).exp(), w[:1])
    assert torch.allclose(effective_sample_size(log_w[:1] - 1000.0), torch.tensor([8 / 3], dtype=torch.float64))
    # a prompt whose particles all have weight 0 (NaN rewards) falls back to equal weights
    dead = torch.full((1, 4), -math.inf)
    assert torch.allclose(normalise_log_weights(dead).exp(), torch.full((1, 4), 0.25))
    assert effective_sample_size(dead).item() == pytest.approx(4.0)


@pytest.mark.parametrize("potential, log_g, log_g_final, r_tilde", [
    # lam 2, r 0.5, r_prev 0.8, past potentials' log-product 3.0
    ("diff", 2 * (0.5 - 0.8), 2 * (0.5 - 0.8), 0.5),   # telescopes: no correction
    ("max", 2 * 0.8, 2 * 0.8 - 3.0, 0.8),              # r~ = max(r, r_prev)
    ("add", 2 * 1.3, 2 * 1.3 - 3.0, 1.3),              # r~ = r + r_prev (a running sum)
    ("rt", 2 * 0.5, 2 * 0.5 - 3.0, 0.5),               # r~ = r
])
def test_potentials_and_final_correction_by_hand(potential, log_g, log_g_final, r_tilde):
    r, r_prev, log_prod = (torch.tensor([v], dtype=torch.float64) for v in (0.5, 0.8, 3.0))
    for final, expected in ((False, log_g), (True, log_g_final)):
        got, tilde = log_potential(potential, 2.0, r, r_prev, log_prod, final)
        assert got.item() == pytest.approx(expected) and tilde.item() == pytest.approx(r_tilde)


def test_nan_reward_gives_weight_zero_and_lambda_zero_gives_one():
    r = torch.tensor([[0.5, float("nan")]], dtype=torch.float64)
    zeros = torch.zeros_like(r)
    log_g, _ = log_potential("diff", 2.0, r, zeros, zeros, False)
    assert log_g[0, 0].item() == pytest.approx(1.0) and log_g[0, 1].item() == -math.inf
    assert torch.equal(log_potential("diff", 0.0, r, zeros, zeros, True)[0], zeros)


@pytest.mark.parametrize("potential", ["max", "add", "rt", "diff"])
def test_products_of_a_particles_potentials_is_exp_lambda_r_tilde(potential):
    """The final correction: over a whole path, Σ log G = λ·r̃_final (running max / sum / last r)."""
    lam, rewards = 1.5, [0.3, 0.9, -0.2, 0.4]
    state, gen = Particles.start(1, 1), torch.Generator().manual_seed(0)
    for k, r in enumerate(rewards):
        state, *_ = weigh_and_resample(state, torch.tensor([[r]], dtype=torch.float64), fk(lam=lam, potential=potential),
                                       k == len(rewards) - 1, gen)
    expected = {"max": max(rewards), "add": sum(rewards)}.get(potential, rewards[-1])
    assert state.log_product.item() == pytest.approx(lam * expected)


def test_resampling_gathers_r_prev_potentials_and_ancestors_by_the_same_indices():
    state = Particles(r_prev=torch.tensor([[0.1, 0.2, 0.3, 0.4]], dtype=torch.float64),
                      log_product=torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=torch.float64),
                      log_w=torch.zeros(1, 4, dtype=torch.float64), ancestors=torch.tensor([[3, 2, 1, 0]]))
    index = torch.tensor([[2, 2, 0, 3]])
    moved = state.gather(index)
    assert moved.r_prev.tolist() == [[0.3, 0.3, 0.1, 0.4]] and moved.log_product.tolist() == [[3.0, 3.0, 1.0, 4.0]]
    assert moved.ancestors.tolist() == [[1, 1, 3, 0]]
    # one particle holds all the weight: every particle becomes it, with its own r~ and potential product
    r = torch.tensor([[0.0, 0.0, 5.0, 0.0]], dtype=torch.float64)
    new, index, ess, done = weigh_and_resample(state, r, fk(lam=50.0, potential="rt"), False,
                                               torch.Generator().manual_seed(0))
    assert done.tolist() == [True] and index.tolist() == [[2, 2, 2, 2]] and ess.item() == pytest.approx(1.0)
    assert new.r_prev.tolist() == [[5.0] * 4] and new.ancestors.tolist() == [[1] * 4]
    assert new.log_product.tolist() == [[3.0 + 250.0] * 4] and new.log_w.tolist() == [[0.0] * 4]


def test_adaptive_skips_keep_accumulated_weights_and_official_keeps_the_last_potential():
    r1 = torch.tensor([[0.0, 0.1, 0.2, 0.3]], dtype=torch.float64)
    r2 = torch.tensor([[0.3, 0.1, 0.1, 0.0]], dtype=torch.float64)
    logs = {}
    for weights in ("smc", "official"):
        steer, gen = fk(lam=1.0, potential="rt", resample="adaptive", weights=weights), torch.Generator()
        state, _, _, done1 = weigh_and_resample(Particles.start(1, 4), r1, steer, False, gen)
        state, _, _, done2 = weigh_and_resample(state, r2, steer, False, gen)
        assert not done1.any() and not done2.any()  # ESS stays above N/2
        logs[weights] = state.log_w
        assert torch.allclose(state.log_product, r1 + r2)  # the potentials' product is the same either way
    assert torch.allclose(logs["smc"], r1 + r2) and torch.allclose(logs["official"], r2)


def test_per_prompt_generators_draw_only_for_the_prompts_that_resample():
    log_w = torch.tensor([[0.0, 0.0, 0.0], [0.0, -50.0, -50.0]], dtype=torch.float64)
    gens = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]
    before = [g.get_state() for g in gens]
    index = draw_ancestors(log_w, gens, torch.tensor([False, True]))
    assert index.tolist() == [[0, 1, 2], [0, 0, 0]]
    assert torch.equal(gens[0].get_state(), before[0]) and not torch.equal(gens[1].get_state(), before[1])


def test_fork_rows_is_a_gather_with_repeats_on_every_backend():
    from b2fast import ops

    x = torch.randn(6, 3, 4, 4)
    index = torch.tensor([5, 5, 0, 2, 2, 2, 1])
    for backend in ops.available_backends("fork_index"):
        with ops.use_backend(backend):
            assert torch.equal(fork_rows(x, index), x.index_select(0, index)), backend


def test_best_is_the_highest_final_reward_and_ignores_nan():
    images = torch.arange(6.0).view(6, 1, 1, 1).expand(6, 3, 2, 2)
    result = FKResult(images, images, torch.tensor([0.1, float("nan"), 0.3, 0.9, 0.2, float("nan")], dtype=torch.float64),
                      torch.zeros(2, 3), torch.zeros(6, dtype=torch.long))
    best_images, rewards, k = result.best()
    assert k.tolist() == [2, 0] and rewards.tolist() == [0.3, 0.9] and best_images[:, 0, 0, 0].tolist() == [2.0, 3.0]


def test_fk_sample_refuses_a_deterministic_sampler():
    policy = SimpleNamespace(steps=SimpleNamespace(table=torch.zeros(4, 6)))
    with pytest.raises(ValueError, match="eta > 0"):
        fk_sample(policy, ["x"], SamplingConfig(), fk(), None, torch.Generator(), torch.Generator())


# ---------------------------------------------------------------------------------------------
# Exactness: 1-D Gaussian data, analytic ε, the DDIM η = 1 step table and reference step

DATA_VAR = 0.25


def gaussian_table(num_steps: int) -> torch.Tensor:
    from diffusers import DDIMScheduler

    from b2fast.core.schedule import build_step_table

    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              clip_sample=False, set_alpha_to_one=True, steps_offset=1)
    return build_step_table(scheduler, num_steps, eta=1.0).table.double()  # last step: sigma = 0


def chain_variance(table: torch.Tensor) -> float:
    """Var of the sampler's output from x_T ~ N(0, 1): with the exact ε of N(0, s²) data each step
    is x' = a·x + σ·z, a linear Gaussian chain (DDIM with a plug-in x̂0 is close to, not exactly,
    the data: the variance below tends to s² as steps grow)."""
    v = 1.0
    for row in table.tolist():
        ab = row[SQRT_AB] ** 2
        a = (row[SQRT_AB_PREV] * row[SQRT_AB] * DATA_VAR + row[DIR_COEF] * row[SQRT_1M_AB]) / (ab * DATA_VAR + 1 - ab)
        v = a * a * v + row[SIGMA] ** 2
    return v


def gaussian_fk(steer: SteerConfig, groups: int, num_steps: int = 100, seed: int = 0) -> FKResult:
    table = gaussian_table(num_steps)

    def step(x, i, noise):
        ab = table[i, SQRT_AB] ** 2
        eps = table[i, SQRT_1M_AB] * x / (ab * DATA_VAR + 1 - ab)  # E[ε | x_t] for N(0, s²) data
        index = torch.full((x.shape[0],), i, dtype=torch.long)
        x_prev, _ = ddim.ddim_step_with_logprob(None, eps, 1.0, x, noise.double(), table, index, torch.float64)
        return x_prev, (x - table[i, SQRT_1M_AB] * eps) / table[i, SQRT_AB]

    draw = noise_source(torch.Generator().manual_seed(seed), groups, torch.device("cpu"))
    x = draw((groups * steer.particles, 1)).double()
    return fk_loop(step, lambda x: (x, x.reshape(-1)), x, num_steps, steer, groups, draw,
                   torch.Generator().manual_seed(seed + 1))


def weighted_means(result: FKResult) -> torch.Tensor:
    g, n = result.log_weights.shape
    return (result.log_weights.exp() * result.latents.view(g, n)).sum(dim=1)


def test_the_gaussian_chain_variance_is_right_and_tends_to_the_data_variance():
    steer = fk(particles=1, lam=0.0)
    samples = gaussian_fk(steer, groups=20000).latents
    v100 = chain_variance(gaussian_table(100))
    assert samples.var().item() == pytest.approx(v100, rel=0.04)  # 20000 samples: 1% standard error
    variances = [chain_variance(gaussian_table(s)) for s in (20, 100, 500)]
    assert variances[0] < variances[1] < variances[2] < DATA_VAR and DATA_VAR - variances[2] < 0.01


@pytest.mark.parametrize("kw", [dict(potential="diff"), dict(potential="rt"),
                                dict(potential="diff", resample="adaptive"),
                                dict(potential="rt", resample="adaptive")])
def test_fk_mean_is_the_tilted_mean(kw):
    """r(x) = x, target ∝ p(x)·exp(λx): for Gaussian p = N(0, v) the mean is λ·v (λσ² for the
    exact sampler). 64 independent prompts × 256 particles; 4 standard errors over prompts."""
    lam = 2.0
    means = weighted_means(gaussian_fk(fk(particles=256, lam=lam, **kw), groups=64))
    target = lam * chain_variance(gaussian_table(100))
    standard_error = means.std().item() / math.sqrt(means.numel())
    assert abs(means.mean().item() - target) < 4 * standard_error, (means.mean().item(), target, standard_error)
    assert standard_error < 0.02


def test_official_weights_drop_the_potentials_of_skipped_steps():
    """Issue #12: adaptive resampling with a potential at every step. SMC weights carry the
    skipped steps' potentials and reach the tilted mean; the official incremental weights forget
    them, and ``diff`` then barely steers at all."""
    lam, steer = 2.0, dict(particles=64, potential="diff", resample="adaptive", start=1, every=1, end=99)
    target = lam * chain_variance(gaussian_table(100))
    smc = weighted_means(gaussian_fk(fk(lam=lam, weights="smc", **steer), groups=128))
    official = weighted_means(gaussian_fk(fk(lam=lam, weights="official", **steer), groups=128))
    assert abs(smc.mean().item() - target) < 0.05 * target + 4 * smc.std().item() / math.sqrt(128)
    assert official.mean().item() < 0.2 * target


def test_the_error_shrinks_as_particles_grow():
    """Self-normalised weights bias SMC by O(1/N): visible with 16 particles, gone within the
    standard error with 256 (same number of rows, 16384, both times)."""
    target = 2.0 * chain_variance(gaussian_table(100))
    errors = {}
    for n in (16, 256):
        means = weighted_means(gaussian_fk(fk(particles=n, lam=2.0), groups=16384 // n))
        errors[n] = (means.mean().item() - target, means.std().item() / math.sqrt(means.numel()))
    assert abs(errors[16][0]) > 5 * errors[16][1]
    assert abs(errors[256][0]) < 4 * errors[256][1] and abs(errors[256][0]) < abs(errors[16][0]) / 3


# ---------------------------------------------------------------------------------------------
# The toy model


@pytest.fixture(scope="module")
def toy_policy():
    from b2fast.config import ModelConfig
    from b2fast.core.policy import Policy

    torch.manual_seed(0)
    return Policy(ModelConfig(path="b2fast:toy", dtype="float32"), torch.device("cpu"), num_steps=8, eta=1.0)


PROMPTS = ["a red circle", "a blue square left of a green triangle"]


def test_lambda_zero_with_adaptive_resampling_is_plain_sampling_bit_for_bit(toy_policy):
    from b2fast.core.sampling import generate
    from b2fast.rewards import build_reward

    cfg, n = SamplingConfig(num_steps=8), 3
    plain = generate(toy_policy, [p for p in PROMPTS for _ in range(n)], cfg, torch.Generator().manual_seed(7))
    result = fk_sample(toy_policy, PROMPTS, cfg, fk(particles=n, lam=0.0, resample="adaptive"),
                       build_reward("toy_align"), torch.Generator().manual_seed(7), torch.Generator().manual_seed(8))
    assert torch.equal(result.images, plain)
    assert not any(any(h["resampled"]) for h in result.history)
    assert result.ancestors.tolist() == [0, 1, 2] * len(PROMPTS)
    assert result.rewards.shape == (len(PROMPTS) * n,) and torch.isfinite(result.rewards).all()


def test_duplicated_particles_diverge_after_resampling(toy_policy):
    """The first potential puts all weight on particle 1 of each prompt, later ones are flat: every
    final particle descends from particle 1, and yet no two are alike (each row draws fresh noise)."""
    calls = []

    def reward(images, prompts):
        calls.append(len(prompts))
        scores = torch.zeros(len(prompts))
        if len(calls) == 1:
            scores[1::4] = 1.0
        return scores

    steer = fk(particles=4, lam=100.0, resample="adaptive", start=20, every=20, end=20)  # 8 steps: step 2, then 7
    result = fk_sample(toy_policy, PROMPTS, SamplingConfig(num_steps=8), steer, reward,
                       torch.Generator().manual_seed(0), torch.Generator().manual_seed(1))
    assert [h["step"] for h in result.history] == [2, 7]
    assert result.history[0]["resampled"] == [True, True] and result.history[1]["resampled"] == [False, False]
    assert result.ancestors.tolist() == [1] * 8
    for group in result.latents.view(2, 4, -1):
        assert all(not torch.equal(group[a], group[b]) for a in range(4) for b in range(a + 1, 4))
        assert torch.cdist(group, group).max() > 1.0  # diverged visibly, not by rounding


# ---------------------------------------------------------------------------------------------
# The steer config section


def test_training_refuses_steering_in_one_line():
    cfg = Config()
    cfg.steer.kind = "fk"
    with pytest.raises(ConfigError, match=r"^steer\.kind: .*not samples of the policy.*PPO ratios and z-scores") as err:
        validate(cfg)
    assert "\n" not in str(err.value)
    assert validate(cfg, training=False) is cfg  # the sample CLI allows it


@pytest.mark.parametrize("field, value, fragment", [
    ("kind", "smc", "steer.kind"), ("particles", 0, "steer.particles"), ("lam", -1.0, "steer.lam"),
    ("potential", "sum", "steer.potential"), ("resample", "always", "steer.resample"),
    ("start", -1, "steer.start"), ("every", 0, "steer.every"), ("end", 2, "steer.end"),
    ("weights", "incremental", "steer.weights"),
])
def test_steer_fields_are_validated(field, value, fragment):
    cfg = Config()
    setattr(cfg.steer, field, value)
    with pytest.raises(ConfigError, match=fragment):
        validate(cfg, training=False)


def test_fk_needs_a_stochastic_sampler():
    cfg = Config()
    cfg.steer.kind, cfg.sampling.eta = "fk", 0.0
    with pytest.raises(ConfigError, match="sampling.eta"):
        validate(cfg, training=False)

