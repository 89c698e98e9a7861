"""``python -m b2fast.train``: run B²-DiffuRL.

    python -m b2fast.train                                # the built-in default preset
    python -m b2fast.train --config my.yaml --out runs/x  # a preset file (see b2fast/configs/)
    python -m b2fast.train --config my.yaml --train.lr 3e-4 --sampling.branches 4
    python -m b2fast.train --resume runs/x                # continue a killed run
    torchrun --nproc-per-node 4 -m b2fast.train --config my.yaml   # one process per GPU

Every config field can be overridden as ``--section.field value``; ``--help`` lists them all.
Bad values stop the run before any model loads, with a one-line message naming the field.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from b2fast.config import Config, ConfigError, apply_overrides, iter_fields, load_yaml, presets_dir, validate
from b2fast.utils import one_line_warnings, option_hint, stop_on_interrupt

DEFAULT_PRESET = "default.yaml"


def _what_is_kept(out: str) -> str:
    """How a stopped run goes on: from its last checkpoint, or from the start (none written yet)."""
    if (Path(out) / "checkpoints" / "latest").is_file():
        return f"the last complete checkpoint is kept: continue with --resume {out}"
    return "no checkpoint was written yet: start again with the same command"


def _parser() -> argparse.ArgumentParser:
    fields = "\n".join(f"  --{name} (default: {default!r})\n      {help}" for name, default, help in iter_fields())
    return argparse.ArgumentParser(
        prog="python -m b2fast.train", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fine-tune a text-to-image diffusion model with B²-DiffuRL (LoRA, PPO-clip, "
                    "branch sampling, backward progressive training).",
        epilog="examples:\n" + __doc__.split("\n\n")[1] +  # the usage lines of the module docstring
               "\n\nconfig fields (override any as --section.field VALUE). The defaults shown are the paper's\n"
               f"reference settings; without --config, the built-in {DEFAULT_PRESET} (the toy world) sets\n"
               f"several of them first (see b2fast/configs/{DEFAULT_PRESET}):\n{fields}")


def _refuse_mistyped_options(parser: argparse.ArgumentParser, overrides: list[str]) -> None:
    """``--resme`` is neither a config field nor an option: name the option it is close to (config
    fields get their own hint when the overrides are applied)."""
    fields = {f"--{name}" for name in vars(Config())}
    for flag in (arg.partition("=")[0] for arg in overrides if arg.startswith("--") and "." not in arg):
        hint = option_hint(parser, flag) if flag not in fields else ""
        if hint:
            raise ConfigError(f"{flag}: unknown option{hint}")


def parse_config(argv: list[str]):
    """argv → (validated Config, resume path or None). Raises ConfigError on bad input."""
    parser = _parser()
    parser.add_argument("--config", help="YAML config file, or a shipped preset's name (e.g. sd15_clipscore; "
                                         f"default: the built-in {DEFAULT_PRESET})")
    parser.add_argument("--out", help="output directory (same as --out in the config)")
    parser.add_argument("--resume", metavar="DIR", help="run folder or checkpoint folder to continue from")
    args, overrides = parser.parse_known_args(argv)
    _refuse_mistyped_options(parser, overrides)
    if args.out is not None and not args.out.strip():
        raise ConfigError("--out: empty; give an output folder")
    run = run_folder(args.resume) if args.resume else None  # a run folder, when it is one
    if args.config:
        config_file = Path(args.config)
    elif run is not None and (run / "config.yaml").is_file():
        config_file = run / "config.yaml"  # continue with the run's own config
    else:
        config_file = presets_dir() / DEFAULT_PRESET
    try:
        cfg = load_yaml(config_file)
    except ConfigError as exc:  # the run's own config.yaml: the user gave --resume, not --config
        if args.config or run is None:
            raise
        raise ConfigError(f"--resume: the run's {str(exc).removeprefix('--config: ')}; repair it, or give "
                          "--config with the run's settings") from None
    apply_overrides(cfg, overrides)
    if args.out:
        cfg.out = args.out
    elif run is not None:
        cfg.out = str(run)  # a resumed run goes on writing into its own folder
    return validate(cfg), args.resume


def run_folder(resume: str) -> Path | None:
    """The run folder of ``--resume``: the folder itself when it holds ``checkpoints/``, or the run
    above a checkpoint folder (``RUN/checkpoints/stage-NNNNNN``); None for a lone checkpoint."""
    path = Path(resume)
    if path.parent.name == "checkpoints":
        return path.parent.parent
    return path if (path / "checkpoints").is_dir() else None


def _error(message: str) -> None:
    """One line on stderr; under torchrun it says which rank (``rank i/W:``) unless it does."""
    rank, size = os.environ.get("RANK", "0"), int(os.environ.get("WORLD_SIZE", "1"))
    prefix = f"rank {rank}/{size}: " if size > 1 and not message.startswith("rank ") else ""
    print(f"error: {prefix}{message}", file=sys.stderr)


@stop_on_interrupt("nothing was written yet")  # once training runs, main says what is kept
def main(argv: list[str] | None = None) -> int:
    """``python -m b2fast.train``: the exit code (0 done, 1 stopped by a failure, 2 bad input, 130
    interrupted: Ctrl-C or SIGTERM)."""
    argv = sys.argv[1:] if argv is None else argv
    one_line_warnings()
    try:
        cfg, resume = parse_config(argv)
    except ConfigError as exc:  # the same on every rank: rank 0 says it
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {exc}", file=sys.stderr)
        return 2
    from b2fast import backends, distributed, ops
    from b2fast.run.trainer import Trainer

    try:
        world = distributed.world_from_env()
        if cfg.backend != "auto":  # else B2FAST_BACKEND, if set, or the best available per op
            ops.set_backend(cfg.backend, by="the config field `backend`",
                            device=distributed.resolve_device(cfg.device, world))
    except (RuntimeError, ValueError) as exc:  # a bad launch environment, backend or device
        _error(str(exc))
        return 2
    if world.is_main:
        print(f"b2fast: backends {backends()}" + (f", {world.size} ranks" if world.distributed else ""))
    try:
        try:
            trainer = Trainer(cfg, resume=resume)
        except ValueError as exc:  # bad model path, reward, prompts or checkpoint: one line, no traceback
            _error(str(exc))
            return 2
        trainer.run()
    except distributed.CollectiveError as exc:  # another rank failed: say so in one line, do not hang
        _error(str(exc))
        return 1
    except ValueError as exc:  # found mid-run (a reward's failure, diverged weights): one line
        _error(f"{exc}; {_what_is_kept(cfg.out)}")
        return 1
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (a scheduler's stop, `timeout`)
        if world.is_main:
            print(f"interrupted; {_what_is_kept(cfg.out)}", file=sys.stderr)
        return 130
    finally:
        distributed.shutdown()
    if world.is_main:
        print(f"done: metrics, images, checkpoints and LoRA weights in {cfg.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
