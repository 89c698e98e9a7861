"""Branch-based sampling: a shared trunk, a fork into K branches, then the trained interval.

For P prompts: run the first S − L steps once per prompt (batch P), fork each latent into K
branches (batch P·K) and run the last L steps for all branches in one UNet call per step.
Only what training needs is kept: the fork latent once per group, the L latents after each
interval step per branch, their log-probs, and the final images for the reward.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable

import torch

from b2fast import ops
from b2fast.config import SamplingConfig
from b2fast.core.policy import Policy


@dataclass
class TrajectoryBatch:
    """The interval steps of N = G·K branches; ``x_t``/``x_prev`` rebuild any step's pair."""

    fork_latents: torch.Tensor   # (G, C, H, W) cache dtype: x at the fork, shared by a group
    latents: torch.Tensor        # (N, L, C, H, W) cache dtype: x_t' after interval step j
    log_probs: torch.Tensor      # (N, L) fp32: log p_old of interval step j
    step_indices: torch.Tensor   # (L,) int64: step-table rows of the interval steps
    group_ids: torch.Tensor      # (N,) int64: trunk (row of fork_latents) of each branch
    prompt_ids: torch.Tensor     # (N,) int64: index of each branch's prompt in the prompt set
    prompts: list[str]           # (N,) prompt text of each branch
    images: torch.Tensor | None  # (N, 3, H', W') fp32 in [0, 1]: decoded final latents (None: not yet)
    image_latents: torch.Tensor | None = None  # (N, C, H, W) what images decode, when not the last latent

    def __len__(self) -> int:
        return self.latents.shape[0]

    @property
    def interval_len(self) -> int:
        return self.latents.shape[1]

    def x_t(self, rows: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """Latent *before* interval step j of branch ``rows`` (the fork latent when j = 0)."""
        before = self.latents[rows, (j - 1).clamp(min=0)]
        fork = self.fork_latents[self.group_ids[rows]]
        return torch.where((j == 0).view(-1, 1, 1, 1), fork, before)

    @property
    def final_latents(self) -> torch.Tensor:
        """(N, C, H, W): what ``images`` decodes: the last interval step's output (for RLCM's noisy
        last step, its mean d)."""
        return self.latents[:, -1] if self.image_latents is None else self.image_latents

    def x_prev(self, rows: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """Latent *after* interval step j of branch ``rows``."""
        return self.latents[rows, j]

    @staticmethod
    def cat(batches: list["TrajectoryBatch"]) -> "TrajectoryBatch":
        """Concatenate batches of one stage (same interval), renumbering the groups."""
        offsets, total = [], 0
        for b in batches:
            offsets.append(total)
            total += b.fork_latents.shape[0]
        merged = {}
        for f in fields(TrajectoryBatch):
            values = [getattr(b, f.name) for b in batches]
            if f.name == "step_indices":
                merged[f.name] = values[0]
            elif f.name == "group_ids":
                merged[f.name] = torch.cat([v + o for v, o in zip(values, offsets)])
            elif f.name == "prompts":
                merged[f.name] = [p for v in values for p in v]
            elif f.name in ("images", "image_latents") and any(v is None for v in values):
                merged[f.name] = None
            else:
                merged[f.name] = torch.cat(values)
        return TrajectoryBatch(**merged)


StepFunction = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def step_function(policy: Policy, cfg: SamplingConfig, cache_dtype: torch.dtype) -> StepFunction:
    """(x, step_index, cond, noise) → (x_prev, log p): one DDIM step with CFG, every latent at
    its own schedule row; with ``cfg.cuda_graphs`` on a GPU, captured once per batch shape and
    replayed (the step index is a device tensor, so one graph serves every step and stage)."""
    use_cfg = cfg.guidance_scale != 1.0

    def step(x, step_index, cond, noise):
        eps_uncond, eps_cond = policy.predict_eps(x, step_index, cond, cfg.guidance_scale, use_cfg, cfg.unet_batch)
        return ops.ddim_step_with_logprob(eps_uncond, eps_cond, cfg.guidance_scale, x, noise,
                                          policy.steps.table, step_index, cache_dtype,
                                          policy.steps.clip_sample_range, cfg.logprob_reduction)

    if cfg.cuda_graphs and policy.device.type == "cuda":
        key = ("ddim_step", cfg.guidance_scale, cache_dtype, cfg.unet_batch, cfg.logprob_reduction)
        return policy.captured(key, step)
    return step


def _denoise_step(step: StepFunction, x: torch.Tensor, i: int, cond: torch.Tensor,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One DDIM step of every latent in ``x`` at schedule row i: returns (x_prev, log p, noise)."""
    step_index = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)
    return (*step(x, step_index, cond, noise), noise)


@torch.no_grad()
def sample_branches(policy: Policy, prompts: list[str], prompt_ids: torch.Tensor, interval_len: int,
                    cfg: SamplingConfig, generator: torch.Generator, decode: bool = True) -> TrajectoryBatch:
    """Trunk → fork → branches for one batch of P prompts; keeps only the interval steps.

    ``decode=False`` leaves ``images`` None, for a caller that decodes ``final_latents`` itself
    (e.g. in a worker that overlaps the next batch's sampling).
    """
    S, K, P = policy.steps.num_steps, cfg.branches, len(prompts)
    if not 1 <= interval_len <= S:
        raise ValueError(f"interval length must be in [1, {S}], got {interval_len}")
    cache_dtype = getattr(torch, cfg.cache_dtype)
    device = policy.device
    step = step_function(policy, cfg, cache_dtype)
    cond = policy.embed(prompts)                                            # (P, 77, D)
    x = torch.randn((P, *policy.latent_shape), generator=generator, device=device).to(cache_dtype)
    for i in range(S - interval_len):                                       # shared trunk
        x, _, _ = _denoise_step(step, x, i, cond, generator)
    fork_latents = x
    x, groups = ops.branch_fork(x, K, cache_dtype)                          # (P·K, C, H, W)
    cond = cond.repeat_interleave(K, dim=0)
    latents, log_probs = [], []
    for i in range(S - interval_len, S):                                    # trained interval
        x, log_prob, noise = _denoise_step(step, x, i, cond, generator)
        latents.append(x)
        log_probs.append(log_prob.float())
    image_latents = policy.steps.image_latents(x, noise)
    return TrajectoryBatch(
        fork_latents=fork_latents, latents=torch.stack(latents, dim=1),
        log_probs=torch.stack(log_probs, dim=1),
        step_indices=torch.arange(S - interval_len, S, device=device), group_ids=groups,
        prompt_ids=prompt_ids.to(device).repeat_interleave(K),
        prompts=[p for p in prompts for _ in range(K)],
        images=policy.decode(image_latents, cfg.unet_batch) if decode else None,
        image_latents=image_latents if policy.steps.noisy_last else None)


@torch.no_grad()
def generate(policy: Policy, prompts: list[str], cfg: SamplingConfig,
             generator: torch.Generator) -> torch.Tensor:
    """Plain sampling of the whole chain, one independent x_T per prompt: images (N, 3, H, W)."""
    cache_dtype = getattr(torch, cfg.cache_dtype)
    step = step_function(policy, cfg, cache_dtype)
    cond = policy.embed(prompts)
    x = torch.randn((len(prompts), *policy.latent_shape), generator=generator,
                    device=policy.device).to(cache_dtype)
    for i in range(policy.steps.num_steps):
        x, _, noise = _denoise_step(step, x, i, cond, generator)
    return policy.decode(policy.steps.image_latents(x, noise), cfg.unet_batch)
