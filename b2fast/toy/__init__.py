"""The toy world: an exact prompt-alignment testbed of coloured shapes on a 32×32 canvas.

A small text-to-image diffusion model can be trained and RL fine-tuned on it on a CPU, and its
alignment measured exactly: :mod:`~b2fast.toy.grammar` defines the prompts and their fixed
train/test splits, :mod:`~b2fast.toy.world` renders scenes drawn for a prompt, and
:mod:`~b2fast.toy.detector` checks an image against a prompt with rules, not a learned model.
Its reward, ``toy_align`` (:mod:`~b2fast.toy.reward`), is registered with the others by
:mod:`b2fast.rewards`; the model (:mod:`~b2fast.toy.model`) and its pretraining
(:mod:`~b2fast.toy.pretrain`) build ``b2fast:toy``.
"""
from b2fast.toy.detector import Detections, check_batch, constraint_names, detect, score, score_batch
from b2fast.toy.grammar import (COLOURS, RELATIONS, SHAPES, TEMPLATES, ObjectSpec, PromptSpec,
                                all_templates, parse, prompts, render_prompt, split_of)
from b2fast.toy.world import (CANVAS, PALETTE, SceneObject, render, render_batch, sample_images,
                              sample_scene)

__all__ = [
    "CANVAS", "COLOURS", "PALETTE", "RELATIONS", "SHAPES", "TEMPLATES",
    "Detections", "ObjectSpec", "PromptSpec", "SceneObject",
    "all_templates", "check_batch", "constraint_names", "detect",
    "parse", "prompts", "render", "render_batch", "render_prompt", "sample_images",
    "sample_scene", "score", "score_batch", "split_of",
]
