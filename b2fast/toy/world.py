"""The toy world: hard-edged coloured shapes on a 32×32 canvas, and scenes drawn for a prompt.

Geometry (shared with the detector, so "exact" means the same rule on both sides):

* pixel (row i, column j) has centre (x, y) = (j + 0.5, i + 0.5); y grows downwards, so
  "above" means a smaller y;
* an object has a centre (cx, cy) and a size s (radius / half-side), s ∈ ``SIZE_RANGE``:
  circle (x−cx)² + (y−cy)² ≤ s², square |x−cx|, |y−cy| ≤ s, triangle pointing up with apex
  (cx, cy−s) and base y = cy+s from cx−s to cx+s;
* "A <relation> B" holds when, with d = centroid(B) − centroid(A), the offset along the
  relation's direction exceeds the offset across it (plus a margin): "left of" is
  d.x > |d.y| + margin. The dominant-axis rule makes the four relations mutually exclusive.

Colours are the six saturated primaries and secondaries: any two are ≥ 1.0 apart in RGB and
all have chroma (max − min) 1 against the grey background's 0, so segmentation has wide margins.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from b2fast.toy.grammar import PromptSpec, parse

CANVAS = 32
BACKGROUND = (0.1, 0.1, 0.1)
PALETTE = {
    "red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0), "magenta": (1.0, 0.0, 1.0), "cyan": (0.0, 1.0, 1.0),
}
# Below 5 px a digital circle can be an octagon that lacks only its 4 corner pixels (fill 0.94),
# too close to a square; 7 still lets two objects sit side by side, gap included, on 32 px.
SIZE_RANGE = (5.0, 7.0)
BORDER = 1.0          # px kept free between an object's extent and the canvas edge
GAP = 2.0             # px between two objects' extents, so blur never mixes their colours
RELATION_MARGIN = 3.0  # px by which a sampled scene satisfies its relation (detector uses 0)
MAX_TRIES = 2000


@dataclass(frozen=True)
class SceneObject:
    """One rendered object: colour and shape names, centre in pixels, size (radius/half-side)."""

    colour: str
    shape: str
    cx: float
    cy: float
    size: float

    def extent(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1): every shape fits in the square of half-side ``size``."""
        return self.cx - self.size, self.cy - self.size, self.cx + self.size, self.cy + self.size


Scene = tuple[SceneObject, ...]


def _grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    return xs, ys


def shape_mask(obj: SceneObject, height: int = CANVAS, width: int = CANVAS) -> np.ndarray:
    """Boolean (H, W) mask of ``obj``'s pixels (pixel centres inside the shape)."""
    xs, ys = _grid(height, width)
    dx, dy, s = xs - obj.cx, ys - obj.cy, obj.size
    if obj.shape == "circle":
        return dx * dx + dy * dy <= s * s
    if obj.shape == "square":
        return (np.abs(dx) <= s) & (np.abs(dy) <= s)
    if obj.shape == "triangle":
        # half-width grows from 0 at the apex (dy = −s) to s at the base (dy = +s)
        return (dy <= s) & (np.abs(dx) <= (dy + s) / 2)
    raise ValueError(f"shape: got {obj.shape!r}, allowed circle, square, triangle")


def render(scene: Sequence[SceneObject], height: int = CANVAS, width: int = CANVAS) -> np.ndarray:
    """float32 (3, H, W) image in [0, 1]: background grey, objects painted in order."""
    image = np.empty((3, height, width), np.float32)
    image[:] = np.asarray(BACKGROUND, np.float32)[:, None, None]
    for obj in scene:
        image[:, shape_mask(obj, height, width)] = np.asarray(PALETTE[obj.colour], np.float32)[:, None]
    return image


def render_batch(scenes: Sequence[Sequence[SceneObject]]) -> np.ndarray:
    """float32 (N, 3, 32, 32) images of ``scenes``."""
    return np.stack([render(scene) for scene in scenes])


def mask_centroid(mask: np.ndarray) -> tuple[float, float]:
    """(x, y) centroid of a mask's pixel centres, the point the detector measures."""
    ys, xs = np.nonzero(mask)
    return float(xs.mean()) + 0.5, float(ys.mean()) + 0.5


def relation_holds(a: tuple[float, float], b: tuple[float, float], relation: str,
                   margin: float = 0.0) -> bool:
    """Whether "A <relation> B" holds for centroids ``a`` and ``b`` (dominant-axis rule)."""
    dx, dy = b[0] - a[0], b[1] - a[1]
    along = {"left of": dx, "right of": -dx, "above": dy, "below": -dy}.get(relation)
    if along is None:
        raise ValueError(f"relation: got {relation!r}, allowed left of, right of, above, below")
    across = abs(dy) if relation in ("left of", "right of") else abs(dx)
    return along > across + margin


def _separated(a: SceneObject, b: SceneObject, gap: float = GAP) -> bool:
    """Extents at least ``gap`` apart along x or y, so the objects never touch."""
    ax0, ay0, ax1, ay1 = a.extent()
    bx0, by0, bx1, by1 = b.extent()
    return max(bx0 - ax1, ax0 - bx1, by0 - ay1, ay0 - by1) >= gap


def _random_object(colour: str, shape: str, rng: np.random.Generator) -> SceneObject:
    size = float(rng.uniform(*SIZE_RANGE))
    lo, hi = size + BORDER, CANVAS - size - BORDER
    return SceneObject(colour, shape, float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi)), size)


def _acceptable(scene: Scene, spec: PromptSpec) -> bool:
    if len(scene) == 2 and not _separated(*scene):
        return False
    if spec.relation is None:
        return True
    a, b = (mask_centroid(shape_mask(o)) for o in scene)
    return relation_holds(a, b, spec.relation, RELATION_MARGIN)


def sample_scene(spec: PromptSpec | str, rng: np.random.Generator) -> Scene:
    """A random scene satisfying ``spec``: objects in prompt order, non-overlapping, with any
    relation met by ``RELATION_MARGIN`` px. Rejection sampling: about 10 tries for two objects
    and 40 with a relation, ~0.3 ms a scene, cheap next to anything that consumes it."""
    if isinstance(spec, str):
        spec = parse(spec)
    for _ in range(MAX_TRIES):
        scene = tuple(_random_object(o.colour, o.shape, rng) for o in spec.objects)
        if _acceptable(scene, spec):
            return scene
    raise RuntimeError(f"no scene found for {spec} in {MAX_TRIES} tries")


def sample_images(prompts: Sequence[str], rng: np.random.Generator) -> np.ndarray:
    """float32 (N, 3, 32, 32) clean renders, one random scene per prompt: training data."""
    return render_batch([sample_scene(p, rng) for p in prompts])
