"""Alignment evaluation: sample fixed-seed images per prompt, score them, measure diversity.

Used by ``python -m b2fast.eval``, by the before/after table of ``python -m b2fast.train`` and
by the toy model's pretraining card. Same seeds for base and trained weights, so the two rows
of a table differ only by the LoRA. The images of a prompt set are sampled once and scored by
every reward given, so several rewards cost one sampling pass.

Diversity of one prompt's n images, averaged over prompts, on one set of features: the image
embeddings of the first reward that has them (``image_embeddings``: the CLIP rewards), else
8×8-pooled pixels (the toy world's ``toy_align`` has no model).

* ``diversity``: mean pairwise distance over the n·(n−1) ordered pairs; cosine distance
  1 − cos(e_i, e_j) on embeddings (0 = same image, 1 = orthogonal, at most 2), L2 distance on
  pooled pixels (model-free, so the toy numbers published in the README stay comparable).
* ``vendi``: the Vendi score under cosine similarity, the effective number of distinct images
  among the n (1 to n).

Each row also keeps every reward cell's per-prompt means (``per_prompt``), so that two columns
can be compared prompt by prompt (``b2fast.eval.stats``: paired bootstrap intervals).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from b2fast.config import SamplingConfig
from b2fast.core.policy import Policy
from b2fast.prompts import TOY_SETS, load_prompts, split_sources
from b2fast.rewards import Reward, score_images
from b2fast.core.sampling import generate
from b2fast.eval.stats import compare_rows, format_differences

# Rewards whose score 1 means "every constraint of the prompt met", so the fraction of images
# scoring >= 1 is a success rate. For the others (cosines, F1, 1-10 ratings, kB) a threshold
# of 1 means nothing, and the table shows no success column for them.
SUCCESS_AT_ONE = frozenset({"toy_align"})


@dataclass
class EvalRow:
    prompt_set: str
    split: str
    n_prompts: int
    n_images: int
    score: float        # mean of the first reward
    success: float      # fraction of images with the first reward >= 1 (exact success for toy_align)
    diversity: float    # mean pairwise distance among one prompt's images, averaged over prompts
    vendi: float = float("nan")  # Vendi score of one prompt's images, averaged over prompts
    scores: dict[str, float] = field(default_factory=dict)     # mean score per named reward
    successes: dict[str, float] = field(default_factory=dict)  # success rate, SUCCESS_AT_ONE rewards
    # per reward cell (the labels of reward_cells): its mean over each prompt's images, in prompt
    # order; what the paired before/after intervals resample. Empty in rows stored by older versions.
    per_prompt: dict[str, list[float]] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {k: dict(v) if isinstance(v, dict) else v for k, v in self.__dict__.items()}

    @classmethod
    def from_dict(cls, row: dict) -> "EvalRow":
        """Inverse of :meth:`as_dict` after a strict-JSON round trip (null was a NaN)."""
        def nan_for_none(value):
            if isinstance(value, dict):
                return {k: nan_for_none(v) for k, v in value.items()}
            if isinstance(value, list):
                return [nan_for_none(v) for v in value]
            return float("nan") if value is None else value
        return cls(**{k: nan_for_none(v) for k, v in row.items()})

    def reward_cells(self) -> list[tuple[str, float]]:
        """(label, value) per score and success rate; an unnamed single reward (the trainer's,
        or rows stored before rewards had names) reads as 'score' and 'success'."""
        if not self.scores:
            return [("score", self.score), ("success", self.success)]
        cells = []
        for name, value in self.scores.items():
            cells.append((name, value))
            if name in self.successes:
                cells.append((f"{name}_success", self.successes[name]))
        return cells


def image_features(images: torch.Tensor) -> torch.Tensor:
    """8×8-pooled pixels (N, 3·64): a model-free feature that sees colour, layout and shape."""
    return F.adaptive_avg_pool2d(images.float(), 8).flatten(1)


def mean_pairwise_distance(features: torch.Tensor, n_per_prompt: int, metric: str) -> float:
    """Mean distance over the n·(n−1) ordered pairs of each prompt's ``n_per_prompt`` consecutive
    samples, averaged over prompts; ``metric`` 'cosine' (1 − cos) or 'l2'."""
    assert metric in ("cosine", "l2"), metric
    if n_per_prompt < 2:
        return 0.0
    groups = features.float().view(-1, n_per_prompt, features.shape[-1])   # (P, n, D)
    if metric == "cosine":
        unit = F.normalize(groups.double(), dim=-1)
        dist = (1 - unit @ unit.transpose(1, 2)).clamp_min(0)               # (P, n, n); cos may round past 1
    else:
        dist = torch.cdist(groups, groups)                                  # (P, n, n)
    dist.diagonal(dim1=1, dim2=2).zero_()  # a sample's distance to itself, exactly (not 1e-16)
    return float((dist.sum(dim=(1, 2)) / (n_per_prompt * (n_per_prompt - 1))).mean())


def _as_named(rewards: Reward | Mapping[str, Reward]) -> dict:
    """A name → reward dict; a single reward is unnamed (key None)."""
    return dict(rewards) if isinstance(rewards, Mapping) else {None: rewards}


def embedding_reward(rewards: Reward | Mapping[str, Reward]) -> Reward | None:
    """The first reward with an ``image_embeddings`` method (the CLIP rewards), or None."""
    return next((r for r in _as_named(rewards).values() if callable(getattr(r, "image_embeddings", None))),
                None)


def diversity_features(rewards: Reward | Mapping[str, Reward], images: torch.Tensor) -> torch.Tensor:
    """What diversity compares: the first reward's own image embeddings when it has them (CLIP
    rewards: semantic diversity), else 8×8-pooled pixels."""
    reward = embedding_reward(rewards)
    return reward.image_embeddings(images).float().cpu() if reward is not None else image_features(images)


def vendi_score(features: torch.Tensor) -> float:
    """Vendi score (Friedman & Dieng, 2023) of n samples' features (n, D) under cosine
    similarity: exp of the entropy of the eigenvalues of K/n. Between 1 (all alike) and n (all
    orthogonal): the effective number of distinct samples."""
    x = F.normalize(features.double(), dim=1)
    eigenvalues = torch.linalg.eigvalsh(x @ x.T / x.shape[0]).clamp(min=0)
    eigenvalues = eigenvalues[eigenvalues > 0]
    return float(torch.exp(-(eigenvalues * eigenvalues.log()).sum()))


def mean_vendi(features: torch.Tensor, n_per_prompt: int) -> float:
    """Vendi score of each prompt's ``n_per_prompt`` consecutive samples, averaged over prompts."""
    groups = features.view(-1, n_per_prompt, features.shape[-1])
    return sum(vendi_score(g) for g in groups) / groups.shape[0]


def image_diversity(rewards: Reward | Mapping[str, Reward], images: torch.Tensor,
                    n_per_prompt: int) -> dict:
    """{diversity, vendi} of ``n_per_prompt`` consecutive images per prompt (module docstring)."""
    features = diversity_features(rewards, images)
    metric = "l2" if embedding_reward(rewards) is None else "cosine"
    return {"diversity": mean_pairwise_distance(features, n_per_prompt, metric),
            "vendi": mean_vendi(features, n_per_prompt)}


def pick_prompts(prompts: list[str], limit: int) -> list[str]:
    """At most ``limit`` prompts spread evenly over the list (deterministic)."""
    if limit <= 0 or len(prompts) <= limit:
        return list(prompts)
    step = len(prompts) / limit
    return [prompts[int(i * step)] for i in range(limit)]


def _score_metrics(scores: torch.Tensor, n_per_prompt: int) -> tuple[float, float, list[float], list[float]]:
    """(mean, fraction >= 1) over the finite scores, then the same per prompt (``n_per_prompt``
    consecutive scores each; NaN for a prompt without a finite score)."""
    finite = scores[torch.isfinite(scores)]
    grouped = scores.double().view(-1, n_per_prompt)
    ok = torch.isfinite(grouped)
    counts = ok.sum(dim=1).double()  # 0 finite scores: 0/0 = NaN below, as the overall mean of nothing
    means = torch.where(ok, grouped, 0).sum(dim=1) / counts
    rates = (ok & (grouped >= 1)).sum(dim=1) / counts
    return float(finite.mean()), float((finite >= 1).float().mean()), means.tolist(), rates.tolist()


@torch.no_grad()
def evaluate_prompts(policy: Policy, prompts: list[str], rewards: Reward | Mapping[str, Reward],
                     cfg: SamplingConfig, n_per_prompt: int, seed: int,
                     batch: int = 256) -> tuple[dict, torch.Tensor]:
    """({score, success, diversity, vendi, per_prompt, scores, successes}, images) of
    ``n_per_prompt`` images per prompt, sampled once and scored by every reward. ``rewards``: one
    reward, or a dict name → reward (the first gives score/success; each named one gets its entry
    in scores). ``per_prompt`` is keyed by the labels of ``EvalRow.reward_cells``."""
    everything = [p for p in prompts for _ in range(n_per_prompt)]
    generator = torch.Generator(policy.device).manual_seed(seed)
    images = torch.cat([generate(policy, everything[i:i + batch], cfg, generator)
                        for i in range(0, len(everything), batch)])
    named = {name: _score_metrics(score_images(r, images, everything, name), n_per_prompt)
             for name, r in _as_named(rewards).items()}
    score, success, per_score, per_success = next(iter(named.values()))
    metrics = {"score": score, "success": success, **image_diversity(rewards, images, n_per_prompt),
               "per_prompt": {"score": per_score, "success": per_success}}  # reward_cells' labels
    if isinstance(rewards, Mapping):
        metrics["scores"] = {name: m[0] for name, m in named.items()}
        metrics["successes"] = {name: m[1] for name, m in named.items() if name in SUCCESS_AT_ONE}
        metrics["per_prompt"] = {}
        for name, (_, _, means, rates) in named.items():
            metrics["per_prompt"][name] = means
            if name in SUCCESS_AT_ONE:
                metrics["per_prompt"][f"{name}_success"] = rates
    return metrics, images


def evaluate_sets(policy: Policy, sets: list[str], splits: list[str], rewards: Reward | Mapping[str, Reward],
                  cfg: SamplingConfig, n_per_prompt: int, prompts_per_set: int, seed: int,
                  images_out: dict | None = None, progress: bool = False) -> list[EvalRow]:
    """One row per (prompt set, split); ``images_out[(set, split)]`` gets the images if given."""
    rows = []
    for name, split in tqdm([(n, s) for n in sets for s in splits], desc="evaluating", leave=False,
                            disable=not progress):
        prompts = pick_prompts(load_prompts(name, split), prompts_per_set)
        metrics, images = evaluate_prompts(policy, prompts, rewards, cfg, n_per_prompt, seed)
        rows.append(EvalRow(name, split, len(prompts), len(prompts) * n_per_prompt, **metrics))
        if images_out is not None:
            images_out[(name, split)] = images
    return rows


def default_eval_sets(prompt_source: str) -> list[str]:
    """What to evaluate when the config names no sets: the three toy templates when every source is
    a built-in toy set (a run on one template is still judged on all three), else each source."""
    sources = split_sources(prompt_source)
    return list(TOY_SETS) if all(s in ("toy", *TOY_SETS) for s in sources) else sources


def format_rows(columns: dict[str, list[EvalRow]]) -> str:
    """A text table: one line per (set, split); per column (base, trained, ...) each reward's
    score (and success rate where it means one), then diversity and Vendi."""
    def cells(row: EvalRow) -> list[tuple[str, float, str]]:
        return [(label, value, ".3f") for label, value in row.reward_cells()] \
            + [("divers.", row.diversity, ".3f"), ("vendi", row.vendi, ".2f")]

    names = list(columns)
    heads, widths = [], []
    for name in names:
        for i, (label, _, _) in enumerate(cells(columns[name][0])):
            heads.append(f"{name} {label}" if i == 0 else label)
            widths.append(max(len(heads[-1]), 6))
    head = f"{'prompt set':<16} {'split':<6} " + " ".join(f"{h:>{w}}" for h, w in zip(heads, widths))
    lines = [head, "-" * len(head)]
    for i, row in enumerate(columns[names[0]]):
        values = [(v, fmt) for n in names for _, v, fmt in cells(columns[n][i])]
        lines.append(f"{row.prompt_set:<16} {row.split:<6} "
                     + " ".join(f"{v:>{w}{fmt}}" for (v, fmt), w in zip(values, widths)))
    return "\n".join(lines)


def format_comparison(columns: dict[str, list[EvalRow]]) -> str:
    """:func:`format_rows`, and with two columns (base/trained, before/after) the table of their
    differences with paired bootstrap intervals under it (``b2fast.eval.stats``)."""
    text = format_rows(columns)
    if len(columns) == 2:
        (first, before), (second, after) = columns.items()
        text += "\n\n" + format_differences(compare_rows(before, after), first, second)
    return text
