"""The policy update of one stage: the objective (``train.objective``, PPO-clip by default) over
the kept trajectories' (or pairs') interval steps.

Semantics (docs/algorithm.md, "Policy update"): the objective names its items (kept
trajectories, or the groups' (winner, loser) pairs; see :mod:`b2fast.core.objectives`). Each
epoch shuffles the items and, independently per item, the order of its interval steps. Items are
taken ``trajectories_per_step`` at a time; one optimizer step sees all (item, step) units of
those items, fed to the UNet ``micro_batch`` rows per call (units of one call may be at
different timesteps; a pair's unit is two rows). The loss of an optimizer step is the mean over
its units, so the micro-batch size changes only memory and speed, never the maths. What the
objective compares against the base model (LoRA off) is computed once per stage, before the
first step, without gradients.

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
    """Unit-weighted sums of the loss and of the statistics the objective declares, over
    (item, position) units and optimizer steps; ``summary`` gives the means. A per-unit statistic
    (a tensor with one entry per unit) counts only its non-NaN entries."""
    names: tuple[str, ...]
    units: int = 0
    totals: dict[str, float] = field(default_factory=dict)
    counts: dict[str, float] = field(default_factory=dict)
    grad_norms: list[float] = field(default_factory=list)
    kl_stopped: bool = False  # train.target_kl ended the stage's update early

    def _add(self, name: str, total: float, count: float) -> None:
        self.totals[name] = self.totals.get(name, 0.0) + total
        self.counts[name] = self.counts.get(name, 0.0) + count

    def add(self, n: int, loss: torch.Tensor, stats: dict[str, torch.Tensor]) -> None:
        self.units += n
        self._add("loss", float(loss.detach().sum()), n)
        for name in self.names:
            value = stats[name].detach()
            if value.ndim == 0:
                self._add(name, float(value) * n, n)
            else:
                finite = ~torch.isnan(value)
                self._add(name, float(value[finite].sum()), float(finite.sum()))

    def sum_over_ranks(self, world: World) -> None:
        """Totals of the whole job (the grad norms are already identical on every rank). The names
        come from the objective, so every rank sends the same list (0 where it had no units)."""
        keys = ("loss",) + self.names
        summed = distributed.sum_floats(world, [self.units] + [self.totals.get(k, 0.0) for k in keys]
                                        + [self.counts.get(k, 0.0) for k in keys], "update statistics")
        self.units = int(summed[0])
        self.totals = dict(zip(keys, summed[1:1 + len(keys)]))
        self.counts = dict(zip(keys, summed[1 + len(keys):]))

    def summary(self) -> dict[str, float | int | None]:
        """Means; ``loss``, ``approx_kl`` and ``clipfrac`` always present (None if not reported)."""
        means = {k: None for k in ("loss", "clipfrac", "approx_kl")}
        means.update({k: v / self.counts[k] for k, v in self.totals.items() if self.counts.get(k)})
        grad_norm = sum(self.grad_norms) / len(self.grad_norms) if self.grad_norms else None
        return {**means, "grad_norm": grad_norm, "optimizer_steps": len(self.grad_norms), "kl_stopped": self.kl_stopped}


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


@dataclass
class StageUnits:
    """An objective's items mapped to this rank, plus what is fixed for the whole stage: the
    noises of the denoising terms and the base model's reference terms, (I, L, m[, C, H, W])."""
    rows: torch.Tensor               # (I, m) rows of this rank's batch (−1: another rank's)
    values: torch.Tensor             # (I,)
    noise: torch.Tensor | None = None
    reference: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def members(self) -> int:
        return self.rows.shape[1]


def _unit_terms(policy: Policy, batch: TrajectoryBatch, units: StageUnits, items: torch.Tensor,
                positions: torch.Tensor, needs: frozenset[str], tcfg: TrainConfig, scfg: SamplingConfig
                ) -> dict[str, torch.Tensor]:
    """The (U, m) terms ``needs`` names for units (``items``, ``positions``), members flattened
    into one UNet batch per term."""
    m = units.members
    rows = units.rows[items].reshape(-1)                                       # (U·m,)
    j = positions.repeat_interleave(m)
    terms = {}
    if "log_prob" in needs:
        terms["log_prob"] = _pair_log_probs(policy, batch, rows, j, tcfg, scfg)
    if "old_log_prob" in needs:
        terms["old_log_prob"] = batch.log_probs[rows, j].to(policy.device)
    if "error" in needs:
        noise = units.noise[items, positions].flatten(0, 1)                    # (U·m, C, H, W)
        cond = policy.embed([batch.prompts[r] for r in rows.tolist()])
        terms["error"] = policy.denoising_error(batch.final_latents[rows], batch.step_indices[j], noise, cond)
    for name in ("ref_log_prob", "ref_error"):
        if name in needs:
            terms[name] = units.reference[name][items, positions].reshape(-1)
    return {k: v.view(-1, m) for k, v in terms.items()}


def _reference_terms(policy: Policy, batch: TrajectoryBatch, units: StageUnits, mine: torch.Tensor,
                     needs: frozenset[str], tcfg: TrainConfig, scfg: SamplingConfig) -> None:
    """Fill ``units.reference`` once per stage: the base model's (LoRA off) log-probs and/or
    denoising errors of this rank's units ``mine`` (I, L) bool, NaN elsewhere."""
    wanted = {name.removeprefix("ref_") for name in ("ref_log_prob", "ref_error") if name in needs}
    if not wanted:
        return
    I, L, m = units.rows.shape[0], batch.interval_len, units.members
    for name in wanted:
        units.reference["ref_" + name] = torch.full((I, L, m), float("nan"), device=policy.device)
    items, positions = [t.to(policy.device) for t in torch.nonzero(mine, as_tuple=True)]
    per_call = max(1, tcfg.micro_batch // m)
    with torch.no_grad(), policy.base_weights():
        for start in range(0, items.numel(), per_call):
            i, j = items[start:start + per_call], positions[start:start + per_call]
            for name, value in _unit_terms(policy, batch, units, i, j, frozenset(wanted), tcfg, scfg).items():
                units.reference["ref_" + name][i, j] = value.float()


def _optimizer_step(policy: Policy, optimizer: torch.optim.Optimizer, batch: TrajectoryBatch,
                    units: StageUnits, items: torch.Tensor, positions: torch.Tensor, n_units: int,
                    objective: Objective, needs: frozenset[str], tcfg: TrainConfig, scfg: SamplingConfig,
                    stats: UpdateStats, progress, world: World) -> None:
    """Accumulate this rank's share of the mean loss over the step's ``n_units`` units (the given
    local (item, position) units), sum the gradients over ranks, then one optimizer step — unless
    ``train.target_kl`` stops the stage's update here (``stats.kl_stopped``, no step taken)."""
    per_call = max(1, tcfg.micro_batch // units.members)  # UNet rows per call <= micro_batch
    kl_before = stats.totals.get("approx_kl", 0.0), stats.counts.get("approx_kl", 0.0)
    for start in range(0, items.numel(), per_call):
        i, j = items[start:start + per_call], positions[start:start + per_call]
        terms = _unit_terms(policy, batch, units, i, j, needs, tcfg, scfg)
        loss, loss_stats = objective.loss(terms, units.values[i], tcfg)
        (loss.sum() / n_units).backward()
        stats.add(i.numel(), loss, loss_stats)
        if progress is not None:
            progress.update(i.numel() * units.members)
    params = policy.lora_parameters()
    if tcfg.target_kl > 0:  # this step's share of the stats; every rank sees the same sums, so all stop together
        step_kl = [stats.totals.get("approx_kl", 0.0) - kl_before[0], stats.counts.get("approx_kl", 0.0) - kl_before[1]]
        total, count = distributed.sum_floats(world, step_kl, "approx-KL of the optimizer step")
        if count and total / count > 1.5 * tcfg.target_kl:
            optimizer.zero_grad(set_to_none=True)
            stats.kl_stopped = True
            return
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


def _stage_units(objective: Objective, needs: frozenset[str], batch: TrajectoryBatch, selection: Selection,
                 local_rows: torch.Tensor, tcfg: TrainConfig, generator: torch.Generator) -> StageUnits:
    """The objective's items on this rank's rows; the denoising terms' noises, one per (item,
    position, member), drawn from ``generator`` alike on every rank."""
    items = objective.items(selection, tcfg)
    rows = local_rows[items.rows.cpu()]
    units = StageUnits(rows.to(batch.latents.device), items.values.float().to(batch.latents.device))
    if "error" in needs:
        shape = (len(items), batch.interval_len, items.rows.shape[1], *batch.latents.shape[2:])
        units.noise = torch.randn(shape, generator=generator).to(batch.latents.device)
    return units


def policy_update(policy: Policy, optimizer: torch.optim.Optimizer, batch: TrajectoryBatch,
                  selection: Selection, tcfg: TrainConfig, scfg: SamplingConfig,
                  generator: torch.Generator, progress=None, world: World = World(),
                  local_rows: torch.Tensor | None = None) -> dict:
    """Train on the selected branches for ``tcfg.epochs`` epochs; returns mean loss statistics.

    ``selection`` indexes the stage's global table; ``local_rows`` maps a table row to its row
    in this rank's ``batch`` (−1 when another rank holds it). Default: one process, table = batch.
    ``progress`` (e.g. a tqdm bar, optional) gets its total set and is advanced by the UNet rows
    trained.
    """
    objective = get_objective(tcfg.objective)
    needs = objective.needs(tcfg)
    stats = UpdateStats(objective.stats)
    if tcfg.micro_batch == 0:
        raise ValueError("policy_update: resolve train.micro_batch = 0 with auto_micro_batch first")
    if local_rows is None:
        local_rows = torch.arange(len(batch))
    units = _stage_units(objective, needs, batch, selection, local_rows, tcfg, generator)
    n, L = units.rows.shape[0], batch.interval_len
    trained = trained_positions(policy, batch, tcfg)                           # (L,) bool
    local = (units.rows >= 0).all(dim=1).cpu()                                 # (I,) items of this rank
    if progress is not None:
        progress.total = int(local.sum()) * int(trained.sum()) * units.members * tcfg.epochs
        progress.refresh()
    _reference_terms(policy, batch, units, local[:, None] & trained[None, :], needs, tcfg, scfg)
    for _ in range(tcfg.epochs if n else 0):
        order = torch.randperm(n, generator=generator)                         # items
        step_order = torch.rand(n, L, generator=generator).argsort(dim=1)      # steps, per item
        for start in range(0, n, tcfg.trajectories_per_step):
            chunk = order[start:start + tcfg.trajectories_per_step]            # (T,)
            # position-major units: step_order[k, p] for p in 0..L-1, for k in chunk
            items = chunk.repeat(L)                                            # (T·L,)
            positions = step_order[chunk].T.reshape(-1)                        # (T·L,)
            mine = local[items] & trained[positions]                           # units this rank trains
            n_units = int(trained[positions].sum())                            # the same on every rank
            if n_units == 0:  # nothing to train: no step on any rank (AdamW would move weights on zeros)
                continue
            device = batch.latents.device
            _optimizer_step(policy, optimizer, batch, units, items[mine].to(device), positions[mine].to(device),
                            n_units, objective, needs, tcfg, scfg, stats, progress, world)
            if stats.kl_stopped:
                break
        if stats.kl_stopped:
            break
    stats.sum_over_ranks(world)
    return stats.summary()
