"""Prompt sets: b2fast's built-in lists of the paper's three shapes, or a user's file.

B²-DiffuRL evaluates alignment on held-out prompts of the same template as the training prompts
(Hu et al., CVPR 2025, Sec. 5). The lists below are b2fast's own, with deterministic train/test
splits so that every run and every rank sees the same prompts:

- ``animal_activity``: "a {animal} {activity}", 45 animals × 3 activities; train = one activity
  per animal (rotating), test = the other two (45 train, 90 test).
- ``color_fruit``: "a {colour} {fruit}", 25 fruits and vegetables; train = typical colours,
  test = atypical ones (40 each).
- ``spatial``: "a {object} {relation} a {object}", 10 objects × 6 relations; every 4th of the
  540 combinations is held out for test (405 train, 135 test).
- ``toy``, ``toy_attribute``, ``toy_two_object``, ``toy_spatial``: the toy world's coloured-shape
  prompts (:mod:`b2fast.toy.grammar`), all templates or one, with its held-out combinations.

A file is a JSON list of strings (any split gets the whole list), a JSON object
``{"train": [...], "test": [...]}``, or plain text with one prompt per line ('#' comments and
blank lines skipped).

Several sources are given comma-separated, ``toy_attribute,toy_spatial`` (a YAML list in a
config becomes that string): their prompts are concatenated. A string that is itself a built-in
name or an existing file is always one source, so a file whose path holds a comma still works;
a string is split only when every part is a built-in set or an existing file.

:class:`PromptPool` draws a stage's prompts: ``uniform`` over the concatenated list, or
``balanced``: a source (the built-in ``toy`` counting as its three templates) uniformly, then a
prompt uniformly within it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from b2fast.utils import did_you_mean

if TYPE_CHECKING:
    import torch

SPLITS = ("train", "test", "all")

ANIMALS = (
    "cat", "dog", "horse", "cow", "pig", "sheep", "goat", "rabbit", "mouse", "hamster",
    "squirrel", "fox", "wolf", "bear", "panda", "koala", "lion", "tiger", "leopard", "cheetah",
    "zebra", "giraffe", "elephant", "rhino", "hippo", "camel", "llama", "kangaroo", "monkey",
    "gorilla", "raccoon", "hedgehog", "otter", "beaver", "penguin", "owl", "parrot", "duck",
    "chicken", "frog", "turtle", "crocodile", "octopus", "dolphin", "shark",
)
ACTIVITIES = ("washing dishes", "riding a bike", "playing chess")

# fruit or vegetable -> (typical colours, atypical colours). Atypical colours are ones the object
# is not seen in (a blue banana), so test prompts ask for a composition the model rarely saw.
COLOR_FRUIT = {
    "banana": (("yellow", "green"), ("blue", "purple")),
    "apple": (("red", "green"), ("blue", "white")),
    "lemon": (("yellow", "green"), ("blue", "pink")),
    "pear": (("green", "yellow"), ("blue", "purple")),
    "tomato": (("red", "green"), ("blue", "white")),
    "grape": (("purple", "green"), ("orange",)),
    "bell pepper": (("red", "green"), ("blue",)),
    "cabbage": (("green", "purple"), ("orange",)),
    "peach": (("orange", "pink"), ("blue",)),
    "kiwi": (("brown", "green"), ("pink",)),
    "mango": (("yellow", "green"), ("blue",)),
    "onion": (("white", "yellow"), ("blue",)),
    "zucchini": (("green", "yellow"), ("red",)),
    "avocado": (("green", "black"), ("pink",)),
    "chili pepper": (("red", "green"), ("blue",)),
    "carrot": (("orange",), ("blue", "green")),
    "strawberry": (("red",), ("blue", "black")),
    "orange": (("orange",), ("blue", "purple")),
    "watermelon": (("green",), ("purple", "blue")),
    "pumpkin": (("orange",), ("blue", "purple")),
    "eggplant": (("purple",), ("yellow", "blue")),
    "broccoli": (("green",), ("red", "pink")),
    "cucumber": (("green",), ("red", "purple")),
    "cherry": (("red",), ("blue", "green")),
    "coconut": (("brown",), ("pink", "blue")),
}

OBJECTS = ("cat", "dog", "book", "cup", "chair", "table", "ball", "box", "lamp", "apple")
RELATIONS = ("on", "under", "behind", "in front of", "to the left of", "to the right of")


def _a(word: str) -> str:
    """'a' or 'an' + word, by first letter (good enough for these lists: 'an owl', 'a cup')."""
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


def _animal_activity() -> dict[str, list[str]]:
    train, test = [], []
    for i, animal in enumerate(ANIMALS):
        for j, activity in enumerate(ACTIVITIES):
            (train if j == i % len(ACTIVITIES) else test).append(f"{_a(animal)} {activity}")
    return {"train": train, "test": test}


def _color_fruit() -> dict[str, list[str]]:
    train = [f"{_a(c)} {fruit}" for fruit, (typical, _) in COLOR_FRUIT.items() for c in typical]
    test = [f"{_a(c)} {fruit}" for fruit, (_, atypical) in COLOR_FRUIT.items() for c in atypical]
    return {"train": train, "test": test}


def _spatial() -> dict[str, list[str]]:
    combos = [(a, rel, b) for a in OBJECTS for b in OBJECTS if a != b for rel in RELATIONS]
    prompts = [f"{_a(a)} {rel} {_a(b)}" for a, rel, b in combos]
    return {"train": [p for i, p in enumerate(prompts) if i % 4 != 3],
            "test": [p for i, p in enumerate(prompts) if i % 4 == 3]}


# The toy world's three templates, one prompt set each (what a toy run evaluates by default).
TOY_SETS = ("toy_attribute", "toy_two_object", "toy_spatial")


def _toy(template: str | None) -> Callable[[], dict[str, list[str]]]:
    """The toy world's prompts (b2fast.toy.grammar): one template, or all three."""
    def sets() -> dict[str, list[str]]:
        from b2fast.toy.grammar import TEMPLATES, prompts
        templates = TEMPLATES if template is None else (template,)
        return {split: [p for t in templates for p in prompts(t, split)] for split in ("train", "test")}
    return sets


_BUILTIN: dict[str, Callable[[], dict[str, list[str]]]] = {
    "animal_activity": _animal_activity,
    "color_fruit": _color_fruit,
    "spatial": _spatial,
    "toy": _toy(None),
    "toy_attribute": _toy("attribute"),
    "toy_two_object": _toy("two_object"),
    "toy_spatial": _toy("spatial"),
}


def available_prompt_sets() -> list[str]:
    return sorted(_BUILTIN)


def _select(sets: dict[str, list[str]], split: str) -> list[str]:
    return sets["train"] + sets["test"] if split == "all" else list(sets[split])


def _parse_file(path: Path, field: str) -> list[str] | dict[str, list[str]]:
    """Read a prompt file: JSON (list, or {"train", "test"} object) or one prompt per line."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{field}: {path} is not UTF-8 text (undecodable byte 0x{exc.object[exc.start]:02x} at "
                         f"offset {exc.start}); save the prompt file as UTF-8") from None
    if path.suffix.lower() != ".json":
        lines = (line.strip() for line in text.splitlines())
        return [line for line in lines if line and not line.startswith("#")]
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{field}: {path} is not valid JSON ({exc})") from None

    def strings(value: object) -> list[str]:
        if not isinstance(value, list) or not all(isinstance(p, str) and p.strip() for p in value):
            raise ValueError(f"{field}: {path} must hold a JSON list of non-empty strings "
                             'or an object {"train": [...], "test": [...]}')
        return [p.strip() for p in value]

    if isinstance(data, dict) and data and set(data) <= {"train", "test"}:
        return {key: strings(value) for key, value in data.items()}
    return strings(data)


def _known(source: str) -> bool:
    return source in _BUILTIN or Path(source).is_file()


def _not_a_source(field: str, name: str, within: str = "") -> ValueError:
    sets = available_prompt_sets()
    return ValueError(f"{field}: {name!r}{within}{did_you_mean(name, sets)} is neither a built-in prompt set {sets} "
                      "nor an existing file")


def split_sources(source: str, field: str = "prompts.source") -> list[str]:
    """The sources named by ``source``: itself when it is a built-in set or an existing file, else
    its comma-separated parts when every part is one (a one-line error names the first that is not)."""
    if not isinstance(source, str) or not source.strip():
        raise ValueError(f"{field}: expected a built-in prompt set {available_prompt_sets()} or a file path, "
                         f"got {source!r}")
    if _known(source) or "," not in source:
        return [source]
    parts = [part.strip() for part in source.split(",")]
    for part in parts:
        if not part or not _known(part):
            raise _not_a_source(field, part, f" (in {source!r})")
    return parts


def load_prompts(source: str, split: str = "train", section: str = "prompts",
                 field: str | None = None) -> list[str]:
    """Prompts of ``split`` ('train', 'test' or 'all') from a built-in set name or a file path,
    or several of them comma-separated (concatenated, in order).

    Errors are one line and name the config fields ``{section}.source`` / ``{section}.split``;
    ``field`` names the source otherwise (a CLI flag such as ``--prompts``).
    """
    if split not in SPLITS:
        raise ValueError(f"{section}.split: expected one of {list(SPLITS)}, got {split!r}")
    field = field or f"{section}.source"
    sources = split_sources(source, field)
    if len(sources) > 1:
        return [p for one in sources for p in _load_one(one, split, field)]
    return _load_one(source, split, field)


def _load_one(source: str, split: str, field: str) -> list[str]:
    if source in _BUILTIN:
        return _select(_BUILTIN[source](), split)
    path = Path(source)
    if not path.is_file():
        raise _not_a_source(field, source)
    data = _parse_file(path, field)
    if isinstance(data, dict):
        if split != "all" and split not in data:
            raise ValueError(f"{field}: {path} has no {split!r} list (it has {sorted(data)})")
        prompts = sum((data[s] for s in ("train", "test") if s in data), []) if split == "all" else data[split]
    else:
        prompts = data
    if not prompts:
        raise ValueError(f"{field}: {path} holds no prompts")
    return prompts


SAMPLING = ("uniform", "balanced")


@dataclass(frozen=True)
class PromptGroup:
    """One source (or toy template) of a pool: ``prompts[start:stop]``."""
    name: str
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class PromptPool:
    """The training prompts of a run and how a stage draws them (see the module docstring)."""
    prompts: list[str]
    groups: tuple[PromptGroup, ...]
    sampling: str = "uniform"

    def draw(self, n: int, generator: "torch.Generator") -> "torch.Tensor":
        """``n`` indices into :attr:`prompts` (int64), with replacement, from ``generator`` alone:
        the same generator state gives the same draw on any rank. ``uniform`` (or a single
        group) makes exactly one ``torch.randint(len(prompts))`` call, as runs always have."""
        import torch

        if self.sampling == "uniform" or len(self.groups) == 1:
            return torch.randint(len(self.prompts), (n,), generator=generator)
        group = torch.randint(len(self.groups), (n,), generator=generator)
        sizes = torch.tensor([len(g) for g in self.groups], dtype=torch.int64)[group]
        starts = torch.tensor([g.start for g in self.groups], dtype=torch.int64)[group]
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        within = torch.minimum((u * sizes).long(), sizes - 1)
        return starts + within

    def shares(self) -> dict[str, float]:
        """Expected share of the draws per group."""
        total = len(self.prompts)
        if self.sampling == "uniform":
            return {g.name: len(g) / total for g in self.groups}
        return {g.name: 1 / len(self.groups) for g in self.groups}


def prompt_pool(source: str, split: str = "train", sampling: str = "uniform",
                section: str = "prompts") -> PromptPool:
    """The pool of ``source`` (one or several sources, :func:`split_sources`) for ``sampling``.

    Its prompt list is :func:`load_prompts`' (so ``uniform`` draws what runs always drew); with
    ``balanced``, ``toy`` is split into its templates' groups (for 'train' or 'test', the
    same list in the same order).
    """
    if sampling not in SAMPLING:
        raise ValueError(f"{section}.sampling: expected one of {list(SAMPLING)}, got {sampling!r}")
    field = f"{section}.source"
    names: list[str] = []
    for one in split_sources(source, field):
        names += list(TOY_SETS) if one == "toy" and sampling == "balanced" else [one]
    prompts: list[str] = []
    groups = []
    for name in names:
        part = load_prompts(name, split, section, field)
        groups.append(PromptGroup(name, len(prompts), len(prompts) + len(part)))
        prompts += part
    return PromptPool(prompts, tuple(groups), sampling)
