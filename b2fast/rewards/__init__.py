"""Rewards: ``reward(images, prompts) -> scores`` behind one registry (see :mod:`b2fast.rewards.base`).

Importing this package registers the built-in rewards (``jpeg_compressibility``,
``jpeg_incompressibility``, ``clipscore``, ``aesthetic``, ``bertscore``, ``composite``,
``toy_align`` and the toy ladder's ``toy_brightness``, ``toy_colour_fill``,
``toy_object_colour``) without importing open_clip, transformers or torchmetrics: each loads only when a
reward that needs it is built.
"""
from b2fast.rewards.base import (Reward, available_rewards, build_reward, register_reward,
                                 score_images)
from b2fast.rewards import clipscore, jpeg  # noqa: F401  (imported to register the built-ins)
from b2fast.rewards import aesthetic, composite  # noqa: F401  (registers ``aesthetic``, ``composite``)
from b2fast.rewards import bertscore  # noqa: F401  (registers ``bertscore``; transformers loads on build)
from b2fast.toy import reward as _toy_reward  # noqa: F401,E402  (registers ``toy_align``)
from b2fast.toy import ladder as _toy_ladder  # noqa: F401,E402  (registers the ladder's rewards)

__all__ = ["Reward", "available_rewards", "build_reward", "register_reward", "score_images"]
