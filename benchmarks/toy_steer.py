"""At equal UNet evaluations, does FK steering (N = 4) beat best-of-4 and plain sampling on held-out
toy alignment, and FK on a B²-trained LoRA either alone? Paired by seed.

Per seed: the held-out prompts (each toy template's test split, ``--max-prompts`` per template,
spread evenly; ``--split train``: training prompts, to choose ``steer.lam`` and ``steer.potential``
without looking at held-out ones), each at ``--images-per-prompt`` image seeds (prompt-seeds), the toy
model and sampling of ``--preset`` (``toy_ddim``: 20 DDIM steps, CFG 5, eta 1; ``default``: the 4-step
toy LCM; overrides as ``--section.field VALUE``), the exact ``toy_align``. Methods:

- ``plain``: one sample per prompt-seed, the first of 4 independent samples; ``toy_align_mean4``
  is the mean over the 4 (the expected single-sample score, with less noise);
- ``best-of-4``: the highest toy_align of the same 4 samples;
- ``fk``: FK steering by toy_align, N = 4 particles, the ``steer`` defaults (λ 10, diff, schedule,
  SMC weights), its best particle; ``fk-adaptive``: the same with ``steer.resample adaptive`` (same
  noise and resampling generators: common random numbers).

``--lora RUN`` adds the same methods on the run's LoRA (``lora-plain``, …; same seeds); ``--lora RUN0
RUN1 …`` one run per seed, so that the seeds are independent training runs too. Per seed and
method a row's ``toy_align`` is the mean over the three templates of each template's mean over its
prompt-seeds (as the evaluator reports), ``success`` likewise for toy_align >= 1. ``unet_evals``: rows
through the denoising network per prompt-seed, counted by a hook (CFG's two halves count 2):
best-of-4 and FK make the same, plain a quarter. ``reward_calls``: images a method scores to pick
its output, per prompt-seed (plain 0, best-of-4 4, FK 4 × potential steps; the final evaluation
not counted). Writes ``OUT/toy_steer.jsonl`` (appended, a line per seed × method; the last line of
a seed and method counts) and ``OUT/toy_steer.md``: per method the mean over seeds with a 95%
t-interval over seeds, then paired differences by seed (fk − best-of-4, fk − plain with plain's
mean of 4, lora-fk − fk, …)::

    python benchmarks/toy_steer.py --seeds 0 1 2 3 4 --out runs/toy_steer
    python benchmarks/toy_steer.py --seeds 0 1 2 3 4 --lora runs/toy_ddim --out runs/toy_steer_lora
    python benchmarks/toy_steer.py --preset default --lora runs/default --out runs/toy_steer_lcm
    python benchmarks/toy_steer.py --preset default --seeds 0 1 --lora runs/s0 runs/s1 --out runs/toy_steer_runs
    python benchmarks/toy_steer.py --table-only --out runs/toy_steer
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from toy_compare import mean_ci  # noqa: E402  (benchmarks/ is not a package)

from b2fast.utils import atomic_write_text  # noqa: E402

N = 4  # best-of-N samples = FK particles
TEMPLATES = ("toy_attribute", "toy_two_object", "toy_spatial")
ORDER = ("plain", "best-of-4", "fk", "fk-adaptive")
COMPARISONS = [(p + a, p + b, key) for p in ("", "lora-") for a in ("fk", "fk-adaptive")
               for b, key in (("best-of-4", "toy_align"), ("plain", "toy_align_mean4"))] + \
              [("lora-fk", "fk", "toy_align"), ("lora-fk-adaptive", "fk-adaptive", "toy_align")]


def noise_seed(seed: int, unit: int, j: int) -> int:
    """Generator seed of sample j (0..3 independent, 4 FK) of prompt-seed ``unit`` at ``seed``."""
    return (seed * 1_000_003 + unit) * 8 + j


def make_config(overrides: list[str], preset: str = "toy_ddim"):
    from b2fast.config import apply_overrides, load_yaml, validate

    cfg = apply_overrides(load_yaml(preset), overrides)
    cfg.reward.name, cfg.reward.options, cfg.steer.kind, cfg.steer.particles = "toy_align", {}, "fk", N
    return validate(cfg, training=False)


def load_models(cfg, lora_paths: list[str | None]) -> dict:
    """{LoRA path: [(method prefix, policy, scored reward)]}: the base model (loaded once, shared by
    every entry), then that run's LoRA (its run's model section); None: the base model alone."""
    from b2fast.config import Config, apply_dict
    from b2fast.run.folders import resolve_lora, run_config
    from b2fast.sample import load

    policy, scored = load(cfg, None)
    models = {}
    for lora_path in dict.fromkeys(lora_paths):
        models[lora_path] = [("", policy, scored)]
        if lora_path:
            lora = resolve_lora(lora_path)
            run = run_config(lora)
            lora_cfg = copy.deepcopy(cfg)
            if run:
                lora_cfg.model = apply_dict(Config(), run).model
            if lora_cfg.model.path != cfg.model.path:
                raise ValueError(f"--lora: the run trained {lora_cfg.model.path!r}, not {cfg.model.path!r}")
            models[lora_path].append(("lora-", load(lora_cfg, lora)[0], scored))
    return models


class Counter:
    """Rows through the UNet (hook) and images through the reward while ``counting``."""

    def __init__(self, policy, scored):
        self.unet = self.reward = 0
        self.scored = scored
        self.handle = policy.unet.register_forward_pre_hook(self._rows)

    def _rows(self, module, args):
        self.unet += args[0].shape[0]

    def __call__(self, images, prompts):
        self.reward += len(images)
        return self.scored(images, prompts)


def run_seed(policy, scored, cfg, units: list[tuple[str, str]], seed: int, batch: int) -> list[dict]:
    """The four methods' rows of one seed (``units``: (template, prompt) per prompt-seed)."""
    from b2fast.core.steering import fk_sample
    from b2fast.sample import plain_sample, resample_seed

    count, n_units, rows = Counter(policy, scored), len(units), []
    try:
        start = time.perf_counter()
        indep = []  # (units, N) toy_align of the independent samples
        per = max(1, batch // N)
        for lo in range(0, n_units, per):
            chunk = range(lo, min(lo + per, n_units))
            texts = [units[u][1] for u in chunk for _ in range(N)]
            gens = [torch.Generator(policy.device).manual_seed(noise_seed(seed, u, j)) for u in chunk for j in range(N)]
            images = plain_sample(policy, texts, cfg.sampling, gens)
            indep.append(scored(images, texts).double().view(-1, N))
        indep = torch.cat(indep)
        unet, seconds = count.unet / n_units, time.perf_counter() - start  # plain: 1 of the N samples, 1/N of this
        rows.append(summary("plain", indep[:, 0], units, unet / N, 0, seconds / N,
                            toy_align_mean4=balanced(indep.mean(dim=1), units)[0]))
        rows.append(summary("best-of-4", indep.max(dim=1).values, units, unet, N, seconds))
        for name, resample in (("fk", cfg.steer.resample), ("fk-adaptive", "adaptive")):
            steer = dataclasses.replace(cfg.steer, resample=resample)
            count.unet = count.reward = 0
            start, best, means, resampled = time.perf_counter(), [], [], []
            for lo in range(0, n_units, per):
                chunk = range(lo, min(lo + per, n_units))
                seeds = [noise_seed(seed, u, N) for u in chunk]
                result = fk_sample(policy, [units[u][1] for u in chunk], cfg.sampling, steer, count,
                                   [torch.Generator(policy.device).manual_seed(s) for s in seeds],
                                   [torch.Generator().manual_seed(resample_seed(s)) for s in seeds])
                best.append(result.best()[1])
                means.append(result.rewards.view(-1, N).nanmean(dim=1))
                resampled += [sum(h["resampled"][g] for h in result.history) for g in range(len(chunk))]
            rows.append(summary(name, torch.cat(best), units, count.unet / n_units, count.reward / n_units,
                                time.perf_counter() - start, particle_mean=balanced(torch.cat(means), units)[0],
                                resamplings=statistics.mean(resampled)))
    finally:
        count.handle.remove()
    return rows


def balanced(scores: torch.Tensor, units: list[tuple[str, str]]) -> tuple[float, dict]:
    """(mean over templates of each template's mean, {template: mean})."""
    per = {t: statistics.mean(float(s) for s, (tt, _) in zip(scores, units) if tt == t)
           for t in dict.fromkeys(t for t, _ in units)}
    return statistics.mean(per.values()), per


def summary(method, scores, units, unet, reward, seconds, **extra) -> dict:
    mean, per = balanced(scores, units)
    return {"method": method, "toy_align": mean, "success": balanced((scores >= 1).double(), units)[0],
            "per_template": per, "prompt_seeds": len(units), "unet_evals": unet, "reward_calls": reward,
            "seconds": seconds, **extra}


def by_seed(rows: list[dict], method: str, key: str = "toy_align") -> dict:
    return {r["seed"]: r[key] for r in rows if r["method"] == method and key in r}  # the last line wins


def values(rows: list[dict], method: str, key: str) -> str:
    return " / ".join(f"{v:g}" for v in sorted({r[key] for r in rows if r["method"] == method}))


def table(rows: list[dict]) -> str:
    methods = sorted({r["method"] for r in rows},
                     key=lambda m: (m.startswith("lora-"), ORDER.index(m.removeprefix("lora-"))
                                    if m.removeprefix("lora-") in ORDER else len(ORDER), m))
    lines = ["| method | seeds | toy_align, mean [95% CI] | success, mean | UNet evals / prompt-seed | "
             "reward calls / prompt-seed |", "|---|---|---|---|---|---|"]
    for m in methods:
        for label, key in ((m, "toy_align"),) + (((f"{m}, mean of 4", "toy_align_mean4"),)
                                                 if m.endswith("plain") else ()):
            v = by_seed(rows, m, key)
            mean, lo, hi = mean_ci(v.values())
            success = statistics.mean(by_seed(rows, m, "success").values()) if key == "toy_align" else None
            lines.append(f"| {label} | {len(v)} | {mean:.4f} [{lo:.4f}, {hi:.4f}] | "
                         f"{'-' if success is None else f'{success:.3f}'} | {values(rows, m, 'unet_evals')} | "
                         f"{values(rows, m, 'reward_calls')} |")
    lines += ["", "| difference, paired by seed | seeds | mean [95% CI] | verdict |", "|---|---|---|---|"]
    for a, b, key in COMPARISONS:
        va, vb = by_seed(rows, a), by_seed(rows, b, key)
        common = sorted(set(va) & set(vb))
        if not common:
            continue
        mean, lo, hi = mean_ci(va[s] - vb[s] for s in common)
        verdict = f"{a} better" if lo > 0 else f"{b} better" if hi < 0 else "within noise" if math.isfinite(hi) else "-"
        label = f"{a} − {b}" + (" (mean of 4)" if key == "toy_align_mean4" else "")
        lines.append(f"| {label} | {len(common)} | {mean:+.4f} [{lo:+.4f}, {hi:+.4f}] | {verdict} |")
    return "\n".join(lines)


def add_run_arguments(parser: argparse.ArgumentParser, preset: str) -> None:
    """The options shared with toy_lookahead.py: seeds, prompts, preset, LoRA runs, batch."""
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--max-prompts", type=int, default=12, help="prompts per template, spread "
                                                                    "evenly (default: %(default)s)")
    parser.add_argument("--split", choices=("test", "train"), default="test",
                        help="prompt split: test (held-out, the measurement) or train (tuning) (default: %(default)s)")
    parser.add_argument("--images-per-prompt", type=int, default=2, help="prompt-seeds per prompt and seed "
                                                                         "(default: %(default)s)")
    parser.add_argument("--preset", default=preset, help="shipped preset (or YAML file) whose model and "
                        "sampling the methods use: toy_ddim (20 DDIM steps) or default (the 4-step toy LCM) "
                        "(default: %(default)s)")
    parser.add_argument("--lora", metavar="RUN", nargs="+", help="also the methods on this run's LoRA "
                        "(prefix lora-); several runs: one per seed, in --seeds order (independent training runs)")
    parser.add_argument("--batch", type=int, default=64, help="images per sampling call (default: %(default)s)")


def prepare(parser: argparse.ArgumentParser, args, overrides: list[str]) -> tuple:
    """(config, models by LoRA, LoRA run per seed, prompt-seeds as (template, prompt)); a bad option,
    config, model or LoRA ends the program with one line before any sampling."""
    from b2fast.eval.evaluator import pick_prompts
    from b2fast.prompts import load_prompts

    if min(args.max_prompts, args.images_per_prompt, args.batch) < 1:
        parser.error("--max-prompts, --images-per-prompt and --batch must be >= 1")
    loras = args.lora or [None]
    if len(loras) not in (1, len(args.seeds)):
        parser.error(f"--lora: give one run, or one per seed ({len(args.seeds)}), not {len(loras)}")
    loras = loras * len(args.seeds) if len(loras) == 1 else loras
    try:
        cfg = make_config(overrides, args.preset)
        models = load_models(cfg, loras)  # every LoRA checked before any run
    except ValueError as exc:  # config, model or LoRA: one line
        parser.error(str(exc))
    units = [(t, p) for t in TEMPLATES for p in pick_prompts(load_prompts(t, args.split), args.max_prompts)
             for _ in range(args.images_per_prompt)]
    return cfg, models, loras, units


def each_model(args, models: dict, loras: list):
    """(seed, model name "base" or "lora", its LoRA run or None, policy, scored reward) for every seed
    and model of ``prepare``'s result, in order."""
    for seed, lora in zip(args.seeds, loras):
        for prefix, policy, scored in models[lora]:
            yield seed, prefix.rstrip("-") or "base", lora if prefix else None, policy, scored


def parse_args(doc: str, name: str, preset: str, argv: list[str] | None) -> tuple:
    """(parser, args, overrides, OUT/NAME.jsonl) of a script with the shared options, --out and --table-only."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="any other --section.field VALUE overrides the preset")
    add_run_arguments(parser, preset=preset)
    parser.add_argument("--out", default=f"runs/{name}")
    parser.add_argument("--table-only", action="store_true", help=f"print the table of OUT/{name}.jsonl")
    args, overrides = parser.parse_known_args(argv)
    return parser, args, overrides, Path(args.out) / f"{name}.jsonl"


def write_table(parser: argparse.ArgumentParser, log: Path, make_table) -> None:
    """Print ``make_table`` of the log's rows and write it beside the log as NAME.md."""
    if not log.is_file():
        parser.error(f"no {log}; run without --table-only first")
    text = make_table([json.loads(line) for line in log.read_text().splitlines() if line.strip()])
    atomic_write_text(log.with_suffix(".md"), text + "\n")
    print(text)


def main(argv: list[str] | None = None) -> None:
    parser, args, overrides, log = parse_args(__doc__, "toy_steer", "toy_ddim", argv)
    if not args.table_only:
        cfg, models, loras, units = prepare(parser, args, overrides)
        log.parent.mkdir(parents=True, exist_ok=True)
        for seed, model, lora, policy, scored in each_model(args, models, loras):
            prefix = "" if model == "base" else "lora-"
            for row in run_seed(policy, scored, cfg, units, seed, args.batch):
                row = {"seed": seed, **row, "method": prefix + row["method"], "lora": lora, "split": args.split,
                       "num_steps": cfg.sampling.num_steps, "steer": dataclasses.asdict(cfg.steer)}
                with log.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(f"seed {seed} {row['method']}: toy_align {row['toy_align']:.4f} ({row['seconds']:.1f} s)",
                      file=sys.stderr, flush=True)
    write_table(parser, log, table)


if __name__ == "__main__":
    main()
