"""Feynman-Kac (FK) steering: reward-guided sampling by sequential Monte Carlo over particles.

Each prompt's N particles are rows of one batch of the stochastic DDIM sampler (several prompts
per batch). At the potential steps every particle's x̂0 is decoded and scored, a potential G
turns the reward into a weight, and each prompt's particles are resampled, multinomially with
replacement, by their weights (Singhal et al. 2025, "A General Framework for Inference-time
Scaling and Steering of Diffusion Models"; code: zacharyhorvitz/Fk-Diffusion-Steering).
The last potential divides out the particle's past potentials for the potentials that do not
telescope, so the particles target p(x0)·exp(λ·r̃(x0)): r̃ = r for ``diff`` and ``rt``, the
running max or sum of the particle's rewards for ``max`` and ``add``.

Where this differs from the official code, on purpose:

- weights live in log space, normalised per prompt by log-sum-exp (no 1e10 clamp); a NaN reward
  gives weight 0, and a prompt whose particles all have weight 0 falls back to equal weights;
- ``weights="smc"`` carries the accumulated log-weights across the steps the adaptive ESS test
  skips (standard SMC, the view of its issue #12); ``weights="official"`` weighs each step by
  that step's potential alone, as the official code does;
- the last potential scores the sampler's output (the returned images) rather than x̂0 of the
  last step's input: the same when the last DDIM step is deterministic, and the target stays
  exact when it is not;
- the resampling draws come from their own generator, so the sampler's noise stream is untouched
  and a duplicated particle draws fresh noise at its next step, like every row.

Steered samples are not samples of the policy: never train on them (``config.validate``
refuses ``steer.kind`` other than 'none' for training).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from b2fast import ops
from b2fast.config import POTENTIALS, SamplingConfig, SteerConfig
from b2fast.core.policy import Policy
from b2fast.ops.reference.ddim import SIGMA, SQRT_1M_AB, SQRT_AB

REFERENCE_STEPS = 100  # steer.start/every/end count steps of a chain this long (the paper's)

Generators = torch.Generator | Sequence[torch.Generator]  # one for the batch, or one per prompt
FKStep = Callable[[torch.Tensor, int, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
Score = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


# ---------------------------------------------------------------------------------------------
# Pure pieces: schedule, potentials, weights, resampling


def resampling_steps(start: int, every: int, end: int, num_steps: int,
                     reference: int = REFERENCE_STEPS) -> list[int]:
    """Step indices (0 = the first, noisiest step) whose potential is applied: start, start +
    every, … ≤ end, given on a ``reference``-step chain and scaled by num_steps / reference
    (rounded half up, every ≥ 1; 100 steps: 5, 10, …, 30; 20 steps: 1, 2, …, 6), plus the last."""
    def scaled(v: int) -> int:
        return math.floor(v * num_steps / reference + 0.5)

    first, stride, last = scaled(start), max(1, scaled(every)), min(scaled(end), num_steps - 1)
    return sorted(set(range(first, last + 1, stride)) | {num_steps - 1})


def log_potential(potential: str, lam: float, r: torch.Tensor, r_prev: torch.Tensor,
                  log_product: torch.Tensor, final: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(log G, r̃) per particle. r̃ is the transformed reward the particle carries on as r_prev
    (running max for ``max``, running sum for ``add``, else r). At the final step ``max``, ``add``
    and ``rt`` give exp(λ·r̃)/∏ past potentials (``log_product``), so the product of all of a
    particle's potentials is exp(λ·r̃); ``diff`` telescopes to that already. A non-finite log G
    (NaN reward) is −inf: weight 0."""
    if potential not in POTENTIALS:
        raise ValueError(f"steer.potential: got {potential!r}, expected one of {POTENTIALS}")
    r_tilde = {"max": torch.maximum(r, r_prev), "add": r + r_prev}.get(potential, r)
    if lam == 0:  # no steering, whatever the rewards (NaN included)
        return torch.zeros_like(r), r_tilde
    log_g = lam * (r - r_prev) if potential == "diff" else lam * r_tilde
    if final and potential != "diff":
        log_g = log_g - log_product
    return torch.where(torch.isfinite(log_g), log_g, torch.full_like(log_g, -math.inf)), r_tilde


def normalise_log_weights(log_w: torch.Tensor) -> torch.Tensor:
    """(G, N) log-weights → log w̄ with Σ_n w̄ = 1 per prompt (row), by log-sum-exp; a row of
    zero weights (all −inf) becomes uniform."""
    lse = torch.logsumexp(log_w, dim=1, keepdim=True)
    uniform = torch.full_like(log_w, -math.log(log_w.shape[1]))
    return torch.where(torch.isfinite(lse), log_w - lse, uniform)


def effective_sample_size(log_w: torch.Tensor) -> torch.Tensor:
    """(G,) ESS = 1 / Σ_n w̄_n² of each row of (G, N) log-weights: N for equal weights, 1 for one."""
    return torch.exp(-torch.logsumexp(2 * normalise_log_weights(log_w), dim=1))


def draw_ancestors(log_w: torch.Tensor, generator: Generators, rows: torch.Tensor) -> torch.Tensor:
    """(G, N) within-prompt indices: multinomial with replacement from each row's weights for
    the prompts where ``rows`` is True, the identity elsewhere. With one generator per prompt
    only the resampled prompts draw (a prompt's draws then depend on nothing else in the batch)."""
    g, n = log_w.shape
    probs = normalise_log_weights(log_w).exp()
    index = torch.arange(n).expand(g, n).clone()
    if isinstance(generator, torch.Generator):
        if rows.any():
            drawn = torch.multinomial(probs, n, replacement=True, generator=generator)
            index[rows] = drawn[rows]
        return index
    for k in rows.nonzero().flatten().tolist():
        index[k] = torch.multinomial(probs[k], n, replacement=True, generator=generator[k])
    return index


def fork_rows(latents: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` of ``latents`` (repeats allowed), by the fork-by-index op: the one place
    resampling gathers latents (= ``latents.index_select(0, index)``)."""
    return ops.fork_index(latents, index, cache_dtype=latents.dtype)


@dataclass
class Particles:
    """SMC state of G prompts × N particles, (G, N) on the CPU: r_prev (r̃ at the last potential
    step), log_product (Σ log G along the particle's ancestry), log_w (log-weight since the last
    resampling), ancestors (the initial particle each descends from)."""

    r_prev: torch.Tensor
    log_product: torch.Tensor
    log_w: torch.Tensor
    ancestors: torch.Tensor

    @classmethod
    def start(cls, groups: int, n: int) -> "Particles":
        zeros = torch.zeros(groups, n, dtype=torch.float64)  # r_prev starts at 0, as the official code
        return cls(zeros, zeros.clone(), zeros.clone(), torch.arange(n).expand(groups, n).clone())

    def gather(self, index: torch.Tensor) -> "Particles":
        """Every field by the same within-prompt ``index`` (G, N): a particle keeps its history."""
        return Particles(*(t.gather(1, index) for t in (self.r_prev, self.log_product, self.log_w, self.ancestors)))


def weigh_and_resample(state: Particles, r: torch.Tensor, steer: SteerConfig, final: bool,
                       generator: Generators) -> tuple[Particles, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """One potential step on rewards r (G, N): (new state, within-prompt index (G, N) or None
    when no prompt resampled, ESS before resampling (G,), resampled (G,) bool). Resampled
    prompts restart from equal weights; the final step, and every step when adaptive, resamples
    only a prompt whose ESS < N/2."""
    log_g, r_tilde = log_potential(steer.potential, steer.lam, r, state.r_prev, state.log_product, final)
    log_w = state.log_w + log_g if steer.weights == "smc" else log_g
    new = Particles(r_tilde, state.log_product + log_g, log_w, state.ancestors)
    ess = effective_sample_size(log_w)
    n = r.shape[1]
    resample = ess < n / 2 if final or steer.resample == "adaptive" else torch.ones_like(ess, dtype=torch.bool)
    if not resample.any():
        return new, None, ess, resample
    index = draw_ancestors(log_w, generator, resample)
    new = new.gather(index)
    new.log_w = torch.where(resample[:, None], torch.zeros_like(new.log_w), new.log_w)
    return new, index, ess, resample


# ---------------------------------------------------------------------------------------------
# The sampler


@dataclass
class FKResult:
    """The final particles of P prompts × N particles, rows prompt-major (row p·N + n)."""

    latents: torch.Tensor      # (P·N, C, H, W)
    images: torch.Tensor       # (P·N, 3, H, W) in [0, 1]
    rewards: torch.Tensor      # (P·N,) float64 CPU: reward of each final image (NaN: failed)
    log_weights: torch.Tensor  # (P, N) normalised (uniform after a final resampling)
    ancestors: torch.Tensor    # (P·N,) the initial particle (within its prompt) each descends from
    history: list[dict] = field(default_factory=list)  # per potential step: step, ess, resampled

    @property
    def particles(self) -> int:
        return self.log_weights.shape[1]

    def best(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(images (P, 3, H, W), rewards (P,), particle index (P,)) of each prompt's highest-reward particle."""
        p, n = self.log_weights.shape
        k = torch.nan_to_num(self.rewards.view(p, n), nan=-math.inf).argmax(dim=1)
        rows = torch.arange(p) * n + k
        return self.images[rows.to(self.images.device)], self.rewards[rows], k


def noise_source(generator: Generators, groups: int, device: torch.device) -> Callable[[tuple], torch.Tensor]:
    """Standard normal noise of a given shape for ``groups`` equal groups of rows: from one
    generator, as ``sampling.generate`` draws it; or per group from its own generator, so a
    group's noise does not depend on what else is in the batch (fixed seeds per image)."""
    def draw(shape: tuple) -> torch.Tensor:
        if isinstance(generator, torch.Generator):
            return torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
        rows = (shape[0] // groups, *shape[1:])
        return torch.cat([torch.randn(rows, generator=g, device=device, dtype=torch.float32) for g in generator])
    return draw


def fk_loop(step: FKStep, score: Score, x: torch.Tensor, num_steps: int, steer: SteerConfig,
            groups: int, draw: Callable[[tuple], torch.Tensor], resample_generator: Generators) -> FKResult:
    """The SMC loop, model-agnostic. ``step(x, i, noise)`` → (x after step i, x̂0 of x);
    ``score(latents)`` → (images, rewards (rows,)). At each scheduled step the potential is on
    x̂0 of the step's input and the resampled objects are its outputs (as the official code); the
    last potential is on the final latents."""
    n = steer.particles
    offsets = (torch.arange(groups) * n)[:, None]
    schedule = set(resampling_steps(steer.start, steer.every, steer.end, num_steps))
    state, history = Particles.start(groups, n), []

    def potential(i: int, r: torch.Tensor, final: bool) -> torch.Tensor | None:
        nonlocal state
        state, index, ess, done = weigh_and_resample(state, r.reshape(groups, n).double(), steer, final,
                                                     resample_generator)
        history.append({"step": i, "ess": ess.tolist(), "resampled": done.tolist()})
        return None if index is None else (index + offsets).flatten()

    for i in range(num_steps):
        x_next, x0 = step(x, i, draw(tuple(x.shape)))
        if i in schedule and i < num_steps - 1:
            rows = potential(i, score(x0)[1], final=False)
            if rows is not None:
                x_next = fork_rows(x_next, rows.to(x_next.device))
        x = x_next
    images, r = score(x)
    r = r.double()
    rows = potential(num_steps - 1, r, final=True)
    if rows is not None:
        x, images, r = fork_rows(x, rows.to(x.device)), images[rows.to(images.device)], r[rows]
    return FKResult(x, images, r, normalise_log_weights(state.log_w), state.ancestors.flatten(), history)


def fk_step_function(policy: Policy, cfg: SamplingConfig, cache_dtype: torch.dtype):
    """(x, step_index, cond, noise) → (x_prev, x̂0): ``sampling.step_function``'s DDIM step
    (the same ops, so x_prev is the same bit for bit) plus x̂0 = (x_t − √(1−ᾱ_t)·ε̂)/√ᾱ_t, which
    the potentials score. Captured as a CUDA graph under the same conditions."""
    use_cfg = cfg.guidance_scale != 1.0
    table, clip = policy.steps.table, policy.steps.clip_sample_range

    def step(x, step_index, cond, noise):
        eps_uncond, eps_cond = policy.predict_eps(x, step_index, cond, cfg.guidance_scale, use_cfg, cfg.unet_batch)
        x_prev, _ = ops.ddim_step_with_logprob(eps_uncond, eps_cond, cfg.guidance_scale, x, noise, table,
                                               step_index, cache_dtype, clip, cfg.logprob_reduction)
        eps = ops.cfg_combine(None if eps_uncond is None else eps_uncond.float(), eps_cond.float(),
                              cfg.guidance_scale)
        rows = table.index_select(0, step_index).float().view(-1, *([1] * (x.dim() - 1)), table.shape[1])
        x0 = (x.float() - rows[..., SQRT_1M_AB] * eps) / rows[..., SQRT_AB]
        return x_prev, x0 if clip is None else x0.clamp(-clip, clip)

    if cfg.cuda_graphs and policy.device.type == "cuda":
        key = ("fk_step", cfg.guidance_scale, cache_dtype, cfg.unet_batch, cfg.logprob_reduction)
        return policy.captured(key, step)
    return step


@torch.no_grad()
def fk_sample(policy: Policy, prompts: list[str], sampling_cfg: SamplingConfig, steer_cfg: SteerConfig,
              reward: Callable, generator: Generators, resample_generator: Generators) -> FKResult:
    """FK-steered images of each prompt: N = ``steer_cfg.particles`` particles per prompt, all
    prompts in one batch. ``reward(images, prompts)`` → one score per image. ``generator`` draws
    x_T and every step's noise (one for the batch, drawn as ``sampling.generate`` does, or one
    per prompt); ``resample_generator`` (CPU; one, or one per prompt) draws the resampling."""
    if not bool((policy.steps.table[:, SIGMA] > 0).any()):
        raise ValueError("sampling.eta: FK steering needs a stochastic sampler (eta > 0); with eta 0 "
                         "resampled copies stay identical")
    n, groups = steer_cfg.particles, len(prompts)
    rows = [p for p in prompts for _ in range(n)]
    cache_dtype = getattr(torch, sampling_cfg.cache_dtype)
    cond = policy.embed(rows)
    ddim = fk_step_function(policy, sampling_cfg, cache_dtype)

    def step(x, i, noise):
        return ddim(x, torch.full((x.shape[0],), i, dtype=torch.long, device=x.device), cond, noise)

    def score(latents):
        images = policy.decode(latents, sampling_cfg.unet_batch)
        return images, torch.as_tensor(reward(images, rows)).detach().to("cpu", torch.float64).reshape(-1)

    draw = noise_source(generator, groups, policy.device)
    x = draw((len(rows), *policy.latent_shape)).to(cache_dtype)
    return fk_loop(step, score, x, policy.steps.num_steps, steer_cfg, groups, draw, resample_generator)
