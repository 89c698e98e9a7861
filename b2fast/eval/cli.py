"""``python -m b2fast.eval``: score base and LoRA weights on prompt sets, with the same seeds.

    python -m b2fast.eval                                   # the toy model on the three toy sets
    python -m b2fast.eval --lora runs/x                     # base vs the run's trained LoRA
    python -m b2fast.eval --model b2fast:tiny-sd --prompts my_prompts.txt --reward jpeg_compressibility
    python -m b2fast.eval --lora runs/x --out runs/x/eval   # also write eval.json, eval.csv, grids
    python -m b2fast.eval --lora runs/x --prompts-per-set 0 --images-per-prompt 8   # every prompt
    python -m b2fast.eval --reward clipscore bertscore --reward-options '{bertscore: {captioner: ./blip}}'

With ``--lora`` on a run of ``b2fast.train``, the model, LoRA shape, prompt sets, reward and
sampler default to the run's. The policy is loaded once; the base column is sampled with the
fresh adapter (LoRA B = 0, so exactly the base model), then the LoRA is loaded and the same seeds
are sampled again, so the two columns differ only by the LoRA; each difference trained − base
comes with a 95% interval paired by prompt and bootstrapped over prompts (b2fast.eval.stats).
Each reward is built once, and the images of a (set, split, column) are sampled once and scored
by every reward. Bad arguments stop before any model loads, with a one-line message naming the
argument (exit code 2).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import re
import sys
from pathlib import Path

import yaml

from b2fast.config import DTYPES, SCHEDULERS, Config, ModelConfig, SamplingConfig, apply_dict
from b2fast.prompts import TOY_SETS
from b2fast.run.folders import resolve_lora, run_config
from b2fast.utils import (DEVICE_NAMES, ArgumentError, OneLineParser, check_writable, first_line, is_device_name,
                          one_line_warnings, require, stop_on_interrupt)

DEFAULT_MODEL = "b2fast:toy"
DEFAULT_SETS = TOY_SETS
DEFAULT_REWARD = "toy_align"
SAMPLER_DEFAULTS = {"scheduler": "ddim", "num_steps": 20, "guidance_scale": 5.0, "eta": 1.0}  # without a run
DESCRIPTION = """\
Sample fixed-seed images per prompt from the base weights (and, with --lora, the trained
weights, same seeds); score them with every --reward; report per prompt set and split the
mean of each reward, the success rate (fraction of images scoring >= 1) for rewards where
1 means 'prompt fully met' (toy_align), and two diversities of one prompt's images, averaged
over prompts, on the image embeddings of the first reward that has them (clipscore,
aesthetic), else on 8x8-pooled pixels:
  diversity  mean pairwise distance: cosine distance 1 - cos on embeddings (0 = identical,
             1 = orthogonal), L2 on pooled pixels
  vendi      Vendi score (cosine): effective number of distinct images, 1 to N per prompt
With --lora, a second table gives each reward score's and success rate's difference
trained - base, the mean over prompts of the per-prompt difference (same prompts, same seeds),
with a 95% percentile bootstrap interval over prompts (2,000 resamples, fixed seed); 'noise'
marks an interval that contains 0. More prompts narrow it: --prompts-per-set 0 takes all."""


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m b2fast.eval", formatter_class=argparse.RawDescriptionHelpFormatter,
                        description=DESCRIPTION,
                        epilog="examples:\n" + __doc__.split("\n\n")[1])  # the usage lines of the docstring
    add = p.add_argument
    add("--model", help="hub id, diffusers folder, 'b2fast:tiny-sd', 'b2fast:toy' or 'b2fast:toy-lcm' "
                        f"(default: the model of the --lora run when it has a config.yaml, else {DEFAULT_MODEL!r})")
    add("--lora", metavar="DIR", help="LoRA folder (holding pytorch_lora_weights.safetensors), checkpoint "
                                      "folder, or run folder of b2fast.train (its lora/, else its latest checkpoint)")
    add("--prompts", nargs="+", metavar="SET_OR_FILE",
        help="built-in prompt set names and/or prompt files (default: the sets the --lora run evaluates, "
             f"from its config.yaml; else {' '.join(DEFAULT_SETS)})")
    add("--splits", nargs="+", default=["train", "test"], metavar="SPLIT",
        help="splits of each set: train, test or all; a file holding one plain list gives it to every split "
             "(default: %(default)s)")
    add("--reward", nargs="+", metavar="NAME",
        help="one or more rewards, each a registered name or 'module:function'; the first one fills the "
             f"score/success fields of eval.json (default: the --lora run's reward and its options; else "
             f"{DEFAULT_REWARD})")
    add("--reward-options", default="", metavar="MAPPING",
        help="reward keyword options as a YAML/JSON mapping keyed by reward name, e.g. "
             "'{clipscore: {batch_size: 16}, bertscore: {captioner: ./blip}}' (rewards left out keep "
             "their defaults); with one reward, also its options alone, e.g. '{quality: 80}'")
    add("--images-per-prompt", type=int, default=4, metavar="N", help="images per prompt (default: %(default)s)")
    add("--prompts-per-set", type=int, default=12, metavar="N",
        help="prompts per set and split, spread evenly over the list; 0 = all (default: %(default)s)")
    add("--seed", type=int, default=0, help="noise seed, shared by both columns (default: %(default)s)")
    run = "the --lora run's sampling.{} when its model is used, else"
    add("--num-steps", type=int, metavar="S", help=f"sampling steps (default: {run.format('num_steps')} 20)")
    add("--guidance-scale", type=float, metavar="W",
        help=f"CFG scale (default: {run.format('guidance_scale')} 5.0)")
    add("--eta", type=float, help=f"DDIM eta (default: {run.format('eta')} 1.0)")
    add("--scheduler", choices=SCHEDULERS,
        help="'lcm' for a latent consistency model (e.g. --num-steps 4), 'rlcm' for it as RLCM's code samples "
             f"(default: {run.format('scheduler')} ddim)")
    add("--device", default="auto", help="'auto', 'cpu', 'cuda' or 'cuda:N' (default: %(default)s)")
    add("--dtype", default="float32", help=f"base weights dtype, one of {', '.join(DTYPES)} (default: %(default)s)")
    add("--out", metavar="DIR", help="write eval.json, eval.csv, grid_<set>_<split>_<column>.png (one row per "
                                     "prompt, the prompt beside its images) and, with --lora, eval_diff.csv and "
                                     "compare_<set>_<split>.png (base | trained side by side) here (default: print "
                                     "the tables only)")
    return p


def validate_args(a: argparse.Namespace) -> argparse.Namespace:
    """Range checks of the plain arguments (paths, sets and rewards are checked when resolved)."""
    require(a.images_per_prompt >= 1, "--images-per-prompt", a.images_per_prompt, "an integer >= 1")
    require(a.prompts_per_set >= 0, "--prompts-per-set", a.prompts_per_set, "an integer >= 0 (0 = all)")
    require(a.num_steps >= 1, "--num-steps", a.num_steps, "an integer >= 1")
    require(a.guidance_scale >= 0, "--guidance-scale", a.guidance_scale, "a number >= 0")
    require(0 <= a.eta <= 1, "--eta", a.eta, "a number in [0, 1]")
    require(a.dtype in DTYPES, "--dtype", a.dtype, f"one of {DTYPES}", DTYPES)
    require(is_device_name(a.device), "--device", a.device, DEVICE_NAMES)
    for split in a.splits:
        require(split in ("train", "test", "all"), "--splits", split, "'train', 'test' or 'all'")
    require(a.reward is None or len(set(a.reward)) == len(a.reward), "--reward", a.reward, "distinct reward names")
    return a


def parse_reward_options(text: str, names: list[str]) -> dict[str, dict]:
    """--reward-options → options per reward name. The mapping is keyed by reward name; with one
    reward it may also be that reward's options themselves. A reward left out gets its defaults."""
    if not text.strip():
        return {name: {} for name in names}
    try:
        options = yaml.safe_load(text)  # JSON is YAML
    except yaml.YAMLError:
        options = None
    keyed = "a YAML/JSON mapping keyed by reward name, e.g. '{clipscore: {batch_size: 16}}'"
    require(isinstance(options, dict), "--reward-options", text,
            keyed + (", or the reward's own options, e.g. '{quality: 80}'" if len(names) == 1 else ""))
    if len(names) == 1 and set(options) != {names[0]}:
        return {names[0]: options}
    for key, value in options.items():
        require(key in names, "--reward-options", key, f"one of the --reward names {names} ({keyed})", names)
        require(isinstance(value, dict), f"--reward-options {key}", value, "a mapping of that reward's options")
    return {name: options.get(name, {}) for name in names}


def _section(tree: dict, name: str) -> dict:
    section = tree.get(name)
    return section if isinstance(section, dict) else {}


def fill_sampler(args: argparse.Namespace, run: dict) -> None:
    """Sampler flags left out: the --lora run's (an LCM run is judged with its own few steps, as its
    before/after table was), unless --model names another model; else DDIM's defaults."""
    own = {k: v for k, v in _section(run, "sampling").items() if k in SAMPLER_DEFAULTS} if not args.model else {}
    sampling = apply_dict(Config(), {"sampling": own}).sampling  # type-checked
    for name, default in SAMPLER_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, getattr(sampling, name) if name in own else default)


def fill_from_run(args: argparse.Namespace, run: dict) -> dict[str, dict] | None:
    """--prompts and --reward left out: what the --lora run evaluated and was trained on (its
    eval.prompt_sets, else its prompt source; its reward), else the toy world's. Returns the
    run's reward options when its reward is used and --reward-options is empty, else None."""
    from b2fast.eval.evaluator import default_eval_sets

    source = _section(run, "prompts").get("source")
    if args.prompts is None:
        sets = _section(run, "eval").get("prompt_sets") or (default_eval_sets(source) if source else None)
        args.prompts = list(sets or DEFAULT_SETS)
    name = _section(run, "reward").get("name")
    if args.reward is None:
        args.reward = [name or DEFAULT_REWARD]
        if name and not args.reward_options.strip():
            return {name: dict(_section(run, "reward").get("options") or {})}
    return None


def model_config(args: argparse.Namespace, lora: Path | None) -> ModelConfig:
    """--model and --dtype, with the LoRA's rank/alpha/targets (and model) from its run when known."""
    run = _section(run_config(lora), "model") if lora else {}
    keep = ("lora_rank", "lora_alpha", "lora_targets") + (() if args.model else ("path", "revision"))
    cfg = apply_dict(Config(), {"model": {k: run[k] for k in keep if k in run}}).model  # type-checked
    cfg.path = args.model or run.get("path") or DEFAULT_MODEL
    cfg.dtype = args.dtype
    return cfg


def plan_sets(args: argparse.Namespace) -> list[tuple[str, str, list[str]]]:
    """(label, split, prompts) per prompt set and split; a file's label is its file name stem."""
    from b2fast.eval.evaluator import pick_prompts
    from b2fast.prompts import available_prompt_sets, load_prompts

    plan = []
    for source in args.prompts:
        builtin = source in available_prompt_sets()
        require(builtin or Path(source).is_file(), "--prompts", source,
                 f"a built-in prompt set {available_prompt_sets()} or an existing file")
        label = source if builtin else re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(source).stem)
        for split in args.splits:
            prompts = pick_prompts(load_prompts(source, split, field="--prompts"), args.prompts_per_set)
            plan.append((label, split, prompts))
    return plan


def evaluate_column(policy, plan, rewards: dict, cfg: SamplingConfig, args, column: str, out: Path | None,
                    keep: list | None = None) -> list:
    """One EvalRow per (set, split), its images sampled once and scored by every reward; with
    ``out``, a grid per (set, split): one labelled row per prompt. ``keep`` gets each (set,
    split)'s images as uint8 on the CPU (4× smaller than float; the grids store 8 bits anyway)."""
    from b2fast.eval.evaluator import EvalRow, evaluate_prompts
    from b2fast.rewards.base import to_uint8
    from b2fast.run.outputs import save_prompt_grid

    rows = []
    for label, split, prompts in plan:
        metrics, images = evaluate_prompts(policy, prompts, rewards, cfg, args.images_per_prompt, args.seed)
        rows.append(EvalRow(label, split, len(prompts), images.shape[0], **metrics))
        if out is not None:
            save_prompt_grid(out / f"grid_{label}_{split}_{column}.png", images, prompts, args.images_per_prompt)
        if keep is not None:
            keep.append(to_uint8(images))
    return rows


def write_results(out: Path, columns: dict, plan, arguments: dict) -> None:
    """eval.json (arguments, prompts, rows per column and, with two columns, their differences)
    and eval.csv (one line per set/split/column, a column per reward score and success rate);
    with two columns, eval_diff.csv (one line per set/split/metric: diff, ci_low, ci_high)."""
    from b2fast.eval.stats import compare_rows
    from b2fast.utils import atomic_write_text, finite_json

    record = {"arguments": arguments,
              "prompts": [{"prompt_set": label, "split": split, "prompts": prompts} for label, split, prompts in plan],
              "columns": {name: [r.as_dict() for r in rows] for name, rows in columns.items()}}
    differences = compare_rows(*columns.values()) if len(columns) == 2 else None
    if differences is not None:  # trained − base per set, split and metric, with its paired 95% CI
        record["differences"] = differences
    # strict JSON: a number that is not finite (every score of a set NaN) is written as null
    atomic_write_text(out / "eval.json", json.dumps(finite_json(record), indent=2, allow_nan=False) + "\n")
    first = next(iter(columns.values()))[0]
    fields = ["prompt_set", "split", "column", "n_prompts", "n_images",
              *(key for key, _ in first.reward_cells()), "diversity", "vendi"]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=fields, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for i in range(len(plan)):
        for name, rows in columns.items():
            writer.writerow({**rows[i].as_dict(), **dict(rows[i].reward_cells()), "column": name})
    atomic_write_text(out / "eval.csv", text.getvalue())
    if differences is not None:
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=list(differences[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(differences)
        atomic_write_text(out / "eval_diff.csv", text.getvalue())


def prepare(argv: list[str]):
    """argv → (args, ModelConfig, LoRA folder or None, plan, options per reward); no model loaded."""
    args = _parser().parse_args(argv)
    lora = resolve_lora(args.lora) if args.lora else None
    run = run_config(lora) if lora else {}
    fill_sampler(args, run)
    validate_args(args)
    if args.out:  # before any sampling: a run must not end unable to write its results
        check_writable(args.out, "--out", folder=True)
    options = fill_from_run(args, run) or parse_reward_options(args.reward_options, args.reward)
    return args, model_config(args, lora), lora, plan_sets(args), options


# The config fields a reward's errors name (reward.name, reward.options[.key] [(term)]), which
# the eval CLI takes as --reward and --reward-options.
_REWARD_FIELD = re.compile(r"reward\.(name|options)(?:\.(\S+?))?( \([^)]*\))?: ")


def reward_error(message: str, name: str, several: bool) -> str:
    """A ``build_reward`` error of reward ``name`` in this CLI's terms: 'reward.options.quality: ...'
    → '--reward-options quality: ...' ('--reward-options <name>.quality' with several rewards),
    'reward.name: ...' → '--reward: ...'; other errors get '--reward <name>: ' with several."""
    message = message.replace("--reward.options '", "--reward-options '")  # the rewards' own hints
    match = _REWARD_FIELD.match(message)
    if match is None:
        return f"--reward {name}: {message}" if several else message
    rest = message[match.end():]
    if match.group(1) == "name":
        return f"--reward: {rest}"
    key = ".".join(k for k in (name if several else "", match.group(2) or "") if k) + (match.group(3) or "")
    return f"--reward-options{' ' + key.strip() if key.strip() else ''}: {rest}"


def build_rewards(options: dict[str, dict], device) -> dict:
    """Each reward built once, in order; with several, an error says which one failed."""
    from b2fast.rewards import build_reward

    rewards = {}
    for name, kwargs in options.items():
        try:
            rewards[name] = build_reward(name, kwargs, device)
        except ValueError as exc:
            raise ValueError(reward_error(str(exc), name, len(options) > 1)) from None
    return rewards


def load_models(args, model_cfg: ModelConfig, lora: Path | None, options: dict[str, dict]):
    """(device, rewards, policy with base weights, trained LoRA state or None); LoRA errors here."""
    import torch

    from b2fast.core.policy import Policy, resolve_model_path
    from b2fast.distributed import resolve_device

    device = resolve_device(args.device)
    resolve_model_path(model_cfg.path)  # a bad path fails here, before the reward models load
    rewards = build_rewards(options, device)
    torch.manual_seed(args.seed)  # adapter init; its B = 0, so the base column is the base model
    policy = Policy(model_cfg, device, args.num_steps, args.eta, args.scheduler)
    if lora is None:
        return device, rewards, policy, None
    base = policy.lora_state_dict()
    try:
        policy.load_lora(lora)
    except Exception as exc:  # mismatched or corrupt weights are the same problem to the user
        reason = first_line(exc, 160) or type(exc).__name__
        raise ArgumentError(f"--lora: cannot load {str(lora)!r} into {model_cfg.path!r} ({reason})") from None
    trained = policy.lora_state_dict()
    policy.load_lora_state_dict(base)
    return device, rewards, policy, trained


def evaluate(args, policy, rewards: dict, trained: dict | None, plan) -> dict:
    """{"base": rows} and, with a LoRA, {"trained": rows}: the same seeds for both columns."""
    cfg = SamplingConfig(num_steps=args.num_steps, guidance_scale=args.guidance_scale, eta=args.eta,
                         scheduler=args.scheduler)
    out = Path(args.out) if args.out else None
    keep = {"base": [], "trained": []} if out is not None and trained is not None else {}
    columns = {"base": evaluate_column(policy, plan, rewards, cfg, args, "base", out, keep.get("base"))}
    if trained is not None:
        policy.load_lora_state_dict(trained)
        columns["trained"] = evaluate_column(policy, plan, rewards, cfg, args, "trained", out, keep.get("trained"))
    if keep:
        from b2fast.run.outputs import save_comparison_grid

        for i, (label, split, prompts) in enumerate(plan):
            save_comparison_grid(out / f"compare_{label}_{split}.png",
                                 {name: images[i].float() / 255 for name, images in keep.items()},
                                 prompts, args.images_per_prompt)
    return columns


@stop_on_interrupt("no table was written (it is written when every column is sampled)")
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    one_line_warnings()
    try:
        args, model_cfg, lora, plan, options = prepare(argv)
        from b2fast import backends
        print(f"b2fast: backends {backends()}")
        device, rewards, policy, trained = load_models(args, model_cfg, lora, options)
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    except (ValueError, FileNotFoundError) as exc:  # bad argument, model, LoRA, prompts or reward
        message = str(exc)
        if message.startswith("model.path: "):  # the model loader speaks of the config field
            message = "--model: " + message.removeprefix("model.path: ")
        print(f"error: {message}", file=sys.stderr)
        return 2
    from b2fast.eval.evaluator import format_comparison

    print(f"model {model_cfg.path}" + (f", LoRA {lora}" if lora else "") + f", device {device}, "
          f"{args.scheduler} {args.num_steps} steps (guidance {args.guidance_scale}, eta {args.eta}), "
          f"rewards {', '.join(rewards)}, prompts {' '.join(args.prompts)}")
    columns = evaluate(args, policy, rewards, trained, plan)
    print(format_comparison(columns))
    if args.out:
        arguments = {**vars(args), "model": model_cfg.path, "lora": str(lora) if lora else None}
        write_results(Path(args.out), columns, plan, arguments)
        print(f"wrote eval.json, eval.csv{', eval_diff.csv' if trained is not None else ''} and grids to {args.out}")
    return 0
