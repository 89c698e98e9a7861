"""The reward interface and registry.

A reward is any callable ``reward(images, prompts) -> scores`` where ``images`` is a float
tensor (N, 3, H, W) in [0, 1] on any device, ``prompts`` a list of N strings, and ``scores``
N numbers (returned as a float32 CPU tensor by :func:`score_images`). Built-in rewards are
registered by name with :func:`register_reward`; a user reward is named ``module:function``.
"""
from __future__ import annotations

import warnings
from typing import Callable, Protocol, Sequence

import torch

from b2fast.utils import did_you_mean, load_callable, one_line


class Reward(Protocol):
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor: ...


RewardFactory = Callable[..., Reward]
_REGISTRY: dict[str, RewardFactory] = {}


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] → uint8 on the CPU, the same shape: the pixels a PNG stores
    (clamped, ×255, rounded half to even). Everything that saves or re-encodes images uses it."""
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()


def check_reward_inputs(images: torch.Tensor, prompts: Sequence[str]) -> None:
    """Images (N, 3, H, W) and one prompt per image, or a ValueError naming what is wrong."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images: expected shape (N, 3, H, W), got {tuple(images.shape)}")
    if len(prompts) != images.shape[0]:
        raise ValueError(f"prompts: expected {images.shape[0]} prompts (one per image), got {len(prompts)}")


def register_reward(name: str) -> Callable[[RewardFactory], RewardFactory]:
    """Register ``factory(device=..., **options) -> Reward`` under ``name``."""
    def decorator(factory: RewardFactory) -> RewardFactory:
        if name in _REGISTRY:
            raise ValueError(f"reward {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory
    return decorator


def available_rewards() -> list[str]:
    return sorted(_REGISTRY)


def build_reward(name: str, options: dict | None = None, device: str | torch.device = "cpu") -> Reward:
    """Instantiate a registered reward, or import a user ``module:function`` reward.

    Errors name the ``reward.name`` / ``reward.options`` fields so a config mistake reads in
    one line, and they happen here, at start-up, not in the middle of a stage.
    """
    options = dict(options or {})
    if name in _REGISTRY:
        try:
            reward = _REGISTRY[name](device=device, **options)
        except TypeError as exc:
            raise ValueError(f"reward.options: invalid options {options} for reward {name!r} ({exc})") from None
        try:
            reward.reward_name = name  # for messages (reward_label); a reward that refuses keeps its type name
        except (AttributeError, TypeError):
            pass
        return reward
    if ":" in name:
        fn = load_callable(name, "reward.name")
        if options:
            raise ValueError(f"reward.options: a 'module:function' reward takes no options, got {options}")
        return fn
    raise ValueError(f"reward.name: unknown reward {name!r}{did_you_mean(name, _REGISTRY)}; use one of "
                     f"{available_rewards()} or 'module:function'")


def reward_label(reward: Reward) -> str:
    """A name for messages: the registered name, ``module:function``, or the reward's type name."""
    name = getattr(reward, "reward_name", None)
    if isinstance(name, str):
        return name
    if callable(reward) and hasattr(reward, "__qualname__") and hasattr(reward, "__module__"):
        return f"{reward.__module__}:{reward.__qualname__}"
    return type(reward).__name__


def score_images(reward: Reward, images: torch.Tensor, prompts: Sequence[str],
                 name: str | None = None) -> torch.Tensor:
    """Run ``reward`` and return float32 CPU scores of shape (N,); non-finite scores become NaN.

    Callers ignore NaN scores (training drops those samples from selection, so a broken score
    never reaches the loss; evaluation leaves them out of its means); the warning says how many
    there were and which reward (``name``, else :func:`reward_label`) gave them.
    """
    n = images.shape[0]
    label = name or reward_label(reward)
    try:
        scores = torch.as_tensor(reward(images, list(prompts))).detach().to("cpu", torch.float32).reshape(-1)
    except Exception as exc:  # the user's code or a model: one line naming the reward, cause chained
        raise ValueError(f"reward {label!r} failed on {n} images: {one_line(exc)}") from exc
    if scores.numel() != n:
        raise ValueError(f"reward {label!r} returned {scores.numel()} scores for {n} images")
    bad = ~torch.isfinite(scores)
    if bad.any():
        warnings.warn(f"{int(bad.sum())} non-finite score(s) out of {n} from reward "
                      f"{label!r} are ignored", RuntimeWarning, stacklevel=2)
        scores = torch.where(bad, torch.full_like(scores, float("nan")), scores)
    return scores
