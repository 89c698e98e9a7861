"""Does one stage's gradient point anywhere? Cross-stage consistency of the policy gradient.

A stage's update follows the gradient of its loss, estimated from the stage's samples:
g_s = g + n_s, the expected gradient g plus the noise n_s of that stage's draw. Independent
stages share g and not n_s, so at *fixed* weights

    consistency = mean over stage pairs s ≠ s' of g_s·g_s'  ÷  mean over stages of ‖g_s‖²
                = ‖g‖² / (‖g‖² + E‖n‖²)

is the share of a stage gradient's squared length that is signal (the expected cosine between
two stages' gradients). From it, the stage's signal-to-noise ratio SNR = ‖g‖ / √E‖n‖² and
``stages_per_unit_snr`` = 1 / SNR², the number of stages whose summed gradients have as much
signal as noise: an optimiser needs at least that many stages before its steps add up to more
than a random walk. Each stage is sampled by ``Trainer.sample_stage`` and selected as a run
would; its gradient is the one ``policy_update`` computes (one step over every kept unit, one
epoch), recorded instead of applied, so the weights never move. The same stage's selection with
its advantages shuffled (``selection.null_control shuffle``) gives the null control's gradient:
the null's consistency is what moving along *any* advantage-weighted direction shares across
stages (e.g. a term that does not depend on the rewards).

Uncertainty: a jackknife over stages (leave one out), so the ± is a standard error.

    python benchmarks/toy_grad_snr.py --stages 8 --name default
    python benchmarks/toy_grad_snr.py --stages 8 --name dro-unpaired --train.objective dro_unpaired

Writes ``OUT/grad_snr.jsonl`` (appended, one row per invocation) and prints the table of all rows.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shlex
import shutil
import sys
from pathlib import Path

import torch

from b2fast.config import apply_overrides, load_yaml, validate
from b2fast.core.selection import normalize_and_select, null_control
from b2fast.core.update import policy_update
from b2fast.run.trainer import Trainer, stage_generator
from b2fast.config import presets_dir


class GradientRecorder(torch.optim.Optimizer):
    """An optimizer whose ``step`` stores the flattened gradient and leaves the weights alone."""

    def __init__(self, params):
        super().__init__(list(params), {})
        self.gradient: torch.Tensor | None = None

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p.grad if p.grad is not None else torch.zeros_like(p)
                 for group in self.param_groups for p in group["params"]]
        flat = torch.cat([g.flatten().float() for g in grads]).cpu()
        self.gradient = flat if self.gradient is None else self.gradient + flat


def stage_gradient(trainer: Trainer, batch, selection, stage: int) -> torch.Tensor:
    """(P,) the gradient of the stage's loss at the current weights: every kept unit in one
    optimizer step of one epoch, as ``policy_update`` computes it (zeros if nothing is kept)."""
    params = trainer.policy.lora_parameters()
    recorder = GradientRecorder(params)
    tcfg = dataclasses.replace(trainer.cfg.train, optimizer="adamw", max_grad_norm=0.0, epochs=1,
                               trajectories_per_step=max(1, len(batch)))
    policy_update(trainer.policy, recorder, batch, selection, tcfg, trainer.cfg.sampling,
                  stage_generator(trainer.cfg.seed, stage, "shuffle"))
    if recorder.gradient is None:
        return torch.zeros(sum(p.numel() for p in params))
    return recorder.gradient


def _consistency(grads: torch.Tensor) -> float:
    dots = grads.double() @ grads.double().T
    m = grads.shape[0]
    mean_norm2 = float(dots.diag().mean())
    if m < 2 or mean_norm2 == 0:
        return math.nan
    return float((dots.sum() - dots.diag().sum()) / (m * (m - 1))) / mean_norm2


def consistency(grads: torch.Tensor) -> dict:
    """(M, P) gradients of M independent stages → consistency, its jackknife standard error,
    SNR and ``stages_per_unit_snr`` (NaN where undefined; SNR 0 when consistency ≤ 0)."""
    m = grads.shape[0]
    c = _consistency(grads)
    if m > 2:
        loo = torch.tensor([_consistency(torch.cat([grads[:i], grads[i + 1:]])) for i in range(m)], dtype=torch.float64)
        se = float(((m - 1) / m * ((loo - loo.mean()) ** 2).sum()).sqrt())
    else:
        se = math.nan
    snr = math.sqrt(c / (1 - c)) if 0 < c < 1 else (0.0 if c <= 0 else math.inf)
    return {"consistency": c, "se": se, "snr": snr, "stages_per_unit_snr": 1 / snr ** 2 if snr > 0 else math.inf}


def measure_config(overrides: list[str], stages: int, out: Path):
    """The validated config of the measurement (a bad override: a one-line ValueError)."""
    cfg = load_yaml(presets_dir() / "toy_ddim.yaml")
    apply_overrides(cfg, ["--out", str(out), "--schedule.num_stages", str(max(stages, 1)), "--eval.enabled", "false",
                          "--log.progress", "false", "--log.grid_every", "0", "--log.samples", "false", *overrides])
    return validate(cfg)


def measure(overrides: list[str], stages: int, out: Path, interval: int | None = None) -> dict:
    """Sample ``stages`` stages at the starting weights; each stage's signal and null gradients."""
    cfg = measure_config(overrides, stages, out)
    shutil.rmtree(out, ignore_errors=True)
    trainer = Trainer(cfg)
    length = interval or trainer.interval_len(0)
    signal, null, kept, rewards = [], [], [], []
    for stage in range(stages):
        batch, table = trainer.sample_stage(stage, length)
        _, selection = normalize_and_select(trainer.history, cfg.selection, table.prompts, table.rewards,
                                            table.group_ids)
        signal.append(stage_gradient(trainer, batch, selection, stage))
        shuffled = null_control(selection, "shuffle", stage_generator(cfg.seed, stage, "null"))
        null.append(stage_gradient(trainer, batch, shuffled, stage))
        kept.append(len(selection))
        rewards.append(float(table.rewards.nanmean()))
        print(f"stage {stage}: reward {rewards[-1]:.3f}, kept {kept[-1]}", file=sys.stderr, flush=True)
    s, n = torch.stack(signal), torch.stack(null)
    mean_s, mean_n = s.mean(0), n.mean(0)
    cos = float(torch.nn.functional.cosine_similarity(mean_s, mean_n, dim=0)) if mean_s.any() and mean_n.any() else math.nan
    return {"stages": stages, "interval": length, "images_per_stage": len(table), "parameters": s.shape[1],
            "kept_mean": sum(kept) / len(kept), "reward_mean": sum(rewards) / len(rewards),
            "signal": consistency(s), "null": consistency(n), "cos_signal_null_means": cos,
            "grad_norm": float(s.norm(dim=1).mean()), "null_grad_norm": float(n.norm(dim=1).mean())}


def table(rows: list[dict]) -> str:
    def c(d):
        return f"{d['consistency']:+.4f} ± {d['se']:.4f}"

    lines = ["| name | stages × images | params | kept | consistency ± se | SNR | stages for SNR 1 | "
             "null's consistency ± se |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        sig = r["signal"]
        lines.append(f"| {r['name']} | {r['stages']} × {r['images_per_stage']} | {r['parameters']} | "
                     f"{r['kept_mean']:.0f} | {c(sig)} | {sig['snr']:.3f} | {sig['stages_per_unit_snr']:.0f} | "
                     f"{c(r['null'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--stages", type=int, default=8, help="independent stages sampled (default: %(default)s)")
    parser.add_argument("--interval", type=int, default=None,
                        help="trained interval L of every stage (default: the schedule's first, schedule.min_interval)")
    parser.add_argument("--name", default="default", help="row label (default: %(default)s)")
    parser.add_argument("--out", default="runs/grad_snr")
    parser.add_argument("--table-only", action="store_true", help="print the table of OUT/grad_snr.jsonl")
    args, overrides = parser.parse_known_args(argv)
    out = Path(args.out)
    log = out / "grad_snr.jsonl"
    if args.stages < 3:
        parser.error(f"--stages must be >= 3 (a jackknife over stages), got {args.stages}")
    if not args.table_only:
        try:  # before anything is written
            measure_config(overrides, args.stages, out / "scratch")
        except ValueError as exc:
            parser.error(str(exc))
        out.mkdir(parents=True, exist_ok=True)
        row = {"name": args.name, "overrides": shlex.join(overrides),
               **measure(overrides, args.stages, out / "scratch", args.interval)}
        shutil.rmtree(out / "scratch", ignore_errors=True)
        with log.open("a") as f:
            f.write(json.dumps(row) + "\n")
    if not log.is_file():
        parser.error(f"no {log}; run without --table-only first")
    print(table([json.loads(line) for line in log.read_text().splitlines() if line.strip()]))


if __name__ == "__main__":
    main()
