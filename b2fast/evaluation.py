"""Alignment evaluation: sample fixed-seed images per prompt, score them, measure diversity.

Used by ``python -m b2fast.eval``, by the before/after table of ``python -m b2fast.train`` and
by the toy model's pretraining card. Same seeds for base and trained weights, so the two rows
of a table differ only by the LoRA.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from b2fast.config import SamplingConfig
from b2fast.policy import Policy
from b2fast.prompts import TOY_SETS, load_prompts
from b2fast.rewards import Reward, score_images
from b2fast.sampling import generate



@dataclass
class EvalRow:
    prompt_set: str
    split: str
    n_prompts: int
    n_images: int
    score: float        # mean reward
    success: float      # fraction of images with reward >= 1 (exact success for toy_align)
    diversity: float    # mean pairwise distance among one prompt's images, averaged over prompts
    vendi: float = float("nan")  # Vendi score of one prompt's images, averaged over prompts

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def image_features(images: torch.Tensor) -> torch.Tensor:
    """8×8-pooled pixels (N, 3·64): a model-free feature that sees colour, layout and shape."""
    return F.adaptive_avg_pool2d(images.float(), 8).flatten(1)


def diversity(images: torch.Tensor, n_per_prompt: int) -> float:
    """Mean pairwise L2 distance of 8×8-pooled image features within each prompt's group."""
    feats = image_features(images)
    groups = feats.view(-1, n_per_prompt, feats.shape[1])                 # (P, n, D)
    if n_per_prompt < 2:
        return 0.0
    dist = torch.cdist(groups, groups)                                    # (P, n, n)
    off_diagonal = dist.sum(dim=(1, 2)) / (n_per_prompt * (n_per_prompt - 1))
    return float(off_diagonal.mean())


def diversity_features(reward: Reward, images: torch.Tensor) -> torch.Tensor:
    """What the Vendi score compares: the reward's own image embeddings when it has them (CLIP
    rewards: semantic diversity), else 8×8-pooled pixels."""
    embed = getattr(reward, "image_embeddings", None)
    return embed(images).float().cpu() if callable(embed) else image_features(images)


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


def pick_prompts(prompts: list[str], limit: int) -> list[str]:
    """At most ``limit`` prompts spread evenly over the list (deterministic)."""
    if limit <= 0 or len(prompts) <= limit:
        return list(prompts)
    step = len(prompts) / limit
    return [prompts[int(i * step)] for i in range(limit)]


@torch.no_grad()
def evaluate_prompts(policy: Policy, prompts: list[str], reward: Reward, cfg: SamplingConfig,
                     n_per_prompt: int, seed: int, batch: int = 256) -> tuple[dict, torch.Tensor]:
    """({score, success, diversity, vendi}, images) of ``n_per_prompt`` images per prompt."""
    everything = [p for p in prompts for _ in range(n_per_prompt)]
    generator = torch.Generator(policy.device).manual_seed(seed)
    images = torch.cat([generate(policy, everything[i:i + batch], cfg, generator)
                        for i in range(0, len(everything), batch)])
    scores = score_images(reward, images, everything)
    finite = scores[torch.isfinite(scores)]
    metrics = {"score": float(finite.mean()), "success": float((finite >= 1).float().mean()),
               "diversity": diversity(images, n_per_prompt),
               "vendi": mean_vendi(diversity_features(reward, images), n_per_prompt)}
    return metrics, images


def evaluate_sets(policy: Policy, sets: list[str], splits: list[str], reward: Reward,
                  cfg: SamplingConfig, n_per_prompt: int, prompts_per_set: int, seed: int,
                  images_out: dict | None = None) -> list[EvalRow]:
    """One row per (prompt set, split); ``images_out[(set, split)]`` gets the images if given."""
    rows = []
    for name in sets:
        for split in splits:
            prompts = pick_prompts(load_prompts(name, split), prompts_per_set)
            metrics, images = evaluate_prompts(policy, prompts, reward, cfg, n_per_prompt, seed)
            rows.append(EvalRow(name, split, len(prompts), len(prompts) * n_per_prompt, **metrics))
            if images_out is not None:
                images_out[(name, split)] = images
    return rows


def default_eval_sets(prompt_source: str) -> list[str]:
    """What to evaluate when the config names no sets: the three toy templates for a toy run."""
    return list(TOY_SETS) if prompt_source.startswith("toy") else [prompt_source]


def format_rows(columns: dict[str, list[EvalRow]]) -> str:
    """A text table: one line per (set, split), one score/success/diversity triple per column."""
    names = list(columns)
    head = f"{'prompt set':<16} {'split':<6} " + " ".join(
        f"{n + ' score':>14} {'success':>8} {'divers.':>8} {'vendi':>6}" for n in names)
    lines = [head, "-" * len(head)]
    for i, row in enumerate(columns[names[0]]):
        cells = " ".join(f"{columns[n][i].score:>14.3f} {columns[n][i].success:>8.3f} "
                         f"{columns[n][i].diversity:>8.3f} {columns[n][i].vendi:>6.2f}" for n in names)
        lines.append(f"{row.prompt_set:<16} {row.split:<6} {cells}")
    return "\n".join(lines)
