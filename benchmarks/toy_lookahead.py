"""How well does the reward of x̂0 at an early step predict the reward of the finished image? The
quantity FK steering bets on: its potentials score x̂0 and resample particles by it.

Per seed: the prompt-seeds of ``toy_steer.py`` (each toy template's ``--split`` prompts,
``--max-prompts`` per template, ``--images-per-prompt`` image seeds), N = 4 independent samples of
each from the same noise seeds as its best-of-4 (so the same images), the exact ``toy_align``. At
every step i each sample's x̂0 = (x_t − √(1−ᾱ_t)·ε̂)/√ᾱ_t (what FK's potentials decode) is decoded
and scored, r_i; the finished image's reward is r. Per step, as a mean over templates of each
template's mean over prompt-seeds:

- ``pick``: r of the sample with the highest r_i among the prompt-seed's 4 (ties: the mean over the
  tied ones), i.e. choosing one particle at step i by its look-ahead reward;
- ``random``: the mean r of the 4 (choosing blindly), ``oracle``: the highest r (best-of-4);
- ``captured``: (pick − random) / (oracle − random) over the seed's prompt-seeds: 1 when x̂0 at step
  i ranks the particles as the finished images do, 0 when it carries no information;
- ``corr``: Pearson correlation of r_i and r within prompt-seeds (each centred on its own mean), the
  spread that resampling acts on.

``--lora RUN`` adds the same rows on the run's LoRA (``lora``; one run per seed allowed, as in
``toy_steer.py``). Writes ``OUT/toy_lookahead.jsonl`` (a line per seed × model × step) and
``OUT/toy_lookahead.md``: per model and step the mean over seeds with a 95% t-interval::

    python benchmarks/toy_lookahead.py --preset default --seeds 0 1 2 3 4 --out runs/lookahead
    python benchmarks/toy_lookahead.py --table-only --out runs/lookahead
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from toy_compare import mean_ci  # noqa: E402  (benchmarks/ is not a package)
from toy_steer import N, balanced, each_model, noise_seed, parse_args, prepare, write_table  # noqa: E402

KEYS = ("pick", "random", "oracle", "captured", "corr")


@torch.no_grad()
def lookahead_rewards(policy, scored, cfg, texts: list[str], generators) -> tuple[torch.Tensor, torch.Tensor]:
    """(rewards of x̂0 at every step (steps, rows), rewards of the finished images (rows,)) of one
    plain sampling call with one generator per row: the same images as ``sample.plain_sample``."""
    from b2fast.core.steering import fk_step_function, noise_source

    cache_dtype = getattr(torch, cfg.sampling.cache_dtype)
    step = fk_step_function(policy, cfg.sampling, cache_dtype)
    cond, draw = policy.embed(texts), noise_source(generators, len(texts), policy.device)
    x, early = draw((len(texts), *policy.latent_shape)).to(cache_dtype), []
    for i in range(policy.steps.num_steps):
        noise = draw(tuple(x.shape))
        x, x0 = step(x, torch.full((len(texts),), i, dtype=torch.long, device=policy.device), cond, noise)
        early.append(scored(policy.decode(x0, cfg.sampling.unet_batch), texts).double().cpu())
    images = policy.decode(policy.steps.image_latents(x, noise), cfg.sampling.unet_batch)
    return torch.stack(early), scored(images, texts).double().cpu()


def step_metrics(early: torch.Tensor, final: torch.Tensor) -> dict:
    """Per prompt-seed metrics of one step from (units, N) look-ahead and final rewards: pick,
    random, oracle (units,) and the pooled within-unit correlation and captured fraction."""
    top = early == early.max(dim=1, keepdim=True).values
    pick = (top * final).sum(dim=1) / top.sum(dim=1)
    random, oracle = final.mean(dim=1), final.max(dim=1).values
    gap = (oracle - random).sum()
    a, b = early - early.mean(dim=1, keepdim=True), final - final.mean(dim=1, keepdim=True)
    denom = (a.square().sum() * b.square().sum()).sqrt()
    return {"pick": pick, "random": random, "oracle": oracle,
            "captured": float((pick - random).sum() / gap) if gap > 0 else float("nan"),
            "corr": float((a * b).sum() / denom) if denom > 0 else float("nan")}


def run_seed(policy, scored, cfg, units: list[tuple[str, str]], seed: int, batch: int) -> list[dict]:
    """One row per step (the last step's x̂0 included) for one seed."""
    per, early, final = max(1, batch // N), [], []
    for lo in range(0, len(units), per):
        chunk = range(lo, min(lo + per, len(units)))
        texts = [units[u][1] for u in chunk for _ in range(N)]
        gens = [torch.Generator(policy.device).manual_seed(noise_seed(seed, u, j)) for u in chunk for j in range(N)]
        e, f = lookahead_rewards(policy, scored, cfg, texts, gens)
        early.append(e.view(e.shape[0], -1, N))
        final.append(f.view(-1, N))
    early, final = torch.cat(early, dim=1), torch.cat(final)
    rows = []
    for i in range(early.shape[0]):
        m = step_metrics(early[i], final)
        rows.append({"step": i, "num_steps": early.shape[0], "captured": m["captured"], "corr": m["corr"],
                     **{k: balanced(m[k], units)[0] for k in ("pick", "random", "oracle")}})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | step | seeds | " + " | ".join(f"{k}, mean [95% CI]" for k in KEYS) + " |",
             "|---|---:|---:|" + "---|" * len(KEYS)]
    for model in sorted({r["model"] for r in rows}):
        for step in sorted({r["step"] for r in rows if r["model"] == model}):
            last = {r["seed"]: r for r in rows if r["model"] == model and r["step"] == step}  # last line wins
            cells = []
            for k in KEYS:
                mean, lo, hi = mean_ci(r[k] for r in last.values())
                cells.append(f"{mean:.3f} [{lo:.3f}, {hi:.3f}]")
            lines.append(f"| {model} | {step} | {len(last)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser, args, overrides, log = parse_args(__doc__, "toy_lookahead", "default", argv)
    if not args.table_only:
        cfg, models, loras, units = prepare(parser, args, overrides)
        log.parent.mkdir(parents=True, exist_ok=True)
        for seed, model, lora, policy, scored in each_model(args, models, loras):
            rows = [{"seed": seed, "model": model, "lora": lora, "split": args.split, **row}
                    for row in run_seed(policy, scored, cfg, units, seed, args.batch)]
            with log.open("a") as f:  # a seed's steps together: one write per seed and model
                f.writelines(json.dumps(row) + "\n" for row in rows)
            print(f"seed {seed} {model}: done", file=sys.stderr, flush=True)
    write_table(parser, log, table)


if __name__ == "__main__":
    main()
