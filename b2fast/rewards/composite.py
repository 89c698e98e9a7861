"""Composite reward: a weighted sum of other rewards, e.g. CLIPScore + 0.1 × aesthetic.

``reward.options.terms`` is a list of ``{name, weight, options}`` mappings (weight defaults to 1,
options to none), or a mapping ``name → weight`` when no term needs options::

    reward: {name: composite, options: {terms: [
        {name: clipscore, weight: 1.0, options: {model_name: ViT-H-14}},
        {name: aesthetic, weight: 0.1, options: {head_path: sac+logos+ava1-l14-linearMSE.pth}}]}}

Each term is built with :func:`~b2fast.rewards.base.build_reward`, so registered rewards and user
``module:function`` rewards both work. A sample whose score is non-finite in any term scores NaN
(``score_images`` warns, and the score is ignored), whatever the term's weight.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from b2fast.rewards.base import Reward, build_reward, register_reward
from b2fast.utils import first_line, one_line

_TERM_KEYS = ("name", "weight", "options")
_TERMS_HELP = ("expected a non-empty list of {name, weight, options} mappings or a mapping "
               "name -> weight")


@dataclass(frozen=True)
class Term:
    label: str  # where the term sits in the config, e.g. "terms[1]", for error messages
    name: str
    weight: float
    reward: Reward


def _term_specs(terms: Any) -> list[tuple[str, str, float, dict]]:
    """Validate ``terms`` and return (label, name, weight, options) per term."""
    if isinstance(terms, dict):
        entries = [(f"terms.{name}", {"name": name, "weight": weight}) for name, weight in terms.items()]
    elif isinstance(terms, (list, tuple)):
        entries = [(f"terms[{i}]", entry) for i, entry in enumerate(terms)]
    else:
        raise ValueError(f"reward.options.terms: {_TERMS_HELP}, got {terms!r}")
    if not entries:
        raise ValueError(f"reward.options.terms: {_TERMS_HELP}, got an empty {type(terms).__name__}")
    return [_term_spec(label, entry) for label, entry in entries]


def _term_spec(label: str, entry: Any) -> tuple[str, str, float, dict]:
    field = f"reward.options.{label}"
    if not isinstance(entry, dict):
        raise ValueError(f"{field}: expected a mapping {{name, weight, options}}, got {entry!r}")
    unknown = sorted(set(entry) - set(_TERM_KEYS))
    if unknown:
        raise ValueError(f"{field}: unknown key(s) {unknown}; allowed: {list(_TERM_KEYS)}")
    name, weight, options = entry.get("name"), entry.get("weight", 1.0), entry.get("options")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{field}.name: expected a reward name or 'module:function', got {name!r}")
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
        raise ValueError(f"{field}.weight: expected a finite number for term {name!r}, got {weight!r}")
    if options is not None and not isinstance(options, dict):
        raise ValueError(f"{field}.options: expected a mapping of options for term {name!r}, got {options!r}")
    return label, name, float(weight), dict(options or {})


def _build_term(label: str, name: str, options: dict, device: str | torch.device) -> Reward:
    """``build_reward``, with its error re-addressed to this term's config field."""
    try:
        return build_reward(name, options, device)
    except Exception as exc:  # a term may fail in any way; the run must stop here, in one line
        message = first_line(exc, 1000) if isinstance(exc, ValueError) and first_line(exc) else one_line(exc)
        field, sep, rest = message.partition(":")
        if sep and " " not in field and field.split(".")[:2] in (["reward", "options"], ["reward", "name"]):
            # "reward.options.quality: ..." -> "reward.options.terms[0].options.quality (jpeg...): ..."
            field = f"reward.options.{label}.{field.removeprefix('reward.')}"
            raise ValueError(f"{field} ({name}):{rest}") from None
        raise ValueError(f"reward.options.{label} ({name}): {message}") from None


class CompositeReward:
    """``reward(images, prompts)`` → Σ weight · term(images, prompts), float32 CPU (N,)."""

    def __init__(self, terms: list[Term]):
        self.terms = terms

    def term_scores(self, images: torch.Tensor, prompts: Sequence[str]) -> list[torch.Tensor]:
        """Each term's scores, float32 CPU (N,), non-finite as NaN (for logging the parts)."""
        n, out = images.shape[0], []
        for term in self.terms:
            scores = torch.as_tensor(term.reward(images, prompts)).detach()
            scores = scores.to("cpu", torch.float32).reshape(-1)
            if scores.numel() != n:
                raise ValueError(f"reward.options.{term.label} ({term.name}): returned {scores.numel()} "
                                 f"scores for {n} images")
            out.append(torch.where(torch.isfinite(scores), scores, torch.full_like(scores, float("nan"))))
        return out

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        parts = self.term_scores(images, list(prompts))
        total = torch.zeros(images.shape[0], dtype=torch.float32)
        for term, scores in zip(self.terms, parts):
            total += term.weight * scores  # NaN · w = NaN (w = 0 included): NaN propagates
        return total


@register_reward("composite")
def composite(device: str | torch.device = "cpu", terms: Any = None) -> CompositeReward:
    """Weighted sum of rewards; ``terms`` as in the module docstring. Terms build in order."""
    specs = _term_specs(terms)
    return CompositeReward([Term(label, name, weight, _build_term(label, name, options, device))
                            for label, name, weight, options in specs])
