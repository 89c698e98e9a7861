"""Does a toy model place its objects by the relation word? A probe in seconds, without sampling.

For spatial prompts "a A left of a B" (and right of, above, below), the model's guided x̂₀ at a
few noisy timesteps (one UNet batch per timestep, the same noise for every relation) is read as
a picture: the soft mass of A's colour and of B's colour give two centroids, and the offset
B − A projected on the relation's direction ("left of": B is to the right, +x) is what a model
that knows the relation makes positive. The same numbers on the clean renders the model was
trained on give the scale (about +15 px); a model that ignores the relation word gives the same
(dx, dy) for all four relations, so their "along" values cancel in pairs (left/right, above/below).
That mean over colour pairs can also cancel a model that moves the objects by the relation word
the right way for one pair and the wrong way for another, so the CLI also prints, per pair and in
both word orders ("a A left of a B" and "a B left of a A"), how far "left of" and "right of" (and
"above" and "below") pull the objects apart: about +30 px on clean renders, 0 where the word is
ignored, negative where it is mirrored; a model that places objects by word order is positive in
both orders.

    python benchmarks/toy_relation_probe.py --model b2fast:toy --guidance-scale 2
    python benchmarks/toy_relation_probe.py --model runs/toy-model --timesteps 951 801 601

``toy_constraints.py`` measures the same skill on samples (the asked relation against the other
three among images with both colours), which takes minutes; this answers "has it learned
anything about relations at all" while pretraining experiments run.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

PAIRS = (("red", "circle", "blue", "square"), ("yellow", "square", "cyan", "circle"),
         ("magenta", "triangle", "green", "square"))
RELATIONS = ("left of", "right of", "above", "below")
DIRECTION = {"left of": (1, 0), "right of": (-1, 0), "above": (0, 1), "below": (0, -1)}  # of B − A, y down


def colour_centroids(images: torch.Tensor, colour: str, sharpness: float = 4.0) -> torch.Tensor:
    """(N, 2) centroids (x, y) in pixels of each image's soft mass of ``colour``; images in [−1, 1]."""
    from b2fast.toy.world import PALETTE

    target = torch.tensor(PALETTE[colour], dtype=images.dtype).view(1, 3, 1, 1) * 2 - 1
    weight = torch.exp(-sharpness * ((images - target) ** 2).sum(1))                # (N, H, W)
    ys, xs = torch.meshgrid(torch.arange(images.shape[2], dtype=images.dtype) + 0.5,
                            torch.arange(images.shape[3], dtype=images.dtype) + 0.5, indexing="ij")
    total = weight.sum((1, 2)).clamp_min(1e-12)
    return torch.stack([(weight * xs).sum((1, 2)) / total, (weight * ys).sum((1, 2)) / total], dim=1)


def offsets(images: torch.Tensor, pair: tuple[str, str, str, str], relation: str) -> tuple[float, float, float]:
    """Mean (dx, dy) of B − A over ``images`` and its projection on ``relation``'s direction."""
    d = (colour_centroids(images, pair[2]) - colour_centroids(images, pair[0])).mean(0)
    ux, uy = DIRECTION[relation]
    return float(d[0]), float(d[1]), float(d[0] * ux + d[1] * uy)


def prompt_of(pair: tuple[str, str, str, str], relation: str) -> str:
    """"a A relation a B" for the pair (colour A, shape A, colour B, shape B)."""
    return f"a {pair[0]} {pair[1]} {relation} a {pair[2]} {pair[3]}"


def swapped(pair: tuple[str, str, str, str]) -> tuple[str, str, str, str]:
    """The same two objects named in the other order ("a B left of a A")."""
    return pair[2], pair[3], pair[0], pair[1]


def data_x0(pair, relation: str, n: int, seed: int) -> torch.Tensor:
    """Clean renders of the prompt in [−1, 1]: what a perfect model's x̂₀ averages over."""
    from b2fast.toy.world import sample_images

    return torch.from_numpy(sample_images([prompt_of(pair, relation)] * n, np.random.default_rng(seed))) * 2 - 1


class GuidedX0:
    """x̂₀ of a model under classifier-free guidance at a timestep of its ``num_steps``-step DDIM grid,
    through the trainer's ``Policy`` (its text cache, CFG batch and ε/v handling)."""

    def __init__(self, path: str, num_steps: int = 20):
        from b2fast.config import ModelConfig
        from b2fast.core.policy import Policy

        self.policy = Policy(ModelConfig(path=path, dtype="float32"), torch.device("cpu"), num_steps, 1.0)
        self.grid = [int(t) for t in self.policy.steps.timesteps]

    @torch.no_grad()
    def __call__(self, prompt: str, noise: torch.Tensor, t: int, guidance_scale: float) -> torch.Tensor:
        n = noise.shape[0]
        index = torch.full((n,), self.grid.index(t), dtype=torch.long)
        eps_u, eps_c = self.policy.predict_eps(noise, index, self.policy.embed([prompt]).expand(n, -1, -1),
                                               guidance_scale)
        eps = eps_c if eps_u is None else eps_u + guidance_scale * (eps_c - eps_u)
        ab = self.policy.scheduler.alphas_cumprod[t]
        return ((noise - (1 - ab).sqrt() * eps) / ab.sqrt()).clamp(-1, 1)


def model_offsets(model, timesteps: list[int], noises: int, guidance_scale: float, seed: int,
                  pairs) -> dict:
    """{(pair, relation, t): (dx, dy, along)} of the model's x̂₀, the same noise for every prompt at a t."""
    out = {}
    for t in timesteps:
        noise = torch.randn((noises, 3, 32, 32), generator=torch.Generator().manual_seed(seed + t))
        for pair in pairs:
            for relation in RELATIONS:
                out[(pair, relation, t)] = offsets(model(prompt_of(pair, relation), noise, t, guidance_scale),
                                                   pair, relation)
    return out


def both_orders(pairs) -> list[tuple[str, str, str, str]]:
    """Each pair as listed, then swapped."""
    return [q for p in pairs for q in (p, swapped(p))]


def probe(model, timesteps: list[int], noises: int, guidance_scale: float, seed: int,
          offs: dict | None = None) -> list[dict]:
    """Rows {source, t, relation, dx, dy, along} averaged over ``PAIRS``; source "data" is the clean renders.
    ``offs``: ``model_offsets`` already computed for (at least) ``PAIRS``."""
    offs = offs or model_offsets(model, timesteps, noises, guidance_scale, seed, PAIRS)
    rows = []
    for relation in RELATIONS:
        values = np.mean([offsets(data_x0(p, relation, noises, seed), p, relation) for p in PAIRS], axis=0)
        rows.append(dict(source="data", t=0, relation=relation, **dict(zip(("dx", "dy", "along"), values))))
    for t in timesteps:
        for relation in RELATIONS:
            values = np.mean([offs[(p, relation, t)] for p in PAIRS], axis=0)
            rows.append(dict(source="model", t=t, relation=relation, **dict(zip(("dx", "dy", "along"), values))))
    return rows


def separations(model, timesteps: list[int], noises: int, guidance_scale: float, seed: int,
                offs: dict | None = None) -> list[dict]:
    """Per pair of ``PAIRS`` and word order: rows {pair, t, lr, ab}. ``lr`` = dx("left of") − dx("right of")
    of B − A, ``ab`` = dy("above") − dy("below"): about +30 px on clean renders, 0 for a model that ignores
    the word, negative for one that mirrors it. The mean over pairs in ``probe`` can hide moves of opposite
    sign in different pairs; a model that binds objects by word order is positive in both orders of a pair.
    ``offs``: ``model_offsets`` already computed for both orders."""
    pairs = both_orders(PAIRS)
    offs = offs or model_offsets(model, timesteps, noises, guidance_scale, seed, pairs)
    return [dict(pair=" ".join(pair), t=t, lr=offs[(pair, "left of", t)][0] - offs[(pair, "right of", t)][0],
                 ab=offs[(pair, "above", t)][1] - offs[(pair, "below", t)][1])
            for t in timesteps for pair in pairs]


def separation_table(rows: list[dict]) -> str:
    """Markdown: a row per pair and word order, a (left − right dx, above − below dy) cell per timestep."""
    timesteps = sorted({r["t"] for r in rows}, reverse=True)
    header = " | ".join(f"t = {t}: left − right dx, above − below dy" for t in timesteps)
    lines = [f"| A … B (x̂₀ at t) | {header} |", "|---|" + "---|" * len(timesteps)]
    for pair in dict.fromkeys(r["pair"] for r in rows):
        cells = {r["t"]: r for r in rows if r["pair"] == pair}
        lines.append(f"| {pair} | " + " | ".join(f"{cells[t]['lr']:+.2f}, {cells[t]['ab']:+.2f}" for t in timesteps)
                     + " |")
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    lines = ["| x̂₀ of | " + " | ".join(f"{r}: dx, dy (along)" for r in RELATIONS) + " | mean along |",
             "|---|" + "---|" * (len(RELATIONS) + 1)]
    for key in sorted({(r["source"], r["t"]) for r in rows}, key=lambda k: (k[0] != "data", -k[1])):
        cells = [r for r in rows if (r["source"], r["t"]) == key]
        label = "clean renders (data)" if key[0] == "data" else f"model, t = {key[1]}"
        lines.append(f"| {label} | " + " | ".join(f"{r['dx']:+.2f}, {r['dy']:+.2f} ({r['along']:+.2f})" for r in cells)
                     + f" | {np.mean([r['along'] for r in cells]):+.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="b2fast:toy", help="toy model: b2fast:toy or a diffusers folder (default: %(default)s)")
    p.add_argument("--timesteps", type=int, nargs="+", default=[951, 801, 601],
                   help="noisy timesteps to probe, on the 20-step DDIM grid (951, 901, …, 1)")
    p.add_argument("--noises", type=int, default=64, help="noise samples per timestep (default: %(default)s)")
    p.add_argument("--guidance-scale", type=float, default=2.0, help="CFG scale of x̂₀ (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.noises < 1:
        p.error("--noises must be >= 1")
    try:
        model = GuidedX0(args.model)
    except (OSError, ValueError) as exc:
        print(f"error: --model {args.model}: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    if any(t not in model.grid for t in args.timesteps):
        p.error(f"--timesteps must be on the 20-step DDIM grid: {model.grid}")
    settings = (args.timesteps, args.noises, args.guidance_scale, args.seed)
    offs = model_offsets(model, *settings, both_orders(PAIRS))      # one x̂₀ per prompt serves both tables
    print(table(probe(model, *settings, offs=offs)))
    print("\nper pair, in both word orders (clean renders: about +30, +30; the word ignored: 0, 0):")
    print(separation_table(separations(model, *settings, offs=offs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
