"""The LCM (latent consistency model) step table: every DDIM kernel runs the LCM policy's step
and log-prob through it. Truth is diffusers' ``LCMScheduler.step`` (non-final steps, given the
same noise), RLCM's step formula (``rlcm_compat``) re-derived in float64, and a float64
Gaussian density for the log-prob; each live backend against them."""
from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler, LCMScheduler
from test_ddim_step import SD, Backend, backend, rel_err  # noqa: F401  (backend: the fixture)

from b2fast import ops
from b2fast.core.schedule import build_lcm_table, lcm_timesteps, step_gains


def lcm_scheduler() -> LCMScheduler:
    return LCMScheduler.from_config(DDIMScheduler(**SD).config)


def inputs(shape, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    eps, x_t = (torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) for _ in range(2))
    return eps, 2 * x_t


@pytest.mark.parametrize("num_steps", [1, 2, 4, 8])
def test_timesteps_are_diffusers_and_rlcm_spacing_under_compat(num_steps):
    lcm = lcm_scheduler()
    lcm.set_timesteps(num_steps)
    assert build_lcm_table(DDIMScheduler(**SD), num_steps).timesteps.tolist() == lcm.timesteps.tolist()
    origin = [999 - 20 * i for i in range(50)]                # 999, 979, …, 19
    assert lcm_timesteps(lcm, num_steps, rlcm_compat=True).tolist() == origin[::50 // num_steps][:num_steps]
    assert lcm_timesteps(lcm, 4, rlcm_compat=True).tolist() == [999, 759, 519, 279]
    assert lcm_timesteps(lcm, 4).tolist() == [999, 759, 499, 259]


@pytest.mark.parametrize("num_steps", [2, 4, 8])
def test_step_equals_diffusers_lcm_scheduler_step_given_its_noise(backend, num_steps):
    table = build_lcm_table(DDIMScheduler(**SD), num_steps).table
    lcm = lcm_scheduler()
    lcm.set_timesteps(num_steps)
    shape = (3, 4, 8, 8)
    for i, t in enumerate(lcm.timesteps.tolist()):
        eps, x_t = inputs(shape, seed=10 + i, dtype=torch.float32)
        out = lcm.step(eps, t, x_t, generator=torch.Generator().manual_seed(i))
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(i), dtype=torch.float32)
        step = torch.full((shape[0],), i, dtype=torch.long)
        x_prev, log_prob = ops.ddim_step_with_logprob(None, backend.to(eps), 1.0, *backend.to(x_t, noise, table.float(),
                                                      step), torch.float32)
        assert rel_err(x_prev.cpu(), out.prev_sample) < 2e-5, (i, t)
        if i == num_steps - 1:                                # diffusers returns d: no noise, not trained
            torch.testing.assert_close(x_prev.cpu(), out.denoised, rtol=0, atol=2e-5)
            assert torch.equal(log_prob.cpu(), torch.zeros(shape[0]))


def rlcm_step(eps, x_t, noise, t, t_prev, alphas_cumprod, timestep_scaling=10.0):
    """RLCM's step in float64: d from (x̂₀, x_t) with c_skip, c_out at t; x' = √ᾱ'·d + √(1−ᾱ')·z;
    log N(x'; √ᾱ'·d, (1−ᾱ')I) averaged over elements. Returns (x', log p, d)."""
    ab, ab_prev = alphas_cumprod[t].double(), alphas_cumprod[t_prev].double()
    x0 = (x_t - (1 - ab).sqrt() * eps) / ab.sqrt()
    scaled = t * timestep_scaling
    c_skip, c_out = 0.25 / (scaled ** 2 + 0.25), scaled / math.sqrt(scaled ** 2 + 0.25)
    d = c_out * x0 + c_skip * x_t
    mean, std = ab_prev.sqrt() * d, (1 - ab_prev).sqrt()
    x_prev = mean + std * noise
    log_prob = torch.distributions.Normal(mean, std).log_prob(x_prev).flatten(1).mean(1)
    return x_prev, log_prob, d


def test_rlcm_compat_matches_rlcm_step_including_its_noisy_last_step(backend):
    num_steps = 4
    steps = build_lcm_table(DDIMScheduler(**SD), num_steps, rlcm_compat=True)
    ab = lcm_scheduler().alphas_cumprod
    shape = (2, 4, 8, 8)
    for i, t in enumerate(steps.timesteps.tolist()):
        t_prev = steps.timesteps[i + 1].item() if i + 1 < num_steps else t   # RLCM: ᾱ' = ᾱ_t at the end
        eps, x_t = inputs(shape, seed=i)
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(100 + i), dtype=torch.float64)
        x_truth, lp_truth, _ = rlcm_step(eps, x_t, noise, t, t_prev, ab)
        step = torch.full((shape[0],), i, dtype=torch.long)
        x_prev, log_prob = ops.ddim_step_with_logprob(None, backend.to(eps), 1.0,
                                                      *backend.to(x_t, noise, steps.table, step), torch.float64)
        assert rel_err(x_prev.cpu(), x_truth) < 1e-10
        assert rel_err(log_prob.cpu(), lp_truth) < 1e-10
        assert bool((log_prob != 0).all())                    # every step scored, the last one too


def test_log_prob_is_the_gaussian_density_and_on_policy_ratio_is_one(backend):
    """Fresh inputs at every (non-final) step in fp32: the op's log p against a float64
    Gaussian around diffusers' d, and the training log-prob of the sampled action against the
    sampling one (PPO's ratio must be 1 before any update)."""
    num_steps = 8
    table = build_lcm_table(DDIMScheduler(**SD), num_steps).table.float()
    lcm = lcm_scheduler()
    lcm.set_timesteps(num_steps)
    ab = lcm.alphas_cumprod.double()
    g = torch.Generator().manual_seed(7)
    shape = (num_steps - 1, 4, 8, 8)
    eps, x_t = inputs(shape, seed=3, dtype=torch.float32)
    noise = torch.randn(shape, generator=g)
    step = torch.arange(num_steps - 1)
    x_prev, log_prob = ops.ddim_step_with_logprob(None, backend.to(eps), 1.0, *backend.to(x_t, noise, table, step),
                                                  torch.float32)
    again = ops.ddim_logprob(None, backend.to(eps), 1.0, *backend.to(x_t, x_prev, table, step))
    assert (again.cpu() - log_prob.cpu()).abs().max() < 1e-5
    for b, i in enumerate(step.tolist()):
        t, t_prev = lcm.timesteps[i].item(), lcm.timesteps[i + 1].item()
        _, _, d = rlcm_step(eps[b:b + 1].double(), x_t[b:b + 1].double(), noise[b:b + 1].double(), t, t_prev, ab)
        density = torch.distributions.Normal(ab[t_prev].sqrt() * d, (1 - ab[t_prev]).sqrt())
        truth = density.log_prob(x_prev[b:b + 1].cpu().double()).mean()
        assert abs(log_prob[b].item() - truth.item()) < 1e-4 * max(1.0, abs(truth.item()))


def test_a_deterministic_last_step_has_no_gradient_gain_and_clipping_models_are_refused():
    steps = build_lcm_table(DDIMScheduler(**SD), 4)
    gains = step_gains(steps.table)
    assert math.isinf(gains[-1]) and bool(torch.isfinite(gains[:-1]).all())
    with pytest.raises(ValueError, match="clip_sample"):
        build_lcm_table(DDIMScheduler(**{**SD, "clip_sample": True}), 4)
    with pytest.raises(ValueError, match="1 to 50 steps"):
        lcm_timesteps(lcm_scheduler(), 60, rlcm_compat=True)
