"""Exact rule-based detector and prompt-alignment score for toy-world images.

Pipeline (all batched torch ops, on the images' device):

1. **Colour.** A pixel is foreground when its chroma max(RGB) − min(RGB) ≥ ``CHROMA_MIN`` (the
   palette has chroma 1, the grey background 0); its colour is the palette entry nearest to
   (rgb − min) / chroma, i.e. the 60° hue sector, so dim or shifted colours keep their name.
2. **Objects.** 4-connected components of equal colour (min-label propagation with pointer
   jumping; 4- not 8-connected so a stray touching a corner diagonally stays apart);
   components under ``MIN_PIXELS`` are dropped. Per image and colour the largest component is
   *the* object of that colour, so extra copies never earn credit.
3. **Shape** from three measures of the component in its bounding box (clean-render ranges
   for sizes 5–7 in brackets): fill = pixels / box area (circle .67–.90, square 1, triangle
   .50–.60); corner = filled share of the four 2×2 corner patches (circle ≤ .25, square 1,
   triangle .38–.50); asymmetry = |bottom-half − top-half pixels| / pixels (circle ≤ .12,
   square 0, triangle ≥ .40). Boxes with aspect outside ``ASPECT_RANGE`` are no shape.

Constraints of a prompt (score = fraction satisfied, success = all satisfied):

==============  ======================================================================
template        constraints, in order
==============  ======================================================================
``attribute``   C1 present; C1 object is S1                                  (2)
``two_object``  C1 present; C1 object is S1; C2 present; C2 object is S2    (4)
``spatial``     the four above; relation holds between the C1 and C2 centroids (5)
==============  ======================================================================

"Cn present" means a component of colour Cn exists; the relation uses the dominant-axis rule
of :func:`b2fast.toy.world.relation_holds` with zero margin and fails if either is missing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from b2fast.toy.grammar import COLOURS, SHAPES, PromptSpec, parse
from b2fast.toy.world import PALETTE, relation_holds

# Background with σ = 0.1 pixel noise passes this 3.5% of the time (range of 3 normals > 3.5σ),
# as strays that MIN_PIXELS drops; the palette (chroma 1) passes with room to spare.
CHROMA_MIN = 0.35
MIN_PIXELS = 12         # the smallest object (triangle, size 5) has ~50 px
CORNER = 2              # side of the corner patches, px
ASPECT_RANGE = (0.7, 1.43)  # clean renders span 0.90–1.11
TRIANGLE_ASYMMETRY = 0.2    # clean renders: circle ≤ 0.12, triangle ≥ 0.40
_NEIGHBOURS = [(-1, 0), (1, 0), (0, -1), (0, 1)]


@dataclass
class Detections:
    """Per image and palette colour (columns in ``COLOURS`` order), the largest component.

    ``shape`` indexes ``SHAPES`` (−1: no recognised shape); ``cx``/``cy`` are pixel-centre
    centroids in the world's coordinates; every field is (N, 6); absent entries are 0 / −1.
    """

    present: torch.Tensor
    shape: torch.Tensor
    cx: torch.Tensor
    cy: torch.Tensor
    pixels: torch.Tensor


def _shift(x: torch.Tensor, dy: int, dx: int, fill: int) -> torch.Tensor:
    """x[:, i + dy, j + dx] with ``fill`` outside the canvas."""
    h, w = x.shape[1:]
    return F.pad(x, (1, 1, 1, 1), value=fill)[:, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]


def classify_pixels(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) images in [0, 1] → (N, H, W) long colour index, −1 for background."""
    images = images.float().clamp(0, 1)
    hi, lo = images.amax(1), images.amin(1)
    chroma = hi - lo
    hue = (images - lo[:, None]) / chroma.clamp_min(1e-6)[:, None]          # (N, 3, H, W)
    palette = torch.tensor([PALETTE[c] for c in COLOURS], device=images.device)  # (6, 3)
    # argmin ‖hue − p‖² = argmax 2·hue·p − ‖p‖²; the hue term ‖hue‖² is the same for all p
    closeness = 2 * torch.einsum("nchw,kc->nkhw", hue, palette) \
        - (palette ** 2).sum(1)[None, :, None, None]                       # (N, 6, H, W)
    return torch.where(chroma >= CHROMA_MIN, closeness.argmax(1), -1)


def label_components(colours: torch.Tensor) -> torch.Tensor:
    """4-connected components of equal colour: (N, H, W) label = smallest flat pixel index of
    the component, H·W on background. Converges in O(log diameter) pointer-jumping rounds."""
    n, h, w = colours.shape
    big = h * w
    fg = colours >= 0
    same = [(_shift(colours, dy, dx, -1) == colours) & fg for dy, dx in _NEIGHBOURS]
    labels = torch.where(fg, torch.arange(big, device=colours.device).view(1, h, w), big)
    while True:
        new = labels
        for (dy, dx), linked in zip(_NEIGHBOURS, same):
            new = torch.minimum(new, torch.where(linked, _shift(labels, dy, dx, big), big))
        # pointer jumping: a label is a pixel of the same component with a smaller label
        flat = new.view(n, big)
        new = torch.where(fg, flat.gather(1, flat.clamp(max=big - 1)).view(n, h, w), big)
        if torch.equal(new, labels):
            return labels
        labels = new


def _reduce(index: torch.Tensor, values: torch.Tensor, size: int, how: str) -> torch.Tensor:
    """Per-component reduction; sums are of integers < 2²⁴, so exact in any order (also CUDA)."""
    out = torch.zeros(size, dtype=values.dtype, device=values.device)
    return out.scatter_reduce(0, index, values, reduce=how, include_self=False)


def _classify_shapes(n_comp: int, xs: torch.Tensor, ys: torch.Tensor, comp: torch.Tensor,
                     count: torch.Tensor, box: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Shape index per component from fill, corner and asymmetry (module docstring, step 3)."""
    x0, x1, y0, y1 = box
    w, h = (x1 - x0 + 1).float(), (y1 - y0 + 1).float()
    fill = count / (w * h)
    in_corner = (((xs - x0[comp]) < CORNER) | ((x1[comp] - xs) < CORNER)) & \
                (((ys - y0[comp]) < CORNER) | ((y1[comp] - ys) < CORNER))
    corner = _reduce(comp, in_corner.float(), n_comp, "sum") / (4 * CORNER * CORNER)
    mid = (y0 + y1).float()[comp] / 2
    signed = (ys.float() > mid).float() - (ys.float() < mid).float()
    asym = _reduce(comp, signed, n_comp, "sum").abs() / count
    aspect_ok = (w / h >= ASPECT_RANGE[0]) & (w / h <= ASPECT_RANGE[1])
    # each cut lies between the clean-render ranges of the docstring, with room for noise:
    # a square keeps corner ≥ .5 and fill ≥ .75 even with a stray row and column attached
    is_triangle = (asym >= TRIANGLE_ASYMMETRY) & (fill >= 0.35) & (fill <= 0.75)
    is_square = (asym < TRIANGLE_ASYMMETRY) & (corner >= 0.5) & (fill >= 0.75)
    is_circle = (asym < TRIANGLE_ASYMMETRY) & (corner < 0.5) & (fill >= 0.6) & (fill <= 0.95)
    shape = torch.full_like(count, -1, dtype=torch.long)
    for index, hit in enumerate((is_circle, is_square, is_triangle)):  # SHAPES order
        shape = torch.where(hit & aspect_ok, index, shape)
    return shape


@torch.no_grad()
def detect(images: torch.Tensor) -> Detections:
    """Find the largest component of each palette colour in each of (N, 3, H, W) images."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images: expected (N, 3, H, W), got {tuple(images.shape)}")
    n, _, h, w = images.shape
    colours = classify_pixels(images)
    labels = label_components(colours)
    img, ys, xs = torch.nonzero(colours >= 0, as_tuple=True)
    keys, comp = torch.unique(img * (h * w) + labels[img, ys, xs], return_inverse=True)
    n_comp = keys.numel()
    count = torch.bincount(comp, minlength=n_comp).float()
    box = tuple(_reduce(comp, v, n_comp, how) for v, how in
                ((xs, "amin"), (xs, "amax"), (ys, "amin"), (ys, "amax")))
    shape = _classify_shapes(n_comp, xs, ys, comp, count, box)
    cx = _reduce(comp, xs.float(), n_comp, "sum") / count.clamp_min(1) + 0.5
    cy = _reduce(comp, ys.float(), n_comp, "sum") / count.clamp_min(1) + 0.5
    owner = keys // (h * w)
    colour = colours.reshape(n, -1)[owner, keys % (h * w)]
    return _largest_per_colour(n, owner, colour, count, shape, cx, cy)


def _largest_per_colour(n: int, owner: torch.Tensor, colour: torch.Tensor, count: torch.Tensor,
                        shape: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor) -> Detections:
    """Scatter components into (N, 6) tables, keeping the largest per (image, colour)."""
    keep = count >= MIN_PIXELS
    owner, colour, count, shape, cx, cy = (t[keep] for t in (owner, colour, count, shape, cx, cy))
    slot = owner * len(COLOURS) + colour
    # unique rank (size, then first found) so exactly one component wins each slot
    rank = count.long() * (count.numel() + 1) + torch.arange(count.numel(), 0, -1, device=count.device)
    best = _reduce(slot, rank, n * len(COLOURS), "amax")
    win = rank == best[slot]
    tables = []
    for values, empty in ((count, 0.0), (shape, -1), (cx, 0.0), (cy, 0.0)):
        table = torch.full((n * len(COLOURS),), empty, dtype=values.dtype, device=values.device)
        table[slot[win]] = values[win]
        tables.append(table.view(n, len(COLOURS)))
    pixels, shape_t, cx_t, cy_t = tables
    return Detections(pixels > 0, shape_t, cx_t, cy_t, pixels.long())


def _as_spec(prompt: PromptSpec | str) -> PromptSpec:
    return prompt if isinstance(prompt, PromptSpec) else parse(prompt)


def constraint_names(prompt: PromptSpec | str) -> list[str]:
    """Readable constraints of ``prompt``, in the order :func:`check_batch` reports them."""
    spec = _as_spec(prompt)
    names = []
    for obj in spec.objects:
        names += [f"{obj.colour} present", f"{obj.colour} object is a {obj.shape}"]
    if spec.relation is not None:
        names.append(f"{spec.objects[0].colour} {spec.relation} {spec.objects[1].colour}")
    return names


def _check_row(present, shape, cx, cy, spec: PromptSpec) -> list[bool]:
    """The constraints of ``spec`` on one image's (6,) detection rows (Python lists)."""
    result = []
    for obj in spec.objects:
        c = COLOURS.index(obj.colour)
        result += [present[c], present[c] and shape[c] == SHAPES.index(obj.shape)]
    if spec.relation is not None:
        a, b = (COLOURS.index(o.colour) for o in spec.objects)
        result.append(present[a] and present[b]
                      and relation_holds((cx[a], cy[a]), (cx[b], cy[b]), spec.relation))
    return result


def _as_images(images) -> torch.Tensor:
    images = torch.as_tensor(images)
    return images[None] if images.ndim == 3 else images


def check_batch(images, prompts: Sequence[PromptSpec | str]) -> list[list[bool]]:
    """Per image, the truth of each constraint of its prompt (see :func:`constraint_names`)."""
    images = _as_images(images)
    specs = [_as_spec(p) for p in prompts]   # parse first: a bad prompt fails before any work
    if len(specs) != images.shape[0]:
        raise ValueError(f"prompts: got {len(specs)} for {images.shape[0]} images")
    det = detect(images)
    rows = zip(*(t.tolist() for t in (det.present, det.shape, det.cx, det.cy)))
    return [_check_row(*row, spec) for row, spec in zip(rows, specs)]


def score_batch(images, prompts: Sequence[PromptSpec | str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) float32 scores (fraction of constraints met) and (N,) bool success, on the CPU."""
    checks = check_batch(images, prompts)
    scores = torch.tensor([sum(c) / len(c) for c in checks], dtype=torch.float32)
    return scores, torch.tensor([all(c) for c in checks], dtype=torch.bool)


def score(image, prompt: PromptSpec | str) -> tuple[float, bool]:
    """(score, success) of one (3, H, W) image against ``prompt``."""
    scores, success = score_batch(_as_images(image), [prompt])
    return float(scores[0]), bool(success[0])
