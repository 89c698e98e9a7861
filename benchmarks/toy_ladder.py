"""How fast does the toy policy climb each rung of the reward ladder (b2fast/toy/ladder.py)?

For every rung (reward + prompt set) and seed it runs a toy preset of ``python -m b2fast.train``
(``--preset``: ``toy_ddim`` = B²-DiffuRL on the 20-step DDIM policy, ``toy_ddpo`` = DDPO) with
that reward and prompts, evaluation off, and records the stage reward against the number of
**reward queries** (images scored), the x-axis every method shares. Any config field can be
varied for all runs (``--train.lr 3e-3 --model.lora_targets ...``), so one invocation is one
point of a sweep; ``--name`` labels it. Writes ``ladder.json`` (appended per name, so several
invocations build one table), a Markdown table and ``ladder.png``::

    python benchmarks/toy_ladder.py --rungs brightness colour_fill --stages 8 --seeds 0 1 \\
        --name lr1e-2 --out runs/ladder --train.lr 1e-2

Gain = mean stage reward of the last two stages minus that of the first two, with its spread
over seeds; the first stage's reward is the base model's (it samples before the first update).
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

from b2fast.config import ConfigError, apply_overrides, load_yaml, validate
from b2fast.run.trainer import Trainer
from b2fast.toy.ladder import RUNGS
from b2fast.utils import atomic_write, atomic_write_text


def rung_config(rung: str, seed: int, stages: int, out: Path, overrides: list[str], preset: str = "toy_ddim"):
    """The validated config of one rung's run (a bad override or preset: a one-line ValueError)."""
    reward, source = RUNGS[rung]
    try:
        cfg = load_yaml(preset)
    except ConfigError as exc:
        raise ConfigError(str(exc).replace("--config:", "--preset:", 1)) from None
    apply_overrides(cfg, ["--reward.name", reward, "--prompts.source", source, "--seed", str(seed),
                          "--schedule.num_stages", str(stages), "--eval.enabled", "false",
                          "--log.grid_every", "0", "--log.progress", "false", "--log.samples", "false",
                          "--out", str(out), *overrides])
    return validate(cfg)


def run_rung(rung: str, seed: int, stages: int, out: Path, overrides: list[str],
             preset: str = "toy_ddim") -> list[dict]:
    cfg = rung_config(rung, seed, stages, out, overrides, preset)
    shutil.rmtree(cfg.out, ignore_errors=True)  # the script's own scratch folder
    records = Trainer(cfg).run()
    queries, curve = 0, []
    for r in records:
        queries += r["n_images"]
        curve.append({"stage": r["stage"], "queries": queries, "reward": r["reward_mean"],
                      "approx_kl": r.get("approx_kl"), "kept": r["n_selected"], "interval": r["interval_len"]})
    return curve


def gain(curve: list[dict]) -> float:
    first = statistics.mean(c["reward"] for c in curve[:2])
    last = statistics.mean(c["reward"] for c in curve[-2:])
    return last - first


def table(results: dict) -> str:
    lines = ["| variant | rung | seeds | first 2 stages | last 2 stages | gain (mean ± sd) | mean approx-KL |",
             "|---|---|---|---|---|---|---|"]
    for name, rungs in results.items():
        for rung, seeds in rungs.items():
            curves = list(seeds.values())
            gains = [gain(c) for c in curves]
            first = statistics.mean(statistics.mean(c["reward"] for c in cur[:2]) for cur in curves)
            last = statistics.mean(statistics.mean(c["reward"] for c in cur[-2:]) for cur in curves)
            kls = [c["approx_kl"] for cur in curves for c in cur if c["approx_kl"] is not None]
            sd = statistics.stdev(gains) if len(gains) > 1 else 0.0
            lines.append(f"| {name} | {rung} | {len(curves)} | {first:.3f} | {last:.3f} | "
                         f"{statistics.mean(gains):+.3f} ± {sd:.3f} | "
                         f"{statistics.mean(kls) if kls else float('nan'):.2e} |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rungs = sorted({r for v in results.values() for r in v}, key=list(RUNGS).index)
    fig, axes = plt.subplots(1, len(rungs), figsize=(4 * len(rungs), 3.2), squeeze=False)
    for ax, rung in zip(axes[0], rungs):
        for name, by_rung in results.items():
            for i, curve in enumerate(by_rung.get(rung, {}).values()):
                ax.plot([c["queries"] for c in curve], [c["reward"] for c in curve], marker=".",
                        color=f"C{list(results).index(name)}", alpha=0.8, label=name if i == 0 else None)
        ax.set_title(rung)
        ax.set_xlabel("reward queries")
        ax.set_ylabel(RUNGS[rung][0])
        ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/toy_ladder.py", description=__doc__.split("\n\n")[0],
                                epilog="Other --section.field value options go to every run.")
    p.add_argument("--rungs", nargs="+", default=list(RUNGS), choices=list(RUNGS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--stages", type=int, default=8)
    p.add_argument("--name", default="default", help="label of this variant in the table")
    p.add_argument("--preset", default="toy_ddim", help="shipped preset the runs start from, e.g. toy_ddpo")
    p.add_argument("--out", default="runs/ladder")
    args, overrides = p.parse_known_args(argv)
    out = Path(args.out)
    try:  # every run's config, before anything is written
        for rung in args.rungs:
            rung_config(rung, args.seeds[0], args.stages, out / "scratch", overrides, args.preset)
    except ValueError as exc:
        p.error(str(exc))
    store = out / "ladder.json"
    results = json.loads(store.read_text()) if store.is_file() else {}
    results[args.name] = {}
    for rung in args.rungs:
        results[args.name][rung] = {}
        for seed in args.seeds:
            curve = run_rung(rung, seed, args.stages, out / "scratch", overrides, args.preset)
            results[args.name][rung][str(seed)] = curve
            print(f"{args.name} {rung} seed {seed}: " + " ".join(f"{c['reward']:.3f}" for c in curve),
                  file=sys.stderr, flush=True)
            atomic_write_text(store, json.dumps(results, indent=1))
    report = table(results)
    atomic_write_text(out / "ladder.md", report + "\n")
    plot(results, out / "ladder.png")
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
