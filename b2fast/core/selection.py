"""Per-prompt reward normalisation and best/worst branch selection.

Spec: docs/algorithm.md, "Reward normalisation and selection".

Notation (B²-DiffuRL, "Reward normalisation and selection"):

=====================  ==============================================================
symbol                 here
=====================  ==============================================================
r                      ``rewards``: one score per final image of the stage
H                      ``RewardHistory.history_stages`` (default 8)
mean_p, std_p          ``RewardHistory.stats(p)``: rewards of prompt p pooled over the
                       current stage and up to H previous ones; unbiased std
z                      ``(r − mean_p) / (std_p + 1e-8)``
τ+, τ−                 ``pos_threshold`` (0.5), ``neg_threshold`` (−0.5)
branch group           the K branches forked from one trunk: same ``group_ids`` value
=====================  ==============================================================

The stage loop calls :func:`normalize_and_select` once per stage with *all* of that stage's
rewards; for B²-DiffuRL's history tracker it does::

    z = normalize_stage(history, prompts, rewards)     # adds the stage, then normalises
    sel = select(z, group_ids, pos_threshold, neg_threshold)

(DDPO's per-prompt tracker keeps every sample instead), then applies ``selection.null_control``.

``Selection.pairs`` holds each group's (best, worst) branch pair for the pair objectives
(``train.objective`` d3po, dro, diffusion_dpo): by default a group gives a pair when both its
best and its worst pass the thresholds; ``selection.pair_mode: always`` pairs them whenever the
best's reward exceeds the worst's.

The history pools in *stages*, not in appearances: rewards a prompt got at stage s are used at
stage s' only if s' − s <= H, so a prompt that returns after a long absence starts fresh.

``selection.kind: ddpo`` is DDPO's (Black et al., ICLR 2024; ddpo-pytorch's
``PerPromptStatTracker``) instead: :class:`PromptStatTracker` keeps the newest ``buffer_size``
rewards per prompt, the advantage is ``(r − mean_p)/(std_p + 1e-6)`` over them (population std),
or over the whole stage's rewards while the prompt has fewer than ``min_count``, and
:func:`select_all` keeps every sample. The trainer goes through :func:`make_tracker` and
:func:`normalize_and_select`, which dispatch on the kind.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, replace
from typing import Sequence

import torch

from b2fast.config import PAIR_MODES, SelectionConfig

EPS = 1e-8  # added to std_p, as in the paper, so a prompt with equal rewards gives z = 0


class RewardHistory:
    """Rewards per prompt text over the last ``history_stages + 1`` stages.

    Call :meth:`add_stage` exactly once per stage (with every reward of the stage), even when
    a stage has no rewards: each call advances the stage counter that ages old stages out.
    ``len(history)`` is the number of stages currently in the window (at most H + 1).
    """

    def __init__(self, history_stages: int = 8):
        if not isinstance(history_stages, int) or history_stages < 0:
            raise ValueError(f"history_stages must be an integer >= 0, got {history_stages!r}")
        self.history_stages = history_stages
        self.stages_seen = 0
        # one dict per stage, oldest first: prompt -> finite rewards of that stage
        self._stages: deque[dict[str, list[float]]] = deque(maxlen=history_stages + 1)

    @property
    def window(self) -> int:
        """Stages pooled: the current one plus up to H previous ones."""
        return self.history_stages + 1

    def __len__(self) -> int:
        return len(self._stages)

    def add_stage(self, prompts: Sequence[str], rewards: torch.Tensor) -> None:
        """Append one stage; NaN rewards (a failed reward call) are ignored."""
        values = _check_rewards(prompts, rewards).tolist()
        stage: dict[str, list[float]] = {}
        for prompt, value in zip(prompts, values):
            if not math.isnan(value):
                stage.setdefault(prompt, []).append(value)
        self._stages.append(stage)  # the deque's maxlen drops the stage older than H
        self.stages_seen += 1

    def rewards(self, prompt: str) -> list[float]:
        """All rewards of ``prompt`` in the window, oldest stage first."""
        return [value for stage in self._stages for value in stage.get(prompt, ())]

    def stats(self, prompt: str) -> tuple[float, float]:
        """(mean_p, std_p) over the window; std_p = 0 below 2 rewards, mean_p = NaN with none."""
        pooled = torch.tensor(self.rewards(prompt), dtype=torch.float64)
        if pooled.numel() == 0:
            return math.nan, 0.0
        std = pooled.std(unbiased=True).item() if pooled.numel() > 1 else 0.0
        return pooled.mean().item(), std

    def state_dict(self) -> dict:
        """Plain lists/floats only, so a checkpoint can store it as JSON."""
        return {"history_stages": self.history_stages, "stages_seen": self.stages_seen,
                "stages": [{p: list(v) for p, v in stage.items()} for stage in self._stages]}

    def load_state_dict(self, state: dict, history_stages: int | None = None) -> None:
        """Restore from :meth:`state_dict` (also after a JSON round trip). The stored H, unless
        ``history_stages`` gives another (a resume with a changed window): then only the last
        ``history_stages`` stored stages are kept, the previous stages the next one pools with."""
        stored = int(state["history_stages"])
        h = stored if history_stages is None else int(history_stages)
        stages = [{p: [float(x) for x in v] for p, v in stage.items()} for stage in state["stages"]]
        if h != stored:
            stages = stages[max(len(stages) - h, 0):]
        self.history_stages = h
        self.stages_seen = int(state["stages_seen"])
        self._stages = deque(stages, maxlen=h + 1)


def _check_rewards(prompts: Sequence[str], rewards: torch.Tensor) -> torch.Tensor:
    """Validate the (prompts, rewards) pair and return the rewards as float64 on the CPU."""
    if not isinstance(rewards, torch.Tensor) or rewards.ndim != 1:
        raise ValueError(f"rewards must be a 1-D tensor, got {getattr(rewards, 'shape', type(rewards))}")
    if isinstance(prompts, str) or len(prompts) != rewards.numel():
        raise ValueError(f"prompts must be a list of {rewards.numel()} strings (one per reward), "
                         f"got {type(prompts).__name__} of length {len(prompts)}")
    return rewards.detach().to("cpu", torch.float64)


def normalize(rewards: torch.Tensor, prompts: Sequence[str], history: RewardHistory) -> torch.Tensor:
    """z = (r − mean_p)/(std_p + 1e-8) with stats from ``history`` as it stands.

    Does not modify ``history``: the current stage must already be in it (see
    :func:`normalize_stage`). Returns float32 on ``rewards.device``; NaN rewards give NaN z.
    """
    r = _check_rewards(prompts, rewards)
    return _standardize(r, prompts, history.stats, EPS).to(rewards.device, torch.float32)


def _standardize(r: torch.Tensor, prompts: Sequence[str], stats_of, eps: float) -> torch.Tensor:
    """(r − mean_p)/(std_p + eps) per sample, ``stats_of(p)`` = (mean_p, std_p) looked up once
    per distinct prompt (float64, like ``r``)."""
    stats = {p: stats_of(p) for p in dict.fromkeys(prompts)}
    mean = torch.tensor([stats[p][0] for p in prompts], dtype=torch.float64)
    std = torch.tensor([stats[p][1] for p in prompts], dtype=torch.float64)
    return (r - mean) / (std + eps)


def normalize_stage(history: RewardHistory, prompts: Sequence[str],
                    rewards: torch.Tensor) -> torch.Tensor:
    """Add this stage's rewards to ``history``, then return their z-scores (the stage loop's call)."""
    history.add_stage(prompts, rewards)
    return normalize(rewards, prompts, history)


@dataclass
class Selection:
    """Kept branches of one stage, in increasing batch index."""
    indices: torch.Tensor     # (M,) int64 index into the stage's branch batch
    advantages: torch.Tensor  # (M,) float32: z of each kept branch
    positive: torch.Tensor    # (M,) bool: kept as its group's best (else as its worst)
    n_positive: int
    n_negative: int
    pairs: torch.Tensor | None = None  # (P, 2) int64: (winner, loser) batch indices, one per group

    def __post_init__(self) -> None:
        if self.pairs is None:
            self.pairs = torch.zeros(0, 2, dtype=torch.int64, device=self.indices.device)

    def __len__(self) -> int:
        return self.indices.numel()


def _group_extreme(z: torch.Tensor, valid: torch.Tensor, group: torch.Tensor, n_groups: int,
                   largest: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group: the extreme z over valid samples and the lowest index attaining it.

    Groups without a valid sample get index N (an out-of-range sentinel) and z = ∓inf.
    """
    n = z.numel()
    fill = -math.inf if largest else math.inf
    masked = torch.where(valid, z, torch.full_like(z, fill))
    extreme = torch.full((n_groups,), fill, dtype=z.dtype, device=z.device)
    extreme = extreme.scatter_reduce(0, group, masked, "amax" if largest else "amin")
    # ties: among the samples equal to the extreme, the lowest batch index wins
    hit = valid & (z == extreme[group])
    index = torch.arange(n, device=z.device)
    candidate = torch.where(hit, index, torch.full_like(index, n))
    first = torch.full((n_groups,), n, dtype=torch.int64, device=z.device)
    return extreme, first.scatter_reduce(0, group, candidate, "amin")


def select(z: torch.Tensor, group_ids: torch.Tensor, pos_threshold: float = 0.5,
           neg_threshold: float = -0.5, pair_mode: str = "thresholds") -> Selection:
    """Keep each branch group's best branch if z_max >= τ+ and its worst if z_min < τ−.

    NaN z are excluded before choosing; ties go to the lowest batch index. A group whose best
    and worst are the same sample (one valid branch, or all z equal) keeps it at most once,
    as a positive when it qualifies as one. ``pairs``: (best, worst) of the groups where both
    are kept (``pair_mode`` 'thresholds') or where z_max > z_min ('always').
    """
    if pair_mode not in PAIR_MODES:
        raise ValueError(f"selection.pair_mode: got {pair_mode!r}, expected one of {PAIR_MODES}")
    if z.ndim != 1 or group_ids.shape != z.shape:
        raise ValueError(f"z and group_ids must be 1-D of equal length, got {tuple(z.shape)} "
                         f"and {tuple(group_ids.shape)}")
    if group_ids.dtype.is_floating_point or group_ids.dtype == torch.bool:
        raise ValueError(f"group_ids must be an integer tensor, got {group_ids.dtype}")
    z = z.float()
    valid = ~torch.isnan(z)
    # 1. arbitrary group labels -> 0..G-1
    _, group = torch.unique(group_ids.to(z.device), return_inverse=True)
    n_groups = int(group.max()) + 1 if group.numel() else 0
    # 2. best and worst branch per group
    z_max, best = _group_extreme(z, valid, group, n_groups, largest=True)
    z_min, worst = _group_extreme(z, valid, group, n_groups, largest=False)
    # 3. thresholds; a sample already kept as a positive is not kept again
    keep_pos = z_max >= pos_threshold
    keep_neg = (z_min < neg_threshold) & ~(keep_pos & (worst == best))
    indices, order = torch.cat([best[keep_pos], worst[keep_neg]]).sort()
    positive = (torch.arange(indices.numel(), device=z.device) < int(keep_pos.sum()))[order]
    paired = keep_pos & keep_neg if pair_mode == "thresholds" else z_max > z_min
    paired &= best != worst
    return Selection(indices=indices, advantages=z[indices], positive=positive,
                     n_positive=int(keep_pos.sum()), n_negative=int(keep_neg.sum()),
                     pairs=torch.stack([best[paired], worst[paired]], dim=1))


# ---------------------------------------------------------------------------------------------
# DDPO: per-prompt stat tracking with the batch fallback, every sample kept

DDPO_EPS = 1e-6  # ddpo-pytorch's


class PromptStatTracker:
    """DDPO's per-prompt statistics: the newest ``buffer_size`` finite rewards of each prompt.

    :meth:`update` adds a stage's rewards (in batch order), then gives each sample
    ``(r − mean)/(std + 1e-6)`` with the mean and population std of its prompt's buffer, or of
    the stage's finite rewards when the buffer holds fewer than ``min_count`` rewards. NaN
    rewards stay out of every statistic and get NaN.
    """

    def __init__(self, buffer_size: int = 32, min_count: int = 16):
        if not isinstance(buffer_size, int) or buffer_size < 1:
            raise ValueError(f"buffer_size must be an integer >= 1, got {buffer_size!r}")
        if not isinstance(min_count, int) or min_count < 1:
            raise ValueError(f"min_count must be an integer >= 1, got {min_count!r}")
        self.buffer_size, self.min_count = buffer_size, min_count
        self.stages_seen = 0
        self._buffers: dict[str, deque[float]] = {}

    def __len__(self) -> int:
        return len(self._buffers)

    def rewards(self, prompt: str) -> list[float]:
        """The buffered rewards of ``prompt``, oldest first."""
        return list(self._buffers.get(prompt, ()))

    def update(self, prompts: Sequence[str], rewards: torch.Tensor) -> torch.Tensor:
        """Add one stage's rewards, then return their advantages (float32 on ``rewards.device``)."""
        r = _check_rewards(prompts, rewards)
        values = r.tolist()
        for prompt, value in zip(prompts, values):
            if not math.isnan(value):
                self._buffers.setdefault(prompt, deque(maxlen=self.buffer_size)).append(value)
        self.stages_seen += 1
        finite = r[~torch.isnan(r)]
        batch = (finite.mean().item(), finite.std(unbiased=False).item()) if finite.numel() else (math.nan, 0.0)

        def stats_of(prompt: str) -> tuple[float, float]:
            own = torch.tensor(self.rewards(prompt), dtype=torch.float64)
            return (own.mean().item(), own.std(unbiased=False).item()) if own.numel() >= self.min_count else batch
        return _standardize(r, prompts, stats_of, DDPO_EPS).to(rewards.device, torch.float32)

    def state_dict(self) -> dict:
        """Plain lists/floats only (JSON-safe), tagged ``kind: ddpo``."""
        return {"kind": "ddpo", "buffer_size": self.buffer_size, "min_count": self.min_count,
                "stages_seen": self.stages_seen, "buffers": {p: list(b) for p, b in self._buffers.items()}}

    def load_state_dict(self, state: dict, buffer_size: int | None = None, min_count: int | None = None) -> None:
        """Restore from :meth:`state_dict`; a different ``buffer_size`` keeps each prompt's newest."""
        self.buffer_size = int(state["buffer_size"]) if buffer_size is None else int(buffer_size)
        self.min_count = int(state["min_count"]) if min_count is None else int(min_count)
        self.stages_seen = int(state["stages_seen"])
        self._buffers = {p: deque((float(x) for x in v), maxlen=self.buffer_size)
                         for p, v in state["buffers"].items()}


def select_all(advantages: torch.Tensor) -> Selection:
    """Keep every sample with a finite advantage (DDPO); positive = advantage > 0."""
    if advantages.ndim != 1:
        raise ValueError(f"advantages must be 1-D, got {tuple(advantages.shape)}")
    a = advantages.float()
    indices = torch.nonzero(~torch.isnan(a)).flatten()
    positive = a[indices] > 0
    n_positive = int(positive.sum())
    return Selection(indices=indices, advantages=a[indices], positive=positive,
                     n_positive=n_positive, n_negative=indices.numel() - n_positive)


Tracker = RewardHistory | PromptStatTracker


def make_tracker(sel: SelectionConfig) -> Tracker:
    """The reward statistics ``selection.kind`` keeps across stages."""
    if sel.kind == "ddpo":
        return PromptStatTracker(sel.buffer_size, sel.min_count)
    if sel.kind == "b2":
        return RewardHistory(sel.history_stages)
    raise ValueError(f"selection.kind: got {sel.kind!r}, expected 'b2' or 'ddpo'")


def normalize_and_select(tracker: Tracker, sel: SelectionConfig, prompts: Sequence[str], rewards: torch.Tensor,
                         group_ids: torch.Tensor, generator: torch.Generator | None = None
                         ) -> tuple[torch.Tensor, Selection]:
    """One stage: record its rewards in ``tracker``, return (z or advantage per sample, selection).
    ``selection.null_control`` then breaks the link between rewards and advantages (``generator``
    draws the shuffle)."""
    if isinstance(tracker, PromptStatTracker):
        z = tracker.update(prompts, rewards)
        selection = select_all(z)
    else:
        z = normalize_stage(tracker, prompts, rewards)
        selection = select(z, group_ids, sel.pos_threshold, sel.neg_threshold, sel.pair_mode)
    return z, null_control(selection, sel.null_control, generator)


def pair_stats(selection: Selection, rewards: torch.Tensor) -> dict:
    """``n_pairs`` and ``pair_reward_margin`` = mean r(winner) − r(loser) (None without pairs)."""
    pairs = selection.pairs.to(rewards.device)
    margin = (rewards[pairs[:, 0]] - rewards[pairs[:, 1]]).float().mean().item() if pairs.numel() else None
    return {"n_pairs": pairs.shape[0], "pair_reward_margin": margin}


def null_control(selection: Selection, kind: str, generator: torch.Generator | None = None) -> Selection:
    """The selection with its advantages decoupled from the rewards: ``shuffle`` permutes them
    among the kept samples (same magnitudes, same update size, random direction) and swaps each
    pair's winner and loser with probability 1/2; ``zero`` sets them to 0 and drops the pairs (no
    update at all); ``off`` returns it unchanged. A setting that "learns" must beat its null
    control, or what moved was noise."""
    if kind == "off":
        return selection
    pairs = selection.pairs
    if kind == "zero":
        advantages, pairs = torch.zeros_like(selection.advantages), pairs[:0]
    elif kind == "shuffle":
        order = torch.randperm(len(selection), generator=generator).to(selection.advantages.device)
        advantages = selection.advantages[order]
        swap = (torch.rand(pairs.shape[0], generator=generator) < 0.5).to(pairs.device)
        pairs = torch.where(swap[:, None], pairs.flip(1), pairs)
    else:
        raise ValueError(f"selection.null_control: got {kind!r}, expected 'off', 'shuffle' or 'zero'")
    return replace(selection, advantages=advantages, pairs=pairs)


def load_tracker_state(tracker: Tracker, state: dict, sel: SelectionConfig) -> str | None:
    """Restore a checkpoint's tracker state (from the config's own settings); returns a note to
    print when a setting changed, raises when the checkpoint was made with another kind."""
    stored = state.get("kind", "b2")
    if stored != sel.kind:
        raise ValueError(f"selection.kind: the checkpoint was trained with {stored!r}, got {sel.kind!r}; "
                         f"resume with --selection.kind {stored}")
    if isinstance(tracker, PromptStatTracker):
        old = int(state["buffer_size"])
        tracker.load_state_dict(state, sel.buffer_size, sel.min_count)
        return None if old == sel.buffer_size else (
            f"selection.buffer_size changed {old} -> {sel.buffer_size}: keeping each prompt's newest rewards")
    old = int(state["history_stages"])
    tracker.load_state_dict(state, sel.history_stages)
    if old == sel.history_stages:
        return None
    kept = f"the last {len(tracker)}" if sel.history_stages < old else f"all {len(tracker)}"
    return f"selection.history_stages changed {old} -> {sel.history_stages}: keeping {kept} stored stages"
