"""``python -m b2fast.bench <suite> [options]``: speed benchmarks (DESIGN §5).

    python -m b2fast.bench kernels                          # SD shapes on the default device
    python -m b2fast.bench kernels --large --json k.json    # also a >= 1 GB batch; raw records
    python -m b2fast.bench kernels --device cpu --quick     # tiny shapes, a few repeats (tests)
    python -m b2fast.bench kernels --help                   # the suite's options
    python -m b2fast.bench rewards                          # images/s of each reward, full-size models
    python -m b2fast.bench rewards --quick --device cpu     # tiny models, seconds (tests)

Every figure is a ratio against a baseline timed in the same run (the plain-PyTorch reference,
the PIL preprocessing of the research scripts) and a unit against a ceiling measured in the same
run (GB/s against the device's copy bandwidth, TFLOP/s against a dense matmul). Results go to
stdout as a Markdown table, progress to stderr, raw records to ``--json``. Bad arguments stop
before anything is measured, with a one-line message naming the argument (exit code 2).

This module only parses and checks arguments (it imports no torch, so ``--help`` is instant);
each suite's measuring code lives in its own module, imported when the suite runs.
"""
from __future__ import annotations

import argparse
import importlib
import re
import sys

# suite → (module with ``run(args) -> (JSON document, report text, exit code)``, one-line summary)
SUITES = {
    "kernels": ("b2fast.bench_kernels",
                "time, GB/s, %% of copy bandwidth and speed-up vs the torch reference of the "
                "DDIM step, log-prob (fwd, fwd+bwd) and branch-fork ops on every live backend"),
    "rewards": ("b2fast.bench_rewards",
                "images/s, s per 1,280 images, TFLOP/s and speed-up vs PIL preprocessing of each "
                "reward (clipscore ViT-H-14, aesthetic, bertscore, jpeg) on full-size random-weight "
                "models"),
}
DTYPE_ALIASES = {"float32": "float32", "fp32": "float32", "float16": "float16",
                 "fp16": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16",
                 "float64": "float64", "fp64": "float64"}
KERNEL_CASES = ("ddim_step_with_logprob", "ddim_logprob_fwd", "ddim_logprob_fwd_bwd",
                "branch_fork")
SD_SHAPE = (40, 4, 64, 64)         # one ε half: 8 prompts × 5 branches, SD 1.x 64×64 latents
LARGE_SHAPE = (2560, 4, 128, 128)  # step 2.0 GB, log-prob fwd 1.3 GB: launch cost vanishes
QUICK_SHAPE = (10, 4, 16, 16)
KERNELS_HELP = """\
Time per call, achieved GB/s, GB/s as % of the copy bandwidth measured in the same run, and
speed-up vs the eager torch reference measured in the same run, for each case

  ddim_step_with_logprob  sampling step: reads eps_u, eps_c, x_t, noise; writes x_prev, log p
  ddim_logprob_fwd        training log-prob forward: reads eps_u, eps_c, x_t, x_prev; writes log p
  ddim_logprob_fwd_bwd    forward, then the gradient w.r.t. both eps halves
  branch_fork             (B/K, C, H, W) -> (B, C, H, W) in the cache dtype, plus group ids

on every backend live on the device. Bytes are what a fused kernel must move: every tensor
the op reads counted once in its dtype, every tensor it writes counted once; the same count
for every backend (see b2fast.bench_kernels). Time: median over --repeats calls after
--warmup calls; CUDA events with the L2 cache flushed before each call on cuda,
time.perf_counter on cpu."""
REWARD_CASES = ("clipscore", "aesthetic", "bertscore", "jpeg")
BLIP_SIZES = ("base", "large")
REWARDS_HELP = """\
Images/s, seconds per 1,280 images (one stage), GFLOP per image, TFLOP/s (and % of a float32
matmul timed in the same run), peak CUDA memory and speed-up vs the research scripts' PIL
preprocessing (same models, timed in the same run) of each reward, built with build_reward on
the full-size architecture with random weights (no downloads):

  clipscore  OpenCLIP ViT-H-14 (laion2b_s32b_b79k's architecture)
  aesthetic  OpenCLIP ViT-L-14 + the LAION MLP head
  bertscore  BLIP-base captioner (--blip large: the reward's default BLIP-large) + roberta-large
             layer 17; every caption runs to max_new_tokens (30): an upper bound
  jpeg       jpeg_compressibility, quality 95 (PIL on the CPU; no baseline)

--quick uses the tiny test models instead. Time: median over --repeats calls after --warmup
calls; CUDA events on cuda, time.perf_counter on cpu (see b2fast.bench_rewards)."""


class ArgumentError(ValueError):
    """A command-line argument is invalid; the message names it."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one 'error:' line from main, instead of usage + SystemExit
        raise ArgumentError(message)


def _shape(text: str) -> tuple[int, ...]:
    """'40x4x64x64' → (40, 4, 64, 64): batch of one ε half, then the latent's C, H, W."""
    parts = re.split(r"[x×,]", text.strip().lower())
    if len(parts) != 4 or not all(p.isdigit() and int(p) >= 1 for p in parts):
        raise argparse.ArgumentTypeError(f"got {text!r}, expected BxCxHxW of positive integers, "
                                         "e.g. 40x4x64x64")
    return tuple(int(p) for p in parts)


def _dtype(text: str) -> str:
    if text.lower() not in DTYPE_ALIASES:
        raise argparse.ArgumentTypeError(f"got {text!r}, expected one of "
                                         f"{', '.join(DTYPE_ALIASES)}")
    return DTYPE_ALIASES[text.lower()]


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"got {text!r}, expected an integer >= 1")
    return int(text)


def _add_kernels_arguments(p: argparse.ArgumentParser) -> None:
    add = p.add_argument
    add("--device", default="auto", help="'auto' (cuda if visible, else cpu), 'cpu', 'cuda' or "
                                         "'cuda:N' (default: %(default)s)")
    add("--dtype", type=_dtype, help="dtype of the ε halves, as the UNet returns them "
                                     "(default: bfloat16 on cuda, float32 on cpu)")
    add("--cache-dtype", type=_dtype, default="float16",
        help="dtype of the stored latents x_t, x_prev (default: %(default)s); noise is float32")
    add("--shapes", type=_shape, nargs="+", metavar="BxCxHxW",
        help="shapes of one ε half, replacing the defaults (SD: "
             f"{'x'.join(map(str, SD_SHAPE))} = 8 prompts x 5 branches, 64x64 latents)")
    add("--batch", type=_positive, metavar="B", help="replace the batch B of every shape")
    add("--large", action="store_true",
        help=f"also a synthetic batch {'x'.join(map(str, LARGE_SHAPE))} (>= 1 GB of traffic per "
             "step call), where launch overhead vanishes")
    add("--branches", type=_positive, default=5, metavar="K",
        help="branch_fork forks B // K trunks into K branches each (default: %(default)s)")
    add("--ops", nargs="+", choices=KERNEL_CASES, metavar="CASE",
        help=f"measure only these cases, of: {', '.join(KERNEL_CASES)} (default: all)")
    add("--backends", nargs="+", metavar="NAME",
        help="measure only these backends when live (cuda, triton, cpp); the torch reference is "
             "always measured, it is the baseline. Triton runs on the CPU only when named here "
             "and TRITON_INTERPRET=1 (default: every live backend, no triton on cpu)")
    add("--warmup", type=_positive, metavar="N",
        help="untimed calls first (default: 10 cuda, 3 cpu)")
    add("--repeats", type=_positive, metavar="N", help="timed calls; the median is reported "
                                                       "(default: 100 cuda, 20 cpu)")
    add("--copy-mib", type=_positive, metavar="MIB",
        help="size of the tensor copied to measure copy bandwidth (default: 1024 cuda, 256 cpu)")
    add("--quick", action="store_true",
        help=f"tiny defaults for tests: shape {'x'.join(map(str, QUICK_SHAPE))}, 1 warm-up, "
             "3 repeats, 16 MiB copy (explicit options still win)")
    add("--json", metavar="PATH", help="also write the header and raw records as JSON (atomically)")


def _add_rewards_arguments(p: argparse.ArgumentParser) -> None:
    add = p.add_argument
    add("--device", default="auto", help="'auto' (cuda if visible, else cpu), 'cpu', 'cuda' or "
                                         "'cuda:N' (default: %(default)s)")
    add("--rewards", nargs="+", choices=REWARD_CASES, metavar="REWARD",
        help=f"measure only these, of: {', '.join(REWARD_CASES)} (default: all)")
    add("--images", type=_positive, metavar="N",
        help="images per reward call (default: 128 cuda, 8 cpu, 4 quick; a stage scores 1280)")
    add("--image-size", type=_positive, metavar="PX",
        help="image side in pixels (default: 512, the SD 1.x decoder's output; 64 quick)")
    add("--batch-size", type=_positive, metavar="B",
        help="replace each reward's batch_size option, the images encoded at once (default: the "
             "reward's own: clipscore/aesthetic 32, bertscore 16)")
    add("--blip", choices=BLIP_SIZES, default="base",
        help="BLIP captioner size of bertscore (default: %(default)s; the reward's default is large)")
    add("--warmup", type=_positive, metavar="N", help="untimed calls first (default: 2 cuda, 1 cpu)")
    add("--repeats", type=_positive, metavar="N", help="timed calls; the median is reported "
                                                       "(default: 5 cuda, 3 cpu, 2 quick)")
    add("--quick", action="store_true",
        help="the tiny test models, 64x64 images, 4 per call, 1 warm-up, 2 repeats (explicit options "
             "still win)")
    add("--json", metavar="PATH", help="also write the header and raw records as JSON (atomically)")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m b2fast.bench", formatter_class=argparse.RawDescriptionHelpFormatter,
                description=__doc__.split("\n\n")[2],
                epilog="examples:\n" + __doc__.split("\n\n")[1])
    sub = p.add_subparsers(dest="suite", metavar="SUITE", required=True,
                           parser_class=_Parser)
    kernels = sub.add_parser("kernels", help=SUITES["kernels"][1], description=KERNELS_HELP,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_kernels_arguments(kernels)
    rewards = sub.add_parser("rewards", help=SUITES["rewards"][1], description=REWARDS_HELP,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_rewards_arguments(rewards)
    return p


def _check_device(name: str) -> None:
    if name not in ("auto", "cpu", "cuda") and re.fullmatch(r"cuda:\d+", name) is None:
        raise ArgumentError(f"--device: got {name!r}, expected 'auto', 'cpu', 'cuda' or 'cuda:N'")


def validate_kernels(a: argparse.Namespace) -> argparse.Namespace:
    """Checks argparse cannot express; fills the device-independent defaults."""
    _check_device(a.device)
    for name in a.backends or ():
        if name not in ("cuda", "triton", "cpp", "torch"):
            raise ArgumentError(f"--backends: got {name!r}, expected cuda, triton, cpp or torch")
    if a.shapes is None:
        a.shapes = [QUICK_SHAPE] if a.quick else [SD_SHAPE]
    if a.large:
        a.shapes.append(LARGE_SHAPE)
    if a.batch is not None:
        a.shapes = [(a.batch, *s[1:]) for s in a.shapes]
    a.ops = list(a.ops or KERNEL_CASES)
    return a


def validate_rewards(a: argparse.Namespace) -> argparse.Namespace:
    """Checks argparse cannot express; the rewards in the documented order, each once."""
    _check_device(a.device)
    a.rewards = [r for r in REWARD_CASES if r in (a.rewards or REWARD_CASES)]
    return a


VALIDATORS = {"kernels": validate_kernels, "rewards": validate_rewards}


def parse_args(argv: list[str]) -> argparse.Namespace:
    args = _parser().parse_args(argv)
    return VALIDATORS[args.suite](args)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parse_args(argv)
        suite = importlib.import_module(SUITES[args.suite][0])
        records, report, code = suite.run(args)
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    except ValueError as exc:  # bad argument, or one the device cannot serve (e.g. no CUDA)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(report)
    if args.json:
        import json

        from b2fast.utils import atomic_write_text
        atomic_write_text(args.json, json.dumps(records, indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
