"""How much does one stage's update (or a few stages') raise the reward it is trained on?
Common random numbers.

For each seed: one toy stage, or ``--stages`` of them (``--prompt``, the ``--reward`` ladder
rung, the ``toy_ddim`` preset with each variant's overrides) is sampled and trained by
``Trainer.run_stage``; the reward of
``--images`` images of the prompt is measured before and after the update from the *same*
starting noises, so the per-image differences are paired and their mean has a small standard
error. Every variant of a seed samples the same stage (same seed, same starting weights), so
variants are paired too. Each variant is also run with ``--selection.null_control shuffle``
(advantages permuted among the kept samples: same samples, same step length, no signal) when
``--null`` is given. Writes ``OUT/one_stage.jsonl`` (appended) and prints a Markdown table:
mean gain over seeds with its 95% t-interval, and each variant's paired difference to its null::

    python benchmarks/toy_one_stage.py --seeds 0 1 2 3 4 --null --out runs/one_stage
"""
from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from toy_compare import mean_ci  # noqa: E402  (benchmarks/ is not a package)

from b2fast.config import apply_overrides, load_yaml, validate  # noqa: E402
from b2fast.core.sampling import generate  # noqa: E402
from b2fast.rewards import build_reward  # noqa: E402
from b2fast.run.trainer import Trainer  # noqa: E402
from b2fast.config import presets_dir  # noqa: E402
from b2fast.utils import atomic_write_text  # noqa: E402

ONE_STEP = "--train.trajectories_per_step 4096 --train.epochs 1"
VARIANTS = {  # name → overrides of the toy_ddim preset
    "adamw-default": "",
    "adamw-one-step": ONE_STEP,
    "nsgd": f"--train.optimizer nsgd --train.lr 3 {ONE_STEP}",
    "nsgd-gain4": f"--train.optimizer nsgd --train.lr 3 --train.max_step_gain 4 {ONE_STEP}",
    # for several stages on one prompt: no history (a stage below the window's mean keeps only
    # negatives) and shorter steps (a random step's reward change grows with its length squared,
    # the signal's linearly); with or without momentum averaging the directions over stages
    "nsgd-gain4-h0": f"--train.optimizer nsgd --train.lr 1 --train.max_step_gain 4 --selection.history_stages 0 "
                     f"{ONE_STEP}",
    "nsgd-gain4-h0-short": f"--train.optimizer nsgd --train.lr 0.5 --train.max_step_gain 4 "
                           f"--selection.history_stages 0 {ONE_STEP}",
    "nsgd-gain4-h0-mom": f"--train.optimizer nsgd --train.lr 1 --train.momentum 0.8 --train.max_step_gain 4 "
                         f"--selection.history_stages 0 {ONE_STEP}",
}


def stage_config(seed: int, overrides: list[str], prompt_file: Path, reward: str, batches: int, out: Path,
                 stages: int = 1):
    """The validated config of one measurement (a bad override: a one-line ValueError)."""
    cfg = load_yaml(presets_dir() / "toy_ddim.yaml")
    apply_overrides(cfg, ["--out", str(out), "--seed", str(seed), "--prompts.source", str(prompt_file),
                          "--reward.name", reward, "--sampling.batches_per_stage", str(batches),
                          "--schedule.num_stages", str(stages), "--eval.enabled", "false", "--log.progress", "false",
                          "--log.grid_every", "0", "--log.samples", "false", *overrides])
    return validate(cfg)


def one_stage(seed: int, overrides: list[str], prompt_file: Path, reward: str, batches: int,
              images: int, out: Path, stages: int = 1) -> dict:
    cfg = stage_config(seed, overrides, prompt_file, reward, batches, out, stages)
    shutil.rmtree(out, ignore_errors=True)
    trainer = Trainer(cfg)
    prompt = prompt_file.read_text().strip()

    def rewards() -> torch.Tensor:
        x = generate(trainer.policy, [prompt] * images, cfg.sampling, torch.Generator().manual_seed(10_000 + seed))
        return trainer.reward(x, [prompt] * images).float()

    before = rewards()
    records = [trainer.run_stage(stage) for stage in range(stages)]
    gain = rewards() - before
    return {"seed": seed, "stages": stages, "gain": gain.mean().item(), "se": gain.std().item() / images ** 0.5,
            "kept": sum(r["n_selected"] for r in records), "images_trained": sum(r["n_images"] for r in records),
            "stage_rewards": [r["reward_mean"] for r in records]}


def table(rows: list[dict]) -> str:
    lines = ["| variant | seeds | gain, mean [95% CI] | null's gain | variant − null, paired [95% CI] |",
             "|---|---|---|---|---|"]
    by = {}
    for r in rows:
        by.setdefault(r["variant"], {})[r["seed"]] = r["gain"]
    for name, gains in by.items():
        if name.endswith("+null"):
            continue
        m, lo, hi = mean_ci(gains.values())
        null = by.get(name + "+null", {})
        common = sorted(set(gains) & set(null))
        cell = "-"
        null_cell = "-"
        if common:
            nm, nlo, nhi = mean_ci(null[s] for s in common)
            dm, dlo, dhi = mean_ci(gains[s] - null[s] for s in common)
            null_cell = f"{nm:+.4f} [{nlo:+.4f}, {nhi:+.4f}]"
            cell = f"{dm:+.4f} [{dlo:+.4f}, {dhi:+.4f}]"
        lines.append(f"| {name} | {len(gains)} | {m:+.4f} [{lo:+.4f}, {hi:+.4f}] | {null_cell} | {cell} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="variants: " + "; ".join(f"{k} = [{v}]" for k, v in VARIANTS.items()))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--null", action="store_true", help="also run each variant with shuffled advantages")
    parser.add_argument("--prompt", default="a red circle", help="the one training prompt (default: %(default)s)")
    parser.add_argument("--reward", default="toy_colour_fill", help="reward name (default: %(default)s)")
    parser.add_argument("--batches", type=int, default=8, help="sampling batches of the stage (8 × 8 prompts × 4 "
                                                              "branches = 256 images; default: %(default)s)")
    parser.add_argument("--stages", type=int, default=1, help="stages trained between the two measurements "
                                                            "(default: %(default)s)")
    parser.add_argument("--images", type=int, default=128, help="images measured before and after (default: %(default)s)")
    parser.add_argument("--out", default="runs/one_stage")
    parser.add_argument("--table-only", action="store_true", help="print the table of OUT/one_stage.jsonl")
    args = parser.parse_args(argv)
    out = Path(args.out)
    log = out / "one_stage.jsonl"
    if args.stages < 1:
        parser.error(f"--stages must be >= 1, got {args.stages}")
    if not args.table_only:
        try:  # every variant's config and the reward, before anything is written
            build_reward(args.reward)
            for name in args.variants:
                stage_config(0, shlex.split(VARIANTS[name]), out / "prompt.txt", args.reward, args.batches, out)
        except ValueError as exc:
            parser.error(str(exc))
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "prompt.txt", args.prompt + "\n")
        for seed in args.seeds:
            for name in args.variants:
                for null in ([False, True] if args.null else [False]):
                    extra = shlex.split(VARIANTS[name]) + (["--selection.null_control", "shuffle"] if null else [])
                    row = one_stage(seed, extra, out / "prompt.txt", args.reward, args.batches, args.images,
                                    out / "scratch", args.stages)
                    row["variant"] = name + ("+null" if null else "")
                    with log.open("a") as f:
                        f.write(json.dumps(row) + "\n")
                    print(json.dumps(row), file=sys.stderr, flush=True)
    if not log.is_file():
        parser.error(f"no {log}; run without --table-only first")
    print(table([json.loads(line) for line in log.read_text().splitlines() if line.strip()]))


if __name__ == "__main__":
    main()
