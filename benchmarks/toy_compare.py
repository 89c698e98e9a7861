"""B²-DiffuRL vs plain DDPO on the toy world, the paper's comparison at toy scale.

Both methods start from the same pretrained toy model, see the same number of reward queries
per stage (128 images) and run the same number of stages:

- **B²-DiffuRL** (the default preset): trunk + 4 branches per prompt, backward progressive
  interval 14 → 20 of 20 steps, best/worst-branch selection with thresholds ±0.5.
- **DDPO**: 128 independent samples per stage (K = 1), the whole 20-step chain trained from the
  first stage, every sample kept with its per-prompt z-score as advantage (thresholds 0).

For each seed and method it records held-out (test-split) and train-split alignment after
training, as mean score / success rate / diversity over the three templates, and writes a
Markdown table and the raw JSON. Usage::

    python benchmarks/toy_compare.py --seeds 0 1 2 --out runs/toy_compare
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

from b2fast.config import apply_overrides, load_yaml
from b2fast.train import preset_path
from b2fast.run.trainer import Trainer
from b2fast.utils import atomic_write_text

METHODS = {
    "B2-DiffuRL": [],
    "DDPO": ["--sampling.branches", "1", "--sampling.prompts_per_batch", "32",
             "--schedule.kind", "constant", "--schedule.min_interval", "20",
             "--selection.pos_threshold", "0", "--selection.neg_threshold", "-1e-9"],
}


def run_one(method: str, seed: int, out: Path, extra: list[str]) -> dict:
    cfg = load_yaml(preset_path("default.yaml"))
    apply_overrides(cfg, [*METHODS[method], "--seed", str(seed), "--out", str(out / f"{method}-seed{seed}"),
                          "--log.progress", "false", *extra])
    shutil.rmtree(cfg.out, ignore_errors=True)  # the script's own run folder: every run starts afresh
    # Before training both methods are the same model evaluated with the same seeds: evaluate
    # it once per seed (the trainer reads an eval_before.json made with the same settings).
    for other in METHODS:
        done = out / f"{other}-seed{seed}" / "eval_before.json"
        if other != method and done.is_file():
            Path(cfg.out).mkdir(parents=True, exist_ok=True)
            atomic_write_text(Path(cfg.out) / "eval_before.json", done.read_text())
            break
    started = time.perf_counter()
    trainer = Trainer(cfg)
    records = trainer.run()
    result = json.loads((Path(cfg.out) / "eval.json").read_text())
    return {"method": method, "seed": seed, "minutes": (time.perf_counter() - started) / 60,
            "train_minutes": sum(r["seconds"] for r in records) / 60,  # stages only, no evaluation
            "reward_first": records[0]["reward_mean"], "reward_last": records[-1]["reward_mean"],
            **result}


def _mean(rows: list[dict], split: str, key: str) -> float:
    return statistics.mean(r[key] for r in rows if r["split"] == split)


def summarise(results: list[dict]) -> str:
    """Markdown: per method, mean ± std over seeds of test/train alignment after training."""
    lines = ["| method | seeds | test success | test score | train success | train score | test diversity | train minutes |",
             "|---|---|---|---|---|---|---|---|"]
    def cell(runs, when, split, key):
        values = [_mean(r[when], split, key) for r in runs]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.3f} ± {spread:.3f}"

    def row(name, runs, when, minutes):
        return (f"| {name} | {len(runs)} | {cell(runs, when, 'test', 'success')} | "
                f"{cell(runs, when, 'test', 'score')} | {cell(runs, when, 'train', 'success')} | "
                f"{cell(runs, when, 'train', 'score')} | {cell(runs, when, 'test', 'diversity')} | {minutes} |")

    # The base model is evaluated with each seed's eval noise: one "before" per seed.
    first_per_seed = list({r["seed"]: r for r in reversed(results)}.values())
    lines.append(row("base model", first_per_seed, "before", "-"))
    for method in METHODS:
        runs = [r for r in results if r["method"] == method]
        if runs:
            lines.append(row(method, runs, "after",
                             f"{statistics.mean(r['train_minutes'] for r in runs):.1f}"))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Any config field of python -m b2fast.train can follow as --section.field VALUE (applied to "
               "every run, e.g. --eval.images_per_prompt 8). Each run writes OUT/<method>-seed<N>, "
               "replacing that folder if it exists.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default: %(default)s)")
    parser.add_argument("--out", default="runs/toy_compare", help="output folder (default: %(default)s)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS),
                        help="methods to run (default: all)")
    parser.add_argument("--table-only", action="store_true",
                        help="print the table of OUT/results.json again without running anything")
    args, extra = parser.parse_known_args()
    out = Path(args.out)
    if args.table_only:
        if not (out / "results.json").is_file():
            parser.error(f"--table-only: no {out / 'results.json'}; run the comparison first (or give --out)")
        print(summarise(json.loads((out / "results.json").read_text())))
        return
    results = []
    for seed in args.seeds:
        for method in args.methods:
            results.append(run_one(method, seed, out, extra))
            atomic_write_text(out / "results.json", json.dumps(results, indent=1))
    table = summarise(results)
    atomic_write_text(out / "results.md", table + "\n")
    print(table)


if __name__ == "__main__":
    main()
