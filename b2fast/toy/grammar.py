"""Prompt grammar of the toy world: three templates, parsing, rendering and fixed splits.

The templates mirror the three prompt families B²-DiffuRL reports on:

==============  ==========================================  ================================
template        example                                     what it probes
==============  ==========================================  ================================
``attribute``   "a red circle"                              binding one colour to one shape
``two_object``  "a red circle and a blue square"            two attributed objects at once
``spatial``     "a red circle left of a blue square"        relation between two objects
==============  ==========================================  ================================

Relations are "left of", "right of", "above", "below". The two objects of a prompt always have
different colours: the detector finds objects by colour, so this keeps every prompt exactly
checkable.

Splits hold out *combinations*, never words, so a test prompt only recombines words seen in
training. Both rules are fixed (no random state), so every machine gets the same lists:

1. ``HELD_OUT_OBJECTS`` (3 of the 18 colour–shape pairs, one per shape, in three different
   colours) appear in no training prompt of any template, so the binding itself is unseen.
2. Of the remaining two-object and spatial combinations, the ``COMBO_HOLDOUT_PERCENT`` with the
   smallest CRC-32 hash are held out too: unseen compositions of seen objects. A spatial
   combination is its layout, so "A left of B" and "B right of A" share a split.

Sizes (train / test): attribute 15 / 3 (17%), two_object 168 / 102 (38%), spatial 670 / 410
(38%); of those test prompts, 18 and 74 pair seen objects (rule 2). Every pair touching a
held-out object must be a test pair, which is why the two-object test fractions exceed the 17%
of the attribute template.
"""
from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from functools import lru_cache

COLOURS = ("red", "green", "blue", "yellow", "magenta", "cyan")
SHAPES = ("circle", "square", "triangle")
RELATIONS = ("left of", "right of", "above", "below")
TEMPLATES = ("attribute", "two_object", "spatial")
SPLITS = ("train", "test", "all")

# Never seen together in training (rule 1): a Latin-square pick, so every colour and every
# shape keeps at least two partners in the training split.
HELD_OUT_OBJECTS = (("red", "triangle"), ("green", "circle"), ("blue", "square"))
# Rule 2: percent of the all-seen-object pair combinations held out (ranked by hash).
COMBO_HOLDOUT_PERCENT = 10
# "right of"/"below" are the mirror phrasings of "left of"/"above" with the objects swapped.
_MIRROR = {"right of": "left of", "below": "above"}

_WORD = r"([a-z]+) ([a-z]+)"
_PATTERNS = {
    "attribute": re.compile(rf"a {_WORD}"),
    "two_object": re.compile(rf"a {_WORD} and a {_WORD}"),
    "spatial": re.compile(rf"a {_WORD} (left of|right of|above|below) a {_WORD}"),
}


@dataclass(frozen=True)
class ObjectSpec:
    """One attributed object of a prompt, e.g. ``ObjectSpec("red", "circle")``."""

    colour: str
    shape: str

    def __post_init__(self) -> None:
        if self.colour not in COLOURS:
            raise ValueError(f"colour: got {self.colour!r}, allowed {COLOURS}")
        if self.shape not in SHAPES:
            raise ValueError(f"shape: got {self.shape!r}, allowed {SHAPES}")

    def text(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class PromptSpec:
    """A parsed prompt: its template, its objects in prompt order, and the spatial relation.

    For ``spatial`` the relation reads ``objects[0] <relation> objects[1]``.
    """

    template: str
    objects: tuple[ObjectSpec, ...]
    relation: str | None = None

    def __post_init__(self) -> None:
        if self.template not in TEMPLATES:
            raise ValueError(f"template: got {self.template!r}, allowed {TEMPLATES}")
        want = 1 if self.template == "attribute" else 2
        if len(self.objects) != want:
            raise ValueError(f"objects: template {self.template!r} takes {want}, got {len(self.objects)}")
        if (self.relation is not None) != (self.template == "spatial"):
            raise ValueError(f"relation: {self.relation!r} is invalid for template {self.template!r}")
        if self.relation is not None and self.relation not in RELATIONS:
            raise ValueError(f"relation: got {self.relation!r}, allowed {RELATIONS}")
        if want == 2 and self.objects[0].colour == self.objects[1].colour:
            raise ValueError(f"objects: the two objects must differ in colour, got {self.objects}")


def render_prompt(spec: PromptSpec) -> str:
    """The prompt text of ``spec``; ``parse`` inverts it exactly."""
    first = f"a {spec.objects[0].text()}"
    if spec.template == "attribute":
        return first
    second = f"a {spec.objects[1].text()}"
    joiner = "and" if spec.template == "two_object" else spec.relation
    return f"{first} {joiner} {second}"


@lru_cache(maxsize=8192)
def parse(prompt: str) -> PromptSpec:
    """Parse a prompt of the grammar (case, extra spaces and a final period are tolerated)."""
    text = " ".join(prompt.lower().strip().rstrip(".").split())
    for template, pattern in _PATTERNS.items():
        match = pattern.fullmatch(text)
        if match is None:
            continue
        words = match.groups()
        try:
            if template == "spatial":
                objects = (ObjectSpec(*words[:2]), ObjectSpec(*words[3:]))
                return PromptSpec(template, objects, words[2])
            objects = tuple(ObjectSpec(*words[i:i + 2]) for i in range(0, len(words), 2))
            return PromptSpec(template, objects)
        except ValueError as exc:
            raise ValueError(f"prompt {prompt!r}: {exc}") from None
    raise ValueError(f"prompt {prompt!r} matches no template; expected e.g. 'a red circle', "
                     "'a red circle and a blue square' or 'a red circle left of a blue square'")


def _combination_key(spec: PromptSpec) -> str:
    """The held-out unit of ``spec``: order-free for two objects, mirror-free for relations."""
    names = [o.text() for o in spec.objects]
    if spec.template == "two_object":
        return " and ".join(sorted(names))
    if spec.template == "spatial":
        if spec.relation in _MIRROR:
            return f"{names[1]} {_MIRROR[spec.relation]} {names[0]}"
        return f"{names[0]} {spec.relation} {names[1]}"
    return names[0]


def split_of(spec: PromptSpec) -> str:
    """``"train"`` or ``"test"`` for ``spec``, by the two fixed rules of the module docstring."""
    if any((o.colour, o.shape) in HELD_OUT_OBJECTS for o in spec.objects):
        return "test"
    if spec.template == "attribute":
        return "train"
    return "test" if _combination_key(spec) in _held_out_combinations(spec.template) else "train"


@lru_cache(maxsize=None)
def _held_out_combinations(template: str) -> frozenset[str]:
    """Rule 2: the seen-object combinations with the smallest CRC-32 (exact count, stable)."""
    keys = {_combination_key(s) for s in all_specs(template)
            if not any((o.colour, o.shape) in HELD_OUT_OBJECTS for o in s.objects)}
    ranked = sorted(keys, key=lambda k: (zlib.crc32(f"{template}:{k}".encode()), k))
    return frozenset(ranked[:round(len(ranked) * COMBO_HOLDOUT_PERCENT / 100)])


def all_specs(template: str) -> list[PromptSpec]:
    """Every prompt of ``template`` in a fixed order (colour-major, then shape, then relation)."""
    if template not in TEMPLATES:
        raise ValueError(f"template: got {template!r}, allowed {TEMPLATES}")
    objects = [ObjectSpec(c, s) for c in COLOURS for s in SHAPES]
    if template == "attribute":
        return [PromptSpec(template, (o,)) for o in objects]
    pairs = [(a, b) for a in objects for b in objects if a.colour != b.colour]
    if template == "two_object":
        return [PromptSpec(template, pair) for pair in pairs]
    return [PromptSpec(template, pair, rel) for pair in pairs for rel in RELATIONS]


@lru_cache(maxsize=None)
def _prompts(template: str, split: str) -> tuple[str, ...]:
    specs = all_specs(template)
    return tuple(render_prompt(s) for s in specs if split == "all" or split_of(s) == split)


def prompts(template: str, split: str = "train") -> list[str]:
    """The prompts of ``template`` in ``split`` (``"train"``, ``"test"`` or ``"all"``)."""
    if split not in SPLITS:
        raise ValueError(f"split: got {split!r}, allowed {SPLITS}")
    return list(_prompts(template, split))


def all_templates() -> list[str]:
    return list(TEMPLATES)
