"""Which constraints of a toy prompt does a model meet, and does it draw the relation it is asked
for? What limits toy success: the base model's skills, and what RL training adds to them.

Per seed: the prompt-seeds of ``toy_steer.py`` (each toy template's ``--split`` prompts,
``--max-prompts`` per template, ``--images-per-prompt`` image seeds), one plain sample each (the
same noise seeds as toy_steer's ``plain``, so the same images), checked by the exact detector.
Measures, per template, as fractions of its images:

- ``A present`` / ``B present``: the first / second object's colour is drawn;
- ``A shape`` / ``B shape``: that colour is drawn as the asked shape;
- ``both shapes``: both objects drawn, each with its shape (two-object success);
- ``relation``: spatial prompts, both colours drawn and in the asked relation (success needs it
  and both shapes);
- ``relation if both``: the relation among the images with both colours drawn, ``other relations
  if both`` the mean over the three relations not asked for on the same images. The detector's
  dominant-axis rule splits the plane into the four relations, so a model that ignores the
  relation word scores about the same on both; ``relation gain`` is their difference;
- ``success``: every constraint met.

``--lora RUN`` adds the same rows for the run's LoRA (one run per seed allowed, as in
``toy_steer.py``). Writes ``OUT/toy_constraints.jsonl`` (a line per seed × model) and
``OUT/toy_constraints.md``: per template and measure the mean over seeds with a 95% t-interval, and
``lora − base`` paired by seed::

    python benchmarks/toy_constraints.py --preset default --split train --max-prompts 24 \\
        --images-per-prompt 8 --seeds 0 1 2 3 4 --lora RUN0 RUN1 RUN2 RUN3 RUN4 --out runs/constraints
    python benchmarks/toy_constraints.py --table-only --out runs/constraints
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from toy_compare import mean_ci  # noqa: E402  (benchmarks/ is not a package)
from toy_steer import TEMPLATES, each_model, noise_seed, parse_args, prepare, write_table  # noqa: E402

MEASURES = ("A present", "A shape", "B present", "B shape", "both shapes", "relation", "relation if both",
            "other relations if both", "relation gain", "success")


def constraint_measures(images: torch.Tensor, prompts: list[str]) -> dict:
    """The measures of one template's images (rows of ``prompts``); NaN where a measure does not apply."""
    from b2fast.toy.detector import check_batch
    from b2fast.toy.grammar import RELATIONS, parse

    checks = torch.tensor(check_batch(images, prompts), dtype=torch.float64)  # (n, constraints)
    out = dict.fromkeys(MEASURES, float("nan"))
    out["success"] = float(checks.all(dim=1).double().mean())
    names = ("A present", "A shape", "B present", "B shape", "relation")[:checks.shape[1]]
    out.update({n: float(v) for n, v in zip(names, checks.mean(dim=0))})
    if checks.shape[1] < 4:
        return out
    out["both shapes"] = float((checks[:, 1] * checks[:, 3]).mean())
    if checks.shape[1] == 5:
        both = checks[:, 0] * checks[:, 2]
        if both.sum() > 0:
            specs = [parse(p) for p in prompts]
            others = []
            for shift in (1, 2, 3):  # the same images checked against each relation not asked for
                swapped = [dataclasses.replace(s, relation=RELATIONS[(RELATIONS.index(s.relation) + shift) % 4])
                           for s in specs]
                others.append(float((torch.tensor(check_batch(images, swapped))[:, 4].double() * both).sum() / both.sum()))
            out["relation if both"] = float((checks[:, 4] * both).sum() / both.sum())
            out["other relations if both"] = sum(others) / 3
            out["relation gain"] = out["relation if both"] - out["other relations if both"]
    return out


def run_seed(policy, cfg, units: list[tuple[str, str]], seed: int, batch: int) -> dict:
    """{template: measures} of one seed's plain samples (the first of toy_steer's 4 per prompt-seed)."""
    from b2fast.sample import plain_sample

    images = []
    for lo in range(0, len(units), batch):
        chunk = range(lo, min(lo + batch, len(units)))
        gens = [torch.Generator(policy.device).manual_seed(noise_seed(seed, u, 0)) for u in chunk]
        images.append(plain_sample(policy, [units[u][1] for u in chunk], cfg.sampling, gens).float().cpu())
    images = torch.cat(images)
    return {t: constraint_measures(images[[i for i, (tt, _) in enumerate(units) if tt == t]],
                                   [p for tt, p in units if tt == t])
            for t in TEMPLATES if any(tt == t for tt, _ in units)}


def _cell(values) -> str:
    values = [v for v in values if v == v]
    if not values:
        return "-"
    mean, lo, hi = mean_ci(values)
    return f"{mean:.3f}" if len(values) < 2 else f"{mean:.3f} [{lo:.3f}, {hi:.3f}]"


def table(rows: list[dict]) -> str:
    last = {(r["seed"], r["model"]): r for r in rows}  # the last line of a seed and model counts
    models = sorted({m for _, m in last}, key=lambda m: (m != "base", m))
    seeds = sorted({s for s, _ in last})
    lines = ["| template | measure | " + " | ".join(f"{m}, mean [95% CI]" for m in models)
             + (" | lora − base, paired by seed |" if "lora" in models and "base" in models else " |"),
             "|---|---|" + "---|" * (len(models) + ("lora" in models and "base" in models))]
    for t in TEMPLATES:
        for k in MEASURES:
            per = {m: {s: last[(s, m)]["measures"].get(t, {}).get(k, float("nan")) for s in seeds if (s, m) in last}
                   for m in models}
            if all(v != v for m in models for v in per[m].values()):
                continue
            cells = [_cell(per[m].values()) for m in models]
            if "lora" in models and "base" in models:
                cells.append(_cell(per["lora"][s] - per["base"][s] for s in per["lora"] if s in per["base"]))
            lines.append(f"| {t} | {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines + ["", f"seeds: {', '.join(map(str, seeds))}"])


def main(argv: list[str] | None = None) -> None:
    parser, args, overrides, log = parse_args(__doc__, "toy_constraints", "default", argv)
    if not args.table_only:
        cfg, models, loras, units = prepare(parser, args, overrides)
        log.parent.mkdir(parents=True, exist_ok=True)
        for seed, model, lora, policy, _ in each_model(args, models, loras):
            row = {"seed": seed, "model": model, "lora": lora, "split": args.split,
                   "prompt_seeds": len(units), "measures": run_seed(policy, cfg, units, seed, args.batch)}
            with log.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"seed {seed} {model}: done", file=sys.stderr, flush=True)
    write_table(parser, log, table)


if __name__ == "__main__":
    main()
