"""``python -m b2fast.sample``: images of prompts with fixed seeds, from the base or trained weights,
plain or FK-steered.

    python -m b2fast.sample --prompt "a red circle" --prompt "a blue square"   # the toy model
    python -m b2fast.sample --prompts toy_attribute --split test --max-prompts 6 --images-per-prompt 8
    python -m b2fast.sample --prompts my_prompts.txt --lora runs/x --out runs/x/samples
    python -m b2fast.sample --prompts toy_spatial --steer fk --steer.particles 8 --steer.lam 10
    python -m b2fast.sample --model ./sd15 --prompts my_prompts.txt --model.dtype float16 --steer fk --reward clipscore

Image k of each prompt has seed ``seed + k`` and its own generator, so it is the same image
whatever else shares its batch. Settings come from ``--config``, else the ``--lora`` run's
config.yaml (model, LoRA shape, sampling, reward), else the ``toy_ddim`` preset (the toy
world's DDIM model); any config field can be overridden as ``--section.field value``. Bad arguments stop
before any model loads, with one line naming the argument (exit code 2).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
from pathlib import Path

from b2fast.config import (Config, ConfigError, apply_dict, apply_overrides, iter_fields, load_yaml, presets_dir,
                           validate)
from b2fast.prompts import SPLITS
from b2fast.utils import (ArgumentError, OneLineParser, atomic_write_text, check_writable, finite_json, first_line,
                          one_line_warnings, require, stop_on_interrupt)

DEFAULT_OUT = "samples"
# Defaults without --config or --lora: the toy world's DDIM preset (DDIM samples any diffusers
# model; the trainer's default LCM policy would refuse a model that was not distilled for it).
SAMPLER_PRESET = "toy_ddim.yaml"
KEEP = ("best", "all")
# config fields the sampler reads (the rest of a run's config is carried along unused)
SAMPLER_FIELDS = ("seed", "device", "backend", "model.", "sampling.scheduler", "sampling.num_steps",
                  "sampling.guidance_scale", "sampling.eta", "sampling.cache_dtype", "sampling.unet_batch",
                  "sampling.cuda_graphs", "reward.", "steer.")
SHORTHANDS = (("model", "model.path"), ("reward", "reward.name"), ("steer", "steer.kind"),
              ("fk_weights", "steer.weights"))
FILES = """\
output (in --out): p<i>_s<seed>.png per image (prompt index i, zero-padded; with --steer fk --keep
all, p<i>_s<seed>_k<particle>.png per particle), grid_p<i>.png per prompt (the prompt beside
its images; --keep all: a row per seed), samples.jsonl (one line per image: file, prompt,
seed, and with FK its particle, reward, normalised log-weight, ancestor and resampling count)
and sample.json (the settings).

FK steering (--steer fk): N particles per prompt and seed run as one batch (several prompts per
batch) with DDIM eta > 0; at the potential steps each particle's x0-prediction is decoded and
scored by the reward, and each prompt's particles are resampled by their potentials (log space,
per prompt). steer.start/every/end count steps of a 100-step chain and are scaled to
sampling.num_steps (rounded, every >= 1; the last step always is one): the defaults 5/5/30
are steps 5, 10, ..., 30 and 99 of 100, and steps 1, 2, ..., 6 and 19 of 20. --keep best
writes each prompt and seed's highest-reward particle; --keep all writes every particle."""


def _parser() -> argparse.ArgumentParser:
    preset = load_yaml(presets_dir() / SAMPLER_PRESET)
    fields = "\n".join(f"  --{name} (default: {default!r})\n      {help}" for name, default, help in iter_fields(preset)
                       if name.startswith(SAMPLER_FIELDS))
    _, examples, settings = __doc__.split("\n\n")[:3]
    epilog = (f"examples:\n{examples}\n\n{settings}\n\n{FILES}\n\nconfig fields the sampler reads (override any "
              f"as --section.field VALUE; defaults shown: the {SAMPLER_PRESET} preset's, used without --config or "
              f"--lora):\n{fields}")
    p = OneLineParser(prog="python -m b2fast.sample", formatter_class=argparse.RawDescriptionHelpFormatter,
                      allow_abbrev=False, epilog=epilog, description="Sample images of prompts with fixed seeds "
                      "(base weights or a trained LoRA), plain or FK-steered by a reward.")
    add = p.add_argument
    add("--prompt", action="append", default=[], metavar="TEXT", help="a prompt; repeat for several")
    add("--prompts", metavar="SET_OR_FILE", help="built-in prompt set(s) and/or prompt file(s), as prompts.source "
                                                 "takes them (comma-separated for several)")
    add("--split", default="train", help=f"split of --prompts, one of {', '.join(SPLITS)} (default: %(default)s)")
    add("--max-prompts", type=int, default=0, metavar="N",
        help="at most N prompts of --prompts, spread evenly over the list; 0 = all (default: %(default)s)")
    add("--images-per-prompt", type=int, default=4, metavar="K", help="seeds seed .. seed+K-1 (default: %(default)s)")
    add("--lora", metavar="RUN", help="run folder of b2fast.train (its config.yaml and lora/), checkpoint or LoRA folder")
    add("--config", metavar="FILE", help="YAML config or shipped preset name (default: the --lora run's "
                                         "config.yaml, else the toy_ddim preset)")
    add("--model", metavar="PATH", help="same as --model.path: hub id, diffusers folder, b2fast:toy, b2fast:tiny-sd")
    add("--reward", metavar="NAME", help="same as --reward.name: the reward FK steers by (and records)")
    add("--steer", metavar="KIND", help="same as --steer.kind: 'none' or 'fk'")
    add("--fk-weights", metavar="MODE", help="same as --steer.weights: 'smc' (standard) or 'official'")
    add("--keep", default="best", help=f"FK: one of {', '.join(KEEP)} (default: %(default)s)")
    add("--batch", type=int, default=16, metavar="N", help="images per sampling batch; FK: N // particles "
                                                           "prompts per batch, at least one (default: %(default)s)")
    add("--out", default=DEFAULT_OUT, metavar="DIR", help="output folder (default: %(default)s)")
    add("--no-progress", action="store_true", help="no progress bars (sampling, model loading)")
    return p


def build_config(args: argparse.Namespace, overrides: list[str], lora: Path | None) -> Config:
    """--config, else the LoRA's run config, else the default preset; then the shorthands, then
    ``--section.field`` overrides; validated for sampling (steering allowed)."""
    from b2fast.run.folders import run_config

    run = run_config(lora) if lora is not None and not args.config else {}
    if args.config:
        cfg = load_yaml(args.config)
    else:  # the run's own settings (its config.yaml is a whole config), else the toy-world preset
        cfg = apply_dict(Config(), run) if run else load_yaml(presets_dir() / SAMPLER_PRESET)
    if args.reward and args.reward != cfg.reward.name:
        cfg.reward.options = {}  # another reward's options would not fit
    shorthand = [item for flag, name in SHORTHANDS if getattr(args, flag) is not None
                 for item in (f"--{name}", getattr(args, flag))]
    return validate(apply_overrides(cfg, shorthand + overrides), training=False)


def prepare(argv: list[str]):
    """argv → (args, Config, LoRA folder or None, prompts); no model loaded yet."""
    from b2fast.run.folders import resolve_lora
    from b2fast.eval.evaluator import pick_prompts
    from b2fast.prompts import load_prompts

    args, overrides = _parser().parse_known_args(argv)
    require(args.images_per_prompt >= 1, "--images-per-prompt", args.images_per_prompt, "an integer >= 1")
    require(args.max_prompts >= 0, "--max-prompts", args.max_prompts, "an integer >= 0 (0 = all)")
    require(args.batch >= 1, "--batch", args.batch, "an integer >= 1")
    require(args.split in SPLITS, "--split", args.split, f"one of {SPLITS}", SPLITS)
    require(args.keep in KEEP, "--keep", args.keep, f"one of {KEEP}", KEEP)
    require(all(p.strip() for p in args.prompt), "--prompt", args.prompt, "non-empty prompt texts")
    check_writable(args.out, "--out", folder=True)
    lora = resolve_lora(args.lora) if args.lora else None
    cfg = build_config(args, overrides, lora)
    prompts = [p.strip() for p in args.prompt]
    if args.prompts:
        try:
            loaded = load_prompts(args.prompts, args.split, field="--prompts")
        except ValueError as exc:
            looks_like_text = " " in args.prompts.strip() and not Path(args.prompts).exists()
            raise ArgumentError(f"{exc}{'; a prompt text goes in --prompt' if looks_like_text else ''}") from None
        prompts += pick_prompts(loaded, args.max_prompts)
    if not prompts:
        raise ArgumentError("no prompts: give --prompt TEXT (repeatable) and/or --prompts SET_OR_FILE")
    return args, cfg, lora, prompts


def load(cfg: Config, lora: Path | None, progress: bool = True):
    """(policy with the LoRA loaded, reward wrapped for FK or None); ``progress=False`` also hides
    the libraries' loading bars."""
    import torch

    from b2fast import ops
    from b2fast.core.policy import Policy, hide_loading_progress, resolve_model_path

    if not progress:
        hide_loading_progress()
    from b2fast.distributed import resolve_device
    from b2fast.rewards import build_reward, score_images

    device = resolve_device(cfg.device)
    if cfg.backend != "auto":
        ops.set_backend(cfg.backend, by="the config field `backend`", device=device)
    resolve_model_path(cfg.model.path)  # a bad path fails here, before the reward model loads
    scored = None  # FK's reward(images, prompts): float32 CPU scores, NaN for a non-finite one
    if cfg.steer.kind == "fk":
        reward = build_reward(cfg.reward.name, cfg.reward.options, device)
        scored = functools.partial(score_images, reward, name=cfg.reward.name)
    torch.manual_seed(cfg.seed)  # adapter init; its B = 0, so without --lora this is the base model
    policy = Policy(cfg.model, device, cfg.sampling.num_steps, cfg.sampling.eta, cfg.sampling.scheduler)
    if lora is not None:
        try:
            policy.load_lora(lora)
        except Exception as exc:  # mismatched or corrupt weights are the same problem to the user
            reason = first_line(exc, 160) or type(exc).__name__
            raise ArgumentError(f"--lora: cannot load {str(lora)!r} into {cfg.model.path!r} ({reason})") from None
    return policy, scored


def plain_sample(policy, prompts: list[str], cfg, generators):
    """``sampling.generate`` with one generator per image (row): fixed seeds per image."""
    import torch

    from b2fast.core.sampling import step_function
    from b2fast.core.steering import noise_source

    with torch.no_grad():
        cache_dtype = getattr(torch, cfg.cache_dtype)
        step = step_function(policy, cfg, cache_dtype)
        cond = policy.embed(prompts)
        draw = noise_source(generators, len(prompts), policy.device)
        x = draw((len(prompts), *policy.latent_shape)).to(cache_dtype)
        for i in range(policy.steps.num_steps):
            index = torch.full((len(prompts),), i, dtype=torch.long, device=policy.device)
            noise = draw(tuple(x.shape))
            x, _ = step(x, index, cond, noise)
        return policy.decode(policy.steps.image_latents(x, noise), cfg.unet_batch)


def resample_seed(seed: int) -> int:
    """The FK resampling generator's seed for image seed ``seed``: another stream than the noise's."""
    return (seed * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) % 2 ** 64


def _outputs(batch, images, result, keep: str) -> list[tuple]:
    """(prompt index, seed, particle or None, image, record fields) of each image to write."""
    if result is None:
        return [(i, s, None, img, {}) for (i, s), img in zip(batch, images)]
    n = result.particles
    resampled = [sum(h["resampled"][g] for h in result.history) for g in range(len(batch))]
    fields = [{"particle": k, "reward": result.rewards[g * n + k].item(),
               "log_weight": result.log_weights[g, k].item(), "ancestor": int(result.ancestors[g * n + k]),
               "resamplings": resampled[g]} for g in range(len(batch)) for k in range(n)]
    if keep == "all":
        return [(i, s, k, result.images[g * n + k], fields[g * n + k])
                for g, (i, s) in enumerate(batch) for k in range(n)]
    best_images, _, best = result.best()
    return [(i, s, None, best_images[g], fields[g * n + int(best[g])]) for g, (i, s) in enumerate(batch)]


def sample_all(policy, cfg: Config, prompts: list[str], args, scored) -> list[dict]:
    """Sample every (prompt, seed), writing each image as it comes and each prompt's grid once
    its seeds are done; returns the samples.jsonl records."""
    import numpy as np
    import torch
    from PIL import Image
    from tqdm.auto import tqdm

    from b2fast.core.steering import fk_sample
    from b2fast.rewards.base import to_uint8
    from b2fast.run.outputs import labelled_grid, save_png

    out, k_seeds, fk = Path(args.out), args.images_per_prompt, cfg.steer.kind == "fk"
    out.mkdir(parents=True, exist_ok=True)
    width = max(3, len(str(len(prompts) - 1)))
    items = [(i, cfg.seed + k) for i in range(len(prompts)) for k in range(k_seeds)]
    per_batch = max(1, args.batch // cfg.steer.particles) if fk else args.batch
    pending: dict[int, list] = {}
    records = []
    with tqdm(total=len(items), unit="image", desc="sampling", disable=args.no_progress) as bar:
        for start in range(0, len(items), per_batch):
            batch = items[start:start + per_batch]
            texts = [prompts[i] for i, _ in batch]
            generators = [torch.Generator(policy.device).manual_seed(s) for _, s in batch]
            if fk:
                resamplers = [torch.Generator().manual_seed(resample_seed(s)) for _, s in batch]
                result, images = fk_sample(policy, texts, cfg.sampling, cfg.steer, scored, generators, resamplers), None
            else:
                result, images = None, plain_sample(policy, texts, cfg.sampling, generators)
            for i, seed, particle, image, fields in _outputs(batch, images, result, args.keep):
                name = f"p{i:0{width}d}_s{seed}" + ("" if particle is None else f"_k{particle}") + ".png"
                save_png(out / name, Image.fromarray(np.ascontiguousarray(to_uint8(image).permute(1, 2, 0).numpy())))
                records.append({"file": name, "prompt_index": i, "prompt": prompts[i], "seed": seed, **fields})
                pending.setdefault(i, []).append((seed, image.detach().cpu()))
                done = pending[i]
                if len(done) == k_seeds * (cfg.steer.particles if fk and args.keep == "all" else 1):
                    if fk and args.keep == "all":
                        seeds = sorted({s for s, _ in done})
                        rows = [(f"{prompts[i]} (seed {s})", [torch.stack([im for t, im in done if t == s])])
                                for s in seeds]
                    else:
                        rows = [(prompts[i], [torch.stack([im for _, im in done])])]
                    save_png(out / f"grid_p{i:0{width}d}.png", labelled_grid(rows))
                    del pending[i]
            bar.update(len(batch))
    return records


@stop_on_interrupt("the images written so far are kept in --out (samples.jsonl is written at the end)")
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    one_line_warnings()
    try:
        args, cfg, lora, prompts = prepare(argv)
        from b2fast import backends
        print(f"b2fast: backends {backends()}")
        policy, scored = load(cfg, lora, progress=not args.no_progress)
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    except (ValueError, FileNotFoundError, ConfigError) as exc:  # argument, config, model, LoRA, reward
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from b2fast.core.steering import resampling_steps

    st, s = cfg.steer, cfg.sampling
    steering = "plain sampling"
    if st.kind == "fk":
        steps = resampling_steps(st.start, st.every, st.end, s.num_steps)
        steering = (f"FK steering by {cfg.reward.name}: {st.particles} particles, lambda {st.lam}, {st.potential}, "
                    f"{st.resample}, weights {st.weights}, potential steps {steps}")
    print(f"model {cfg.model.path}" + (f", LoRA {lora}" if lora else "") + f", device {policy.device}, "
          f"{len(prompts)} prompt(s) x {args.images_per_prompt} seed(s) from {cfg.seed}, {s.num_steps} steps; {steering}")
    try:
        records = sample_all(policy, cfg, prompts, args, scored)
    except ValueError as exc:  # found mid-run (a reward's failure): one line; the images so far are kept
        print(f"error: {exc}", file=sys.stderr)
        return 1
    out = Path(args.out)
    atomic_write_text(out / "samples.jsonl", "".join(json.dumps(finite_json(r)) + "\n" for r in records))  # NaN: null
    settings = {"model": cfg.model.path, "lora": str(lora) if lora else None, "seed": cfg.seed,
                "images_per_prompt": args.images_per_prompt, "keep": args.keep, "prompts": prompts,
                "sampling": dataclasses.asdict(s), "steer": dataclasses.asdict(st),
                "reward": dataclasses.asdict(cfg.reward) if st.kind == "fk" else None}
    atomic_write_text(out / "sample.json", json.dumps(finite_json(settings), indent=2, allow_nan=False) + "\n")
    summary = ""
    if st.kind == "fk":
        rewards = [r["reward"] for r in records if r["reward"] == r["reward"]]
        summary = (f"; mean {cfg.reward.name} of the written images {sum(rewards) / len(rewards):.4f}" if rewards
                   else f"; warning: no written image has a finite {cfg.reward.name} score")
    print(f"wrote {len(records)} images and {len(prompts)} grids to {out}{summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
