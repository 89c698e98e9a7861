"""The toy world: grammar and splits, scene sampling, and the exact detector / reward.

Accuracy tests draw ≥ 500 scenes over all templates with a fixed seed; the thresholds (99% on
clean renders, 95% under perturbation) are the detector's contract, while the measured rates
are 100% for clean, σ = 0.1 noise, blur and colour shift.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from b2fast.rewards.base import build_reward
from b2fast.toy import (COLOURS, RELATIONS, SHAPES, ObjectSpec, PromptSpec, SceneObject,
                        all_templates, check_batch, constraint_names, parse, prompts, render,
                        render_batch, render_prompt, sample_scene, score, score_batch, split_of)
from b2fast.toy.grammar import HELD_OUT_OBJECTS, all_specs
from b2fast.toy.world import CANVAS, GAP, RELATION_MARGIN, mask_centroid, relation_holds, shape_mask

SCENES_PER_TEMPLATE = 200


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The detector's tensors are small (600·32·32 px); on a shared, oversubscribed CPU the
    OpenMP barriers of a second thread made this file ~10× slower (29 s against 3 s)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def dataset() -> tuple[list[PromptSpec], torch.Tensor]:
    """600 random scenes (200 per template, prompts from both splits) and their renders."""
    rng = np.random.default_rng(1234)
    specs = []
    for template in all_templates():
        pool = all_specs(template)
        specs += [pool[i] for i in rng.integers(0, len(pool), SCENES_PER_TEMPLATE)]
    images = torch.from_numpy(render_batch([sample_scene(s, rng) for s in specs]))
    return specs, images


def _success_rate(images: torch.Tensor, specs) -> float:
    return score_batch(images, specs)[1].float().mean().item()


# --- grammar and splits --------------------------------------------------------------------

@pytest.mark.parametrize("template", all_templates())
def test_round_trip(template):
    for spec in all_specs(template):
        assert parse(render_prompt(spec)) == spec


def test_parse_tolerates_case_spaces_and_period():
    assert parse("  A Red   circle LEFT OF a blue square. ") == parse("a red circle left of a blue square")


@pytest.mark.parametrize("bad", ["a purple circle", "a red hexagon", "a red circle near a blue square",
                                 "a red circle and a red square", "red circle", ""])
def test_parse_rejects_outside_grammar(bad):
    with pytest.raises(ValueError, match="prompt"):
        parse(bad)


@pytest.mark.parametrize("template, sizes", [("attribute", (15, 3)), ("two_object", (168, 102)),
                                             ("spatial", (670, 410))])
def test_splits_disjoint_complete_and_documented(template, sizes):
    train, test = prompts(template, "train"), prompts(template, "test")
    assert (len(train), len(test)) == sizes
    assert not set(train) & set(test)
    assert sorted(train + test) == sorted(prompts(template, "all"))
    assert 0.15 <= len(test) / (len(train) + len(test)) <= 0.4


@pytest.mark.parametrize("template", all_templates())
def test_train_split_sees_every_word_but_no_held_out_binding(template):
    train = [parse(p) for p in prompts(template, "train")]
    objects = {(o.colour, o.shape) for s in train for o in s.objects}
    assert {c for c, _ in objects} == set(COLOURS)
    assert {s for _, s in objects} == set(SHAPES)
    assert not objects & set(HELD_OUT_OBJECTS)
    if template == "spatial":
        assert {s.relation for s in train} == set(RELATIONS)


def test_mirror_phrasings_share_a_split():
    for spec in all_specs("spatial"):
        mirror = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
        flipped = PromptSpec("spatial", spec.objects[::-1], mirror[spec.relation])
        assert split_of(spec) == split_of(flipped)


# --- world ---------------------------------------------------------------------------------

def _dilate(mask: np.ndarray) -> np.ndarray:
    """Grow a mask by one pixel in all 8 directions."""
    padded = np.pad(mask, 1)
    h, w = mask.shape
    return np.any([padded[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
                   for dy in (-1, 0, 1) for dx in (-1, 0, 1)], axis=0)


@pytest.mark.parametrize("template", all_templates())
def test_sampled_scenes_satisfy_their_prompt(template):
    rng = np.random.default_rng(7)
    for spec in all_specs(template)[::7]:
        scene = sample_scene(spec, rng)
        assert [(o.colour, o.shape) for o in scene] == [(o.colour, o.shape) for o in spec.objects]
        masks = [shape_mask(o) for o in scene]
        assert all(m.sum() >= 40 and not (m[0].any() or m[-1].any() or m[:, 0].any() or m[:, -1].any())
                   for m in masks)
        if len(scene) == 2:
            assert not (_dilate(masks[0]) & masks[1]).any()
        if spec.relation is not None:
            a, b = (mask_centroid(m) for m in masks)
            assert relation_holds(a, b, spec.relation, RELATION_MARGIN)


def test_render_is_in_range_with_background():
    image = render([SceneObject("red", "circle", 16, 16, 6)])
    assert image.shape == (3, CANVAS, CANVAS) and image.dtype == np.float32
    assert 0 <= image.min() and image.max() <= 1
    assert np.allclose(image[:, 0, 0], 0.1) and np.allclose(image[:, 16, 16], (1, 0, 0))
    assert GAP >= 2  # blur of radius 1 must never mix two objects' colours


# --- detector accuracy ---------------------------------------------------------------------

def test_clean_renders_succeed(dataset):
    specs, images = dataset
    assert _success_rate(images, specs) >= 0.99


def _mutate(spec: PromptSpec, kind: str, rng: np.random.Generator) -> PromptSpec:
    """``spec`` with one colour, shape or relation changed to another valid value."""
    k = int(rng.integers(len(spec.objects)))
    obj = spec.objects[k]
    if kind == "relation":
        others = [r for r in RELATIONS if r != spec.relation]
        return dataclasses.replace(spec, relation=str(rng.choice(others)))
    if kind == "colour":
        used = {o.colour for o in spec.objects}
        obj = ObjectSpec(str(rng.choice([c for c in COLOURS if c not in used])), obj.shape)
    else:
        obj = ObjectSpec(obj.colour, str(rng.choice([s for s in SHAPES if s != obj.shape])))
    objects = list(spec.objects)
    objects[k] = obj
    return dataclasses.replace(spec, objects=tuple(objects))


@pytest.mark.parametrize("kind", ["colour", "shape", "relation"])
def test_mismatched_prompts_rejected(dataset, kind):
    specs, images = dataset
    rng = np.random.default_rng(5)
    keep = [i for i, s in enumerate(specs) if kind != "relation" or s.relation is not None]
    wrong = [_mutate(specs[i], kind, rng) for i in keep]
    assert len(keep) >= 200
    assert 1 - _success_rate(images[keep], wrong) >= 0.99


def _blur(images: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur, σ ≈ 0.5 px (taps 0.107, 0.787, 0.107)."""
    taps = torch.tensor([0.1065, 0.787, 0.1065])
    kernel = (taps[:, None] * taps[None, :]).expand(3, 1, 3, 3)
    return F.conv2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)


@pytest.mark.parametrize("perturbation", ["noise", "blur", "colour_shift", "blur_and_noise"])
def test_perturbed_renders_succeed(dataset, perturbation):
    specs, images = dataset
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(images.shape, generator=g)
    shift = 0.1 * (2 * torch.rand(images.shape[0], 3, 1, 1, generator=g) - 1)
    perturbed = {"noise": images + 0.1 * noise,
                 "blur": _blur(images),
                 "colour_shift": 0.85 * images + shift,
                 "blur_and_noise": _blur(images) + 0.07 * noise}[perturbation]
    assert _success_rate(perturbed.clamp(0, 1), specs) >= 0.95


def test_pure_noise_matches_nothing():
    images = torch.rand(64, 3, CANVAS, CANVAS, generator=torch.Generator().manual_seed(3))
    scores, success = score_batch(images, ["a red circle and a blue square"] * 64)
    assert not success.any() and scores.mean() <= 0.05


# --- constraint fractions on hand-made scenes ----------------------------------------------

RED_CIRCLE = SceneObject("red", "circle", 8, 16, 5.5)
BLUE_SQUARE = SceneObject("blue", "square", 24, 16, 5.5)


@pytest.mark.parametrize("scene, prompt, expected", [
    ([RED_CIRCLE], "a red circle", 1.0),
    ([RED_CIRCLE], "a red square", 0.5),
    ([RED_CIRCLE], "a blue circle", 0.0),
    ([], "a red circle", 0.0),
    ([RED_CIRCLE], "a red circle and a blue square", 0.5),
    ([RED_CIRCLE, dataclasses.replace(BLUE_SQUARE, shape="circle")], "a red circle and a blue square", 0.75),
    ([RED_CIRCLE, BLUE_SQUARE], "a blue square and a red circle", 1.0),
    ([RED_CIRCLE, BLUE_SQUARE], "a red circle left of a blue square", 1.0),
    ([RED_CIRCLE, BLUE_SQUARE], "a red circle right of a blue square", 0.8),
    ([RED_CIRCLE, BLUE_SQUARE], "a red circle above a blue square", 0.8),
    ([RED_CIRCLE, BLUE_SQUARE], "a blue triangle right of a red circle", 0.8),
    ([RED_CIRCLE, BLUE_SQUARE], "a red circle left of a green square", 0.4),
])
def test_score_is_constraint_fraction(scene, prompt, expected):
    value, success = score(render(scene), prompt)
    assert value == pytest.approx(expected) and success == (expected == 1.0)


def test_constraint_names_match_checks():
    for prompt, n in [("a red circle", 2), ("a red circle and a blue square", 4),
                      ("a red circle below a blue square", 5)]:
        assert len(constraint_names(prompt)) == n
        assert len(check_batch(render([RED_CIRCLE]), [prompt])[0]) == n


def test_largest_component_is_the_object():
    """A small extra red square does not turn the big red circle into a square."""
    image = render([SceneObject("red", "circle", 10, 16, 7), SceneObject("red", "square", 26, 16, 3)])
    assert score(image, "a red circle") == (1.0, True)
    assert score(image, "a red square") == (0.5, False)


def test_batch_validates_prompt_count():
    with pytest.raises(ValueError, match="prompts"):
        score_batch(torch.zeros(2, 3, CANVAS, CANVAS), ["a red circle"])


# --- reward --------------------------------------------------------------------------------

def test_toy_align_reward_registered(dataset):
    specs, images = dataset
    text = [render_prompt(s) for s in specs[:32]]
    dense = build_reward("toy_align")(images[:32], text)
    binary = build_reward("toy_align", {"binary": True})(images[:32], ["a red circle"] * 32)
    assert dense.dtype == torch.float32 and dense.shape == (32,) and torch.all(dense == 1)
    assert set(binary.tolist()) <= {0.0, 1.0}
    with pytest.raises(ValueError, match="binary"):
        build_reward("toy_align", {"binary": "yes"})
