"""The policy update of one stage: the objective (``train.objective``, PPO-clip by default) over
the kept trajectories' interval steps.

Semantics (docs/algorithm.md, "Policy update"): each epoch shuffles the kept trajectories
and, independently per trajectory, the order of its interval steps. Trajectories are taken
``trajectories_per_step`` at a time; one optimizer step sees all (trajectory, step) pairs of
those trajectories, fed to the UNet ``micro_batch`` pairs per call (pairs of one call may be at
different timesteps). The loss of an optimizer step is the mean over its pairs, so the
micro-batch size changes only memory and speed, never the maths.

With several ranks (see :mod:`b2fast.distributed`) every rank draws the same shuffles, computes
the loss terms of the pairs whose trajectories it sampled, divided by the pair count of the
whole optimizer step, and the gradients are summed over ranks before the step: every rank then
takes the step a single process would have taken.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from b2fast import distributed, ops
from b2fast.core.objectives import Objective, get_objective
from b2fast.config import SamplingConfig, TrainConfig
from b2fast.distributed import World
from b2fast.core.policy import Policy
from b2fast.core.sampling import TrajectoryBatch
from b2fast.core.schedule import trained_steps
from b2fast.core.selection import Selection


@dataclass
class UpdateStats:
    """Pair-weighted sums of the loss and of the statistics the objective declares, over
    (trajectory, step) pairs and optimizer steps; ``summary`` gives the means."""
    names: tuple[str, ...]
    pairs: int = 0
    totals: dict[str, float] = field(default_factory=dict)
    grad_norms: list[float] = field(default_factory=list)

    def add(self, n: int, loss: torch.Tensor, stats: dict[str, torch.Tensor]) -> None:
        self.pairs += n
        self.totals["loss"] = self.totals.get("loss", 0.0) + float(loss.detach().sum())
        for name in self.names:
            self.totals[name] = self.totals.get(name, 0.0) + float(stats[name]) * n

    def sum_over_ranks(self, world: World) -> None:
        """Totals of the whole job (the grad norms are already identical on every rank). The names
        come from the objective, so every rank sends the same list (0 where it had no pairs)."""
        keys = ("loss",) + self.names
        summed = distributed.sum_floats(world, [self.pairs] + [self.totals.get(k, 0.0) for k in keys],
                                        "update statistics")
        self.pairs, self.totals = int(summed[0]), dict(zip(keys, summed[1:]))

    def summary(self) -> dict[str, float | int | None]:
        """Means per pair; ``approx_kl`` and ``clipfrac`` always present (None if not reported)."""
        means = {k: None for k in ("loss", "clipfrac", "approx_kl")}
        if self.pairs:
            means.update({k: v / self.pairs for k, v in self.totals.items()})
        grad_norm = sum(self.grad_norms) / len(self.grad_norms) if self.grad_norms else None
        return {**means, "grad_norm": grad_norm, "optimizer_steps": len(self.grad_norms)}


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW, or for ``nsgd`` plain SGD: :func:`_optimizer_step` hands it the unit-norm gradient."""
    if cfg.optimizer == "nsgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                             eps=cfg.adam_eps, weight_decay=cfg.weight_decay)


def _pair_log_probs(policy: Policy, batch: TrajectoryBatch, rows: torch.Tensor, j: torch.Tensor,
                    tcfg: TrainConfig, scfg: SamplingConfig) -> torch.Tensor:
    """log p_θ(x_t' | x_t) of branch ``rows`` at interval position ``j``, with gradients."""
    step = batch.step_indices[j]
    x_t, x_prev = batch.x_t(rows, j), batch.x_prev(rows, j)
    cond = policy.embed([batch.prompts[r] for r in rows.tolist()])
    use_cfg = tcfg.cfg and scfg.guidance_scale != 1.0
    eps_uncond, eps_cond = policy.predict_eps(x_t, step, cond, scfg.guidance_scale, use_cfg)
    w = scfg.guidance_scale if use_cfg else 1.0
    return ops.ddim_logprob(eps_uncond, eps_cond, w, x_t, x_prev, policy.steps.table, step,
                            policy.steps.clip_sample_range, scfg.logprob_reduction)


AUTO_MICRO_BATCH_CPU = 8
MAX_MICRO_BATCH = 128


def micro_batch_for_memory(free_bytes: int, bytes_per_pair: float, fraction: float = 0.8,
                           limit: int = MAX_MICRO_BATCH) -> int:
    """The largest micro-batch whose activations fit in ``fraction`` of the free memory."""
    return max(1, min(limit, int(fraction * free_bytes / max(bytes_per_pair, 1.0))))


def auto_micro_batch(policy: Policy, batch: TrajectoryBatch, tcfg: TrainConfig, scfg: SamplingConfig) -> int:
    """Measure the memory of one forward+backward of 2 pairs and size the micro-batch to the free
    GPU memory (activations grow linearly with the pairs; the weights are already resident)."""
    if policy.device.type != "cuda":
        return AUTO_MICRO_BATCH_CPU
    device = policy.device
    probe = 2
    rows = torch.zeros(probe, dtype=torch.long, device=device)
    positions = torch.arange(probe, device=device) % batch.interval_len
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    start = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    _pair_log_probs(policy, batch, rows, positions, tcfg, scfg).sum().backward()
    per_pair = (torch.cuda.max_memory_allocated(device) - start) / probe
    for p in policy.lora_parameters():
        p.grad = None
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(device)
    return micro_batch_for_memory(free, per_pair)


def _optimizer_step(policy: Policy, optimizer: torch.optim.Optimizer, batch: TrajectoryBatch,
                    rows: torch.Tensor, positions: torch.Tensor, advantages: torch.Tensor, n_pairs: int,
                    objective: Objective, tcfg: TrainConfig, scfg: SamplingConfig, stats: UpdateStats,
                    progress, world: World) -> None:
    """Accumulate this rank's share of the mean loss over the step's ``n_pairs`` pairs (the
    given local (row, position) pairs), sum the gradients over ranks, then one AdamW step."""
    for start in range(0, rows.numel(), tcfg.micro_batch):
        r, j = rows[start:start + tcfg.micro_batch], positions[start:start + tcfg.micro_batch]
        log_prob = _pair_log_probs(policy, batch, r, j, tcfg, scfg)
        loss, loss_stats = objective.loss(log_prob, batch.log_probs[r, j].to(log_prob.device),
                                          advantages[start:start + tcfg.micro_batch], tcfg)
        (loss.sum() / n_pairs).backward()
        stats.add(r.numel(), loss, loss_stats)
        if progress is not None:
            progress.update(r.numel())
    params = policy.lora_parameters()
    distributed.sum_gradients(world, params)
    if tcfg.optimizer == "nsgd":  # the step's direction only: SGD then moves the weights lr
        grad_norm = torch.nn.utils.clip_grad_norm_(params, float("inf"))
        if float(grad_norm) > 0:
            for p in params:
                if p.grad is not None:
                    p.grad.div_(grad_norm)
    else:
        max_norm = tcfg.max_grad_norm if tcfg.max_grad_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    stats.grad_norms.append(float(grad_norm))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def trained_positions(policy: Policy, batch: TrajectoryBatch, tcfg: TrainConfig) -> torch.Tensor:
    """(L,) bool on the CPU: the interval positions ``train.max_step_gain`` leaves trained."""
    return trained_steps(policy.steps.table.cpu(), tcfg.max_step_gain)[batch.step_indices.cpu()]


def policy_update(policy: Policy, optimizer: torch.optim.Optimizer, batch: TrajectoryBatch,
                  selection: Selection, tcfg: TrainConfig, scfg: SamplingConfig,
                  generator: torch.Generator, progress=None, world: World = World(),
                  local_rows: torch.Tensor | None = None) -> dict:
    """Train on the selected branches for ``tcfg.epochs`` epochs; returns mean loss statistics.

    ``selection`` indexes the stage's global table; ``local_rows`` maps a table row to its row
    in this rank's ``batch`` (−1 when another rank holds it). Default: one process, table = batch.
    ``progress`` (e.g. a tqdm bar, optional) is advanced by the pairs trained.
    """
    objective = get_objective(tcfg.objective)
    stats = UpdateStats(objective.stats)
    if tcfg.micro_batch == 0:
        raise ValueError("policy_update: resolve train.micro_batch = 0 with auto_micro_batch first")
    if local_rows is None:
        local_rows = torch.arange(len(batch))
    kept = selection.indices.cpu()
    adv = objective.advantages(selection.advantages.float().cpu(), tcfg)
    m, L = kept.numel(), batch.interval_len
    trained = trained_positions(policy, batch, tcfg)                           # (L,) bool
    for _ in range(tcfg.epochs if m else 0):
        order = torch.randperm(m, generator=generator)                         # trajectories
        step_order = torch.rand(m, L, generator=generator).argsort(dim=1)      # steps, per trajectory
        for start in range(0, m, tcfg.trajectories_per_step):
            chunk = order[start:start + tcfg.trajectories_per_step]            # (T,)
            # position-major pairs: step_order[k, p] for p in 0..L-1, for k in chunk
            rows = local_rows[kept[chunk]].repeat(L)                           # (T·L,)
            positions = step_order[chunk].T.reshape(-1)                        # (T·L,)
            pair_adv = adv[chunk].repeat(L)
            mine = (rows >= 0) & trained[positions]                            # pairs this rank trains
            device = batch.latents.device
            _optimizer_step(policy, optimizer, batch, rows[mine].to(device), positions[mine].to(device),
                            pair_adv[mine].to(device), int(trained[positions].sum()), objective, tcfg, scfg,
                            stats, progress, world)
    stats.sum_over_ranks(world)
    return stats.summary()
