"""B²-DiffuRL vs plain DDPO and the other objectives on the toy world, the paper's comparison at toy scale.

Every method starts from the same pretrained toy model, sees the same prompts (balanced over the
three templates), the same number of reward queries per stage (128 images) and runs the same
number of stages:

- **B2-DiffuRL** (preset ``toy_ddim``, ``train.objective: ppo``), the reference: trunk + 4
  branches per prompt, backward progressive interval 14 → 20 of 20 steps, best/worst-branch
  selection with thresholds ±0.5, PPO-clip on the kept branches.
- **DDPO** (preset ``toy_ddpo``): 128 independent samples per stage (K = 1), the whole 20-step
  chain trained from the first stage, every sample kept, DDPO's per-prompt stat tracking
  (``selection.kind: ddpo``), PPO clip range 1e-4, one inner epoch.
- **D3PO**, **DRO**, **DRO-unpaired**, **Diffusion-DPO**: preset ``toy_ddim`` with
  ``train.objective`` ``d3po`` / ``dro`` / ``dro_unpaired`` / ``diffusion_dpo``
  (docs/algorithm.md, "Objectives"). They sample and select exactly as B2-DiffuRL does and train
  on the same B²-selected branches, only the loss differs: D3PO, DRO and Diffusion-DPO on each
  branch group's (best, worst) pair, DRO-unpaired on every kept branch (sign of its advantage).
- **B2-DiffuRL-LCM**: B2-DiffuRL on the toy LCM (``b2fast:toy-lcm``, 4 LCM steps, no CFG batch,
  interval 2 → 4 of which the last step is deterministic): the same images per stage at about a
  tenth of the stage time (README, "Latent consistency models").
- **B2-DiffuRL-null**: B2-DiffuRL with ``selection.null_control: shuffle`` (advantages permuted
  within each stage: the same update sizes, no signal), the control any "it learns" is paired
  with; give it B2-DiffuRL's chosen lr.

``--methods`` picks the methods (default: B2-DiffuRL and DDPO, the paper's comparison). A
method's config is its preset, then seed, out and lr, then the policy's overrides (``--policy
lcm``: every method on the toy LCM, e.g. the objectives at a tenth of the stage time), then the
overrides given to the script, then the method's own overrides (``METHODS``), so a method stays
what its name says.

``--lrs`` makes it a small learning-rate sweep: every method runs with every lr (and seed), and
per method the lr with the best mean *training* reward over the last ``--select-last`` stages
(mean over seeds; held-out prompts play no part) is chosen; the table reports the chosen runs.
For each run it records held-out (test-split) and train-split alignment after training, as mean
score / success rate / diversity over the three templates, and writes a Markdown table and the
raw JSON.

Learning curves, against the x-axis all methods share, cumulative **reward queries** (images
scored): per run the training (stage) reward after every stage, and held-out alignment of the
base model (0 queries) and of the LoRA of each ``--eval-stages`` checkpoint (default: the middle
and the last stage), evaluated as the trainer evaluates (``eval.*``: same prompts, images per
prompt and seeds; the last stage's point is the trainer's own evaluation after training). For
the chosen lrs, mean over seeds with a 95% Student-t interval over seeds; B2-DiffuRL − each other
method is paired by seed (all runs of a seed share the base model and the evaluation noise). Usage::

    python benchmarks/toy_compare.py --seeds 0 1 2 --lrs 3e-3 1e-2 3e-2 --out runs/toy_compare
    python benchmarks/toy_compare.py --seeds 0 1 2 --eval-stages 2 4 6 9 --out runs/toy_compare
    python benchmarks/toy_compare.py --methods B2-DiffuRL D3PO DRO Diffusion-DPO --out runs/toy_objectives
    python benchmarks/toy_compare.py --policy lcm --methods B2-DiffuRL D3PO DRO --lrs 1e-3 3e-3 --out runs/lcm_objectives
    python benchmarks/toy_compare.py --table-only --out runs/toy_compare   # tables and figure again

Writes to OUT: ``results.json`` (per run: ``stage_rewards`` and ``queries``, the cumulative
reward queries after each stage; ``eval_curve``, a list of {stage, queries, rows} with ``stage``
"before" for the base model and ``rows`` the EvalRow dicts; ``before``/``after``/``differences``
of the trainer's eval.json), ``results.md`` (lr sweep and alignment after training),
``curves.md`` (alignment per method and evaluated budget with 95% CIs over seeds, and per other
method the paired difference B2-DiffuRL − that method per budget, "within noise" where its CI
contains 0), ``curves.png`` (training reward | held-out score against reward queries, per method
the mean over seeds with a 95% t-band) and one run folder ``OUT/<method>[-lr<lr>]-seed<N>`` per
run (every stage's checkpoint kept).
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import shutil
import statistics
import time
from pathlib import Path

from b2fast.config import Config, apply_overrides, load_yaml, validate
from b2fast.eval.stats import PairedDifference, mean_ci, paired_difference
from b2fast.run.checkpoint import load_checkpoint
from b2fast.run.trainer import Trainer
from b2fast.config import presets_dir
from b2fast.utils import atomic_write, atomic_write_text, finite_json

# The toy LCM policy: 4 LCM steps, interval 2 -> 4 (the whole chain for a constant schedule).
LCM_POLICY = ["--model.path", "b2fast:toy-lcm", "--sampling.scheduler", "lcm", "--sampling.num_steps", "4",
              "--schedule.min_interval", "2", "--schedule.max_interval", "4"]
POLICIES = {"ddim": [], "lcm": LCM_POLICY}
# method -> (preset, its own overrides). The first is the reference of the paired differences.
METHODS = {
    "B2-DiffuRL": ("toy_ddim.yaml", []),
    "DDPO": ("toy_ddpo.yaml", []),
    "D3PO": ("toy_ddim.yaml", ["--train.objective", "d3po"]),
    "DRO": ("toy_ddim.yaml", ["--train.objective", "dro"]),
    "DRO-unpaired": ("toy_ddim.yaml", ["--train.objective", "dro_unpaired"]),
    "Diffusion-DPO": ("toy_ddim.yaml", ["--train.objective", "diffusion_dpo"]),
    "B2-DiffuRL-LCM": ("toy_ddim.yaml", LCM_POLICY),
    # B2-DiffuRL's null control: advantages shuffled within each stage (same update sizes, no signal)
    "B2-DiffuRL-null": ("toy_ddim.yaml", ["--selection.null_control", "shuffle"]),
}
REFERENCE = next(iter(METHODS))
# A method's own lr when --lrs is not given, where it differs from its preset's (chosen on training
# reward, never on held-out prompts: README, "Latent consistency models").
METHOD_LRS = {"B2-DiffuRL-LCM": 3e-3}
DEFAULT_METHODS = ["B2-DiffuRL", "DDPO"]  # the paper's comparison


def run_name(method: str, seed: int, lr: float | None) -> str:
    return f"{method}-seed{seed}" if lr is None else f"{method}-lr{lr:g}-seed{seed}"


def make_config(method: str, seed: int, out: Path, extra: list[str], lr: float | None = None,
                policy: str = "ddim") -> Config:
    """The run's config: the method's preset, then seed, out, lr, the policy's overrides
    (``POLICIES``), ``extra`` and the method's own overrides. With evaluation on, every stage's
    checkpoint is written and kept, so that any stage can be evaluated afterwards."""
    preset, overrides = METHODS[method]
    cfg = load_yaml(presets_dir() / preset)
    run_lr = METHOD_LRS.get(method) if lr is None else lr
    apply_overrides(cfg, ["--seed", str(seed), "--out", str(out / run_name(method, seed, lr)),
                          "--log.progress", "false", *(["--train.lr", repr(run_lr)] if run_lr is not None else []),
                          *POLICIES[policy], *extra, *overrides])
    if cfg.eval.enabled:
        cfg.checkpoint_every = 1
        cfg.keep_checkpoints = max(cfg.keep_checkpoints, cfg.schedule.num_stages)
    return cfg


def default_eval_stages(num_stages: int) -> list[int]:
    """The middle stage and the last one (4 and 9 of 10 stages)."""
    return sorted({(num_stages - 1) // 2, num_stages - 1})


def eval_curve(trainer: Trainer, queries: list[int], result: dict, stages: list[int]) -> list[dict]:
    """[{stage, queries, rows}]: the base model at 0 queries (the trainer's evaluation before
    training), then the LoRA of each stage's checkpoint, evaluated by the trainer itself (same
    sets, splits, images per prompt and seeds); the last stage is its evaluation after training."""
    last = len(queries) - 1
    curve = [{"stage": "before", "queries": 0, "rows": result["before"]}]
    for stage in sorted(set(stages)):
        if stage == last:
            rows = result["after"]
        else:
            load_checkpoint(trainer.out / "checkpoints" / f"stage-{stage:06d}", trainer.policy)
            rows = finite_json([r.as_dict() for r in trainer.evaluate(f"stage-{stage:06d}-eval")])
        curve.append({"stage": stage, "queries": queries[stage], "rows": rows})
    return curve


def run_one(method: str, seed: int, out: Path, extra: list[str], lr: float | None = None,
            eval_stages: list[int] | None = None, policy: str = "ddim") -> dict:
    cfg = make_config(method, seed, out, extra, lr, policy)
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
    train_minutes = sum(r["seconds"] for r in records) / 60  # stages only, no evaluation
    queries = list(itertools.accumulate(r["n_images"] for r in records))  # reward queries so far
    result = json.loads((Path(cfg.out) / "eval.json").read_text()) if cfg.eval.enabled else {}
    if result:
        result["eval_curve"] = eval_curve(trainer, queries, result,
                                          default_eval_stages(len(records)) if eval_stages is None else eval_stages)
    return {"method": method, "seed": seed, "lr": cfg.train.lr, "model": cfg.model.path,
            "minutes": (time.perf_counter() - started) / 60, "train_minutes": train_minutes,
            "reward_first": records[0]["reward_mean"], "reward_last": records[-1]["reward_mean"],
            "stage_rewards": [r["reward_mean"] for r in records], "queries": queries, **result}


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
    """Mean ``key`` over the rows of ``split``; NaN when that split was not evaluated."""
    values = [r[key] for r in rows if r["split"] == split]
    return statistics.mean(values) if values else math.nan


def base_models(results: list[dict]) -> list[str]:
    """The starting models of the runs, in order of appearance ("" for a results.json of an older
    version, which did not record it)."""
    return list(dict.fromkeys(r.get("model", "") for r in results))


def base_name(model: str, models: list[str]) -> str:
    return "base model" if len(models) == 1 else f"base model ({model or '?'})"


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
        values = [v for v in (_mean(r[when], split, key) for r in runs) if math.isfinite(v)]
        if not values:  # the split was not evaluated (e.g. --eval.splits [test])
            return "-"
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.3f} ± {spread:.3f}"

    def row(name, runs, when, minutes):
        return (f"| {name} | {len(runs)} | {cell(runs, when, 'test', 'success')} | "
                f"{cell(runs, when, 'test', 'score')} | {cell(runs, when, 'train', 'success')} | "
                f"{cell(runs, when, 'train', 'score')} | {cell(runs, when, 'test', 'diversity')} | {minutes} |")

    # The base model is evaluated with each seed's eval noise: one "before" per seed (and per
    # starting model: B2-DiffuRL-LCM starts from the toy LCM).
    models = base_models(results)
    for model in models:
        first_per_seed = list({r["seed"]: r for r in reversed(results) if r.get("model", "") == model}.values())
        lines.append(row(base_name(model, models), first_per_seed, "before", "-"))
    for method in METHODS:
        runs = [r for r in results if r["method"] == method]
        if runs:
            lines.append(row(f"{method} (lr {_lr(chosen[method])})", runs, "after",
                             f"{statistics.mean(r['train_minutes'] for r in runs):.1f}"))
    return "\n".join(sweep + [""] + lines)


# -- learning curves: means over seeds with 95% Student-t intervals (b2fast.eval.stats) -------------
CI_NOTE = "95% CI: Student-t interval over seeds, mean ± t(0.975, n−1)·sd/√n"


def chosen_runs(results: list[dict], last: int) -> tuple[dict[str, float], dict[str, list[dict]]]:
    """Per method its chosen lr (by training reward, :func:`choose_lrs`) and the runs at that lr."""
    chosen, _ = choose_lrs(results, last)
    return chosen, {m: [r for r in results if r["method"] == m and r.get("lr") == lr] for m, lr in chosen.items()}


def curve_points(runs: list[dict]) -> list[dict]:
    """The evaluated points of a method's runs, base model first: [{stage, queries, test, train}],
    ``test``/``train`` a dict seed → mean score over the prompt sets of that split."""
    points: dict = {}
    for run in runs:
        for p in run.get("eval_curve", []):
            point = points.setdefault(p["stage"], {"stage": p["stage"], "queries": p["queries"],
                                                   "test": {}, "train": {}})
            for split in ("test", "train"):
                scores = [r["score"] for r in p["rows"] if r["split"] == split and r["score"] is not None]
                if scores:
                    point[split][run["seed"]] = statistics.mean(scores)
    return sorted(points.values(), key=lambda p: -1 if p["stage"] == "before" else p["stage"])


def _ci(values) -> str:
    mean, low, high = mean_ci(values)
    return "-" if math.isnan(mean) else f"{mean:.3f}" if math.isnan(low) else f"{mean:.3f} [{low:.3f}, {high:.3f}]"


def _verdict(d: PairedDifference, first: str, second: str) -> str:
    if d.within_noise is None:
        return "n/a (fewer than 2 seeds)"
    return "within noise" if d.within_noise else f"{first if d.diff > 0 else second} ahead"


def curves_table(results: list[dict], last: int = 3) -> str:
    """Markdown: per method (chosen lr) and evaluated budget, held-out and train-split mean score
    with 95% CIs over seeds; then, if B2-DiffuRL ran, B2-DiffuRL − each other method per budget,
    paired by seed."""
    chosen, runs = chosen_runs(results, last)
    evaluated = {m: curve_points(r) for m, r in runs.items() if any("eval_curve" in x for x in r)}
    if not evaluated:
        return ("No alignment curves: the runs hold no eval_curve (evaluation off, or a results.json "
                "of an older version).")
    lines = [(f"Alignment along training: the reward's mean score over the evaluated prompt sets (the three toy "
              f"templates), mean over seeds [95% CI]; {CI_NOTE}."), "",
             "| method | stage | reward queries | seeds | held-out (test) score | train score |",
             "|---|---|---|---|---|---|"]
    # every run of a seed from the same starting model starts from the same evaluation
    models = base_models([r for method_runs in runs.values() for r in method_runs])
    bases: dict = {model: {"test": {}, "train": {}} for model in models}
    for method, points in evaluated.items():
        base = bases[runs[method][0].get("model", "")]
        for p in points:
            if p["stage"] == "before":
                base["test"].update(p["test"])
                base["train"].update(p["train"])
    for model, base in bases.items():
        if base["test"]:
            lines.append(f"| {base_name(model, models)} | before | 0 | {len(base['test'])} | "
                         f"{_ci(base['test'].values())} | {_ci(base['train'].values())} |")
    for method, points in evaluated.items():
        for p in points:
            if p["stage"] != "before":
                lines.append(f"| {method} (lr {_lr(chosen[method])}) | {p['stage']} | {p['queries']} | "
                             f"{len(p['test'])} | {_ci(p['test'].values())} | {_ci(p['train'].values())} |")
    if REFERENCE in evaluated:
        for other in evaluated:
            if other != REFERENCE:
                same_base = runs[other][0].get("model") == runs[REFERENCE][0].get("model")
                lines += ["", *paired_table(evaluated[REFERENCE], evaluated[other], REFERENCE, other, same_base)]
    return "\n".join(lines)


def paired_table(ours: list[dict], theirs: list[dict], first: str, second: str,
                 same_base: bool = True) -> list[str]:
    """Markdown lines: ``first − second`` per evaluated stage both have, paired by seed."""
    shared = ("the base model and the evaluation noise" if same_base else
              "the evaluation noise; they start from different models, see the base rows")
    lines = [(f"Paired difference {first} − {second} per budget, by seed (a seed's two runs share "
              f"{shared}); {CI_NOTE} of the paired differences."), "",
             ("| stage | reward queries | seeds paired | held-out (test) difference | held-out | "
              "train difference | train |"), "|---|---|---|---|---|---|---|"]
    by_stage = {p["stage"]: p for p in theirs}
    unequal = False
    for p in ours:
        q = by_stage.get(p["stage"])
        if p["stage"] == "before" or q is None:
            continue
        unequal |= p["queries"] != q["queries"]
        budget = str(p["queries"]) if p["queries"] == q["queries"] else f"{p['queries']} / {q['queries']}"
        cells = [str(p["stage"]), budget, str(paired_difference(p["test"], q["test"]).n)]
        for split in ("test", "train"):
            d = paired_difference(p[split], q[split])
            if d.n == 0:  # the split was not evaluated (e.g. --eval.splits [test])
                cells += ["-", "-"]
                continue
            ci = "" if math.isnan(d.ci_low) else f" [{d.ci_low:+.3f}, {d.ci_high:+.3f}]"
            cells += [f"{d.diff:+.3f}{ci}", _verdict(d, first, second)]
        lines.append("| " + " | ".join(cells) + " |")
    if unequal:
        lines += ["", (f"Note: at equal stages the methods scored different numbers of images ({first} / "
                       f"{second}); the differences compare equal stages, not equal budgets.")]
    return lines


def plot_curves(results: list[dict], path: Path, last: int = 3) -> None:
    """Two panels against reward queries: training (stage) reward and held-out score; per method
    (chosen lr) the mean over seeds with a shaded 95% t-interval."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen, runs = chosen_runs(results, last)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), sharex=True)

    def band(ax, x, values, color, label):
        stats = [mean_ci(v) for v in values]
        ax.plot(x, [s[0] for s in stats], marker=".", color=color, label=label)
        ax.fill_between(x, [s[1] for s in stats], [s[2] for s in stats], color=color, alpha=0.2, linewidth=0)

    for method, method_runs in runs.items():
        label = f"{method} (lr {_lr(chosen[method])}, {len(method_runs)} seeds)"
        color = f"C{list(METHODS).index(method)}"  # a method keeps its colour whichever others ran
        trained = [r for r in method_runs if r.get("queries")]
        if trained:
            n = min(len(r["queries"]) for r in trained)
            band(left, [statistics.mean(r["queries"][k] for r in trained) for k in range(n)],
                 [[r["stage_rewards"][k] for r in trained] for k in range(n)], color, label)
        points = curve_points(method_runs)
        if points:
            band(right, [p["queries"] for p in points], [list(p["test"].values()) for p in points], color, label)
    sets = {r["prompt_set"] for run in results for p in run.get("eval_curve", [])[:1] for r in p["rows"]}
    left.set_title("training reward (mean over the stage's images)", fontsize=10)
    right.set_title(f"held-out alignment (test split, mean score over {len(sets)} prompt sets)", fontsize=10)
    for ax in (left, right):
        ax.set_xlabel("reward queries (images scored)")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    left.set_ylabel("reward")
    right.set_ylabel("score")
    fig.suptitle(f"lines: mean over seeds; bands: {CI_NOTE}", fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def write_curves(results: list[dict], out: Path, last: int = 3) -> str:
    """Write OUT/curves.md and OUT/curves.png; return the table."""
    table = curves_table(results, last)
    atomic_write_text(out / "curves.md", table + "\n")
    plot_curves(results, out / "curves.png", last)
    return table


def check_eval_stages(parser: argparse.ArgumentParser, args: argparse.Namespace, out: Path,
                      extra: list[str]) -> None:
    """Stop with a one-line error when an --eval-stages index is not a stage of every method's runs
    (or an override is not a config field, or a method's config is invalid), before any model loads."""
    for method in args.methods:
        try:
            cfg = validate(make_config(method, args.seeds[0], out, extra, policy=args.policy))
        except ValueError as exc:
            parser.error(str(exc))
        n = cfg.schedule.num_stages
        for stage in args.eval_stages or []:
            if not 0 <= stage < n:
                parser.error(f"--eval-stages: got {stage}, expected a stage index in 0..{n - 1} "
                             f"({method}: schedule.num_stages = {n})")


def build_parser() -> argparse.ArgumentParser:
    """The command line (also read by the test that checks README's default-run command)."""
    parser = argparse.ArgumentParser(
        prog="python benchmarks/toy_compare.py", description=__doc__.split("\n\n")[0],
        epilog="Any config field of python -m b2fast.train can follow as --section.field VALUE (applied to "
               "every run, e.g. --eval.images_per_prompt 8). Each run writes OUT/<method>-seed<N>, "
               "replacing that folder if it exists.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default: %(default)s)")
    parser.add_argument("--out", default="runs/toy_compare", help="output folder (default: %(default)s)")
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(METHODS),
                        metavar="METHOD",
                        help=f"methods to run, of {', '.join(METHODS)} (default: {' '.join(DEFAULT_METHODS)})")
    parser.add_argument("--policy", choices=list(POLICIES), default="ddim",
                        help="the policy every method trains: 'ddim' (each preset's, the 20-step toy model) or "
                             "'lcm' (the 4-step toy LCM, a tenth of the stage time; sweep --lrs, the presets' lr "
                             "is the DDIM policy's) (default: %(default)s)")
    parser.add_argument("--lrs", type=float, nargs="+", default=None,
                        help="learning rates to sweep per method (default: each preset's own train.lr)")
    parser.add_argument("--select-last", type=int, default=3,
                        help="choose each method's lr by its mean training reward over this many last "
                             "stages (default: %(default)s)")
    parser.add_argument("--eval-stages", type=int, nargs="+", default=None, metavar="STAGE",
                        help="stage indices (0-based) whose checkpoint is evaluated on the held-out and train "
                             "prompts for the alignment curve (default: the middle and the last stage, e.g. "
                             "4 9 of 10 stages)")
    parser.add_argument("--table-only", action="store_true",
                        help="print the tables of OUT/results.json again and rewrite curves.md and curves.png, "
                             "without running anything")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    out = Path(args.out)
    if args.table_only:
        if not (out / "results.json").is_file():
            parser.error(f"--table-only: no {out / 'results.json'}; run the comparison first (or give --out)")
        results = json.loads((out / "results.json").read_text())
        print(summarise(results, args.select_last) + "\n\n" + write_curves(results, out, args.select_last))
        return
    if args.select_last < 1:
        parser.error(f"--select-last: got {args.select_last}, expected an integer >= 1")
    check_eval_stages(parser, args, out, extra)
    results = []
    for seed in args.seeds:
        for method in args.methods:
            for lr in args.lrs or [None]:
                results.append(run_one(method, seed, out, extra, lr, args.eval_stages, args.policy))
                atomic_write_text(out / "results.json", json.dumps(results, indent=1))
    table = summarise(results, args.select_last)
    atomic_write_text(out / "results.md", table + "\n")
    print(table + "\n\n" + write_curves(results, out, args.select_last))


if __name__ == "__main__":
    main()
