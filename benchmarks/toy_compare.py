"""B²-DiffuRL vs plain DDPO on the toy world, the paper's comparison at toy scale.

Both methods start from the same pretrained toy model, see the same prompts (balanced over the
three templates), the same number of reward queries per stage (128 images) and run the same
number of stages:

- **B²-DiffuRL** (preset ``default``): trunk + 4 branches per prompt, backward progressive
  interval 14 → 20 of 20 steps, best/worst-branch selection with thresholds ±0.5.
- **DDPO** (preset ``toy_ddpo``): 128 independent samples per stage (K = 1), the whole 20-step
  chain trained from the first stage, every sample kept, DDPO's per-prompt stat tracking
  (``selection.kind: ddpo``), PPO clip range 1e-4, one inner epoch.

``--lrs`` makes it a small learning-rate sweep: every method runs with every lr (and seed), and
per method the lr with the best mean *training* reward over the last ``--select-last`` stages
(mean over seeds; held-out prompts play no part) is chosen; the table reports the chosen runs.
For each run it records held-out (test-split) and train-split alignment after training, as mean
score / success rate / diversity over the three templates, and writes a Markdown table and the
raw JSON. Usage::

    python benchmarks/toy_compare.py --seeds 0 1 2 --lrs 3e-3 1e-2 3e-2 --out runs/toy_compare
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

METHODS = {"B2-DiffuRL": "default.yaml", "DDPO": "toy_ddpo.yaml"}  # method -> preset


def run_name(method: str, seed: int, lr: float | None) -> str:
    return f"{method}-seed{seed}" if lr is None else f"{method}-lr{lr:g}-seed{seed}"


def run_one(method: str, seed: int, out: Path, extra: list[str], lr: float | None = None) -> dict:
    cfg = load_yaml(preset_path(METHODS[method]))
    apply_overrides(cfg, ["--seed", str(seed), "--out", str(out / run_name(method, seed, lr)),
                          "--log.progress", "false", *(["--train.lr", repr(lr)] if lr is not None else []),
                          *extra])
    shutil.rmtree(cfg.out, ignore_errors=True)  # the script's own run folder: every run starts afresh
    # Before training every run of a seed is the same model evaluated with the same seeds: reuse
    # an evaluation already made (the trainer reads eval_before.json only if made with the same settings).
    done = next(iter(sorted(out.glob(f"*-seed{seed}/eval_before.json"))), None)
    if done is not None:
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(cfg.out) / "eval_before.json", done.read_text())
    started = time.perf_counter()
    trainer = Trainer(cfg)
    records = trainer.run()
    result = json.loads((Path(cfg.out) / "eval.json").read_text()) if cfg.eval.enabled else {}
    return {"method": method, "seed": seed, "lr": cfg.train.lr,
            "minutes": (time.perf_counter() - started) / 60,
            "train_minutes": sum(r["seconds"] for r in records) / 60,  # stages only, no evaluation
            "reward_first": records[0]["reward_mean"], "reward_last": records[-1]["reward_mean"],
            "stage_rewards": [r["reward_mean"] for r in records], **result}


def _lr(lr: float | None) -> str:
    return "?" if lr is None else f"{lr:g}"  # results.json of an older version holds no lr


def train_reward(run: dict, last: int) -> float:
    """Mean training (stage) reward over the run's last ``last`` stages."""
    values = [v for v in run.get("stage_rewards", [run["reward_last"]])[-last:] if v is not None]
    return statistics.mean(values) if values else float("-inf")


def choose_lrs(results: list[dict], last: int) -> tuple[dict[str, float], list[str]]:
    """Per method, the lr with the best mean (over seeds) training reward of the last stages;
    and a Markdown table of the sweep."""
    lines = [f"| method | lr | seeds | training reward, last {last} stages | chosen |", "|---|---|---|---|---|"]
    chosen = {}
    for method in METHODS:
        by_lr: dict[float, list[float]] = {}
        for r in results:
            if r["method"] == method:
                by_lr.setdefault(r.get("lr"), []).append(train_reward(r, last))
        if not by_lr:
            continue
        means = {lr: statistics.mean(v) for lr, v in by_lr.items()}
        chosen[method] = max(means, key=lambda lr: means[lr])
        for lr, mean in means.items():
            mark = "yes" if lr == chosen[method] else ""
            lines.append(f"| {method} | {_lr(lr)} | {len(by_lr[lr])} | {mean:.4f} | {mark} |")
    return chosen, lines


def _mean(rows: list[dict], split: str, key: str) -> float:
    return statistics.mean(r[key] for r in rows if r["split"] == split)


def summarise(results: list[dict], last: int = 3) -> str:
    """Markdown: the lr sweep, then per method (at its chosen lr) mean ± std over seeds of
    test/train alignment after training."""
    chosen, sweep = choose_lrs(results, last)
    results = [r for r in results if r.get("lr") == chosen.get(r["method"])]
    if not all("after" in r for r in results):  # evaluation switched off: the sweep only
        return "\n".join(sweep)
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
            lines.append(row(f"{method} (lr {_lr(chosen[method])})", runs, "after",
                             f"{statistics.mean(r['train_minutes'] for r in runs):.1f}"))
    return "\n".join(sweep + [""] + lines)


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
    parser.add_argument("--lrs", type=float, nargs="+", default=None,
                        help="learning rates to sweep per method (default: each preset's own train.lr)")
    parser.add_argument("--select-last", type=int, default=3,
                        help="choose each method's lr by its mean training reward over this many last "
                             "stages (default: %(default)s)")
    parser.add_argument("--table-only", action="store_true",
                        help="print the table of OUT/results.json again without running anything")
    args, extra = parser.parse_known_args()
    out = Path(args.out)
    if args.table_only:
        if not (out / "results.json").is_file():
            parser.error(f"--table-only: no {out / 'results.json'}; run the comparison first (or give --out)")
        print(summarise(json.loads((out / "results.json").read_text()), args.select_last))
        return
    if args.select_last < 1:
        parser.error(f"--select-last: got {args.select_last}, expected an integer >= 1")
    results = []
    for seed in args.seeds:
        for method in args.methods:
            for lr in args.lrs or [None]:
                results.append(run_one(method, seed, out, extra, lr))
                atomic_write_text(out / "results.json", json.dumps(results, indent=1))
    table = summarise(results, args.select_last)
    atomic_write_text(out / "results.md", table + "\n")
    print(table)


if __name__ == "__main__":
    main()
