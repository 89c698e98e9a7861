"""``python -m b2fast.bench <suite> [options]``: speed benchmarks.

    python -m b2fast.bench kernels                          # SD shapes on the default device
    python -m b2fast.bench kernels --large --json k.json    # also a >= 1 GB batch; raw records
    python -m b2fast.bench kernels --device cpu --quick     # tiny shapes, a few repeats (tests)
    python -m b2fast.bench kernels --help                   # the suite's options
    python -m b2fast.bench rewards                          # images/s of each reward, full-size models
    python -m b2fast.bench rewards --quick --device cpu     # tiny models, seconds (tests)
    python -m b2fast.bench sample                           # branch sampling, SD 1.x random weights
    python -m b2fast.bench train --train.micro_batch 16     # LoRA PPO update; any config override
    python -m b2fast.bench stage --full --json stage.json   # seconds per stage, plus a real stage
    python -m b2fast.bench objectives --quick --device cpu  # update seconds per train.objective
    python -m b2fast.bench steer --quick --device cpu       # FK steering's seconds beyond its UNet calls
    python -m b2fast.bench lcm                              # a B² stage: toy LCM (4 steps) vs toy DDIM
    python -m b2fast.bench lcm --model sd --sampling.batches_per_stage 4   # SD 1.x shapes (GPU)
    python -m b2fast.bench all --quick --device cpu         # every suite in turn, tiny models

Every figure is a ratio against a baseline timed in the same run (the plain-PyTorch reference,
the PIL preprocessing or the eager batch-P / batch-2 loops of the research scripts) and a unit
against a ceiling measured in the same run (GB/s against the device's copy bandwidth, TFLOP/s
against a dense matmul), as docs/algorithm.md, "Measuring speed", says. Results go to stdout
as a Markdown table, progress to stderr, raw records to ``--json``. Bad arguments stop before
anything is measured, with a one-line message naming the argument (exit code 2). The SD suites
(sample, train, stage, objectives, steer, lcm, all) also take any config field of ``python -m b2fast.train`` as
``--section.field value``.

This module only parses and checks arguments (it imports no torch, so ``--help`` is instant);
each suite's measuring code lives in its own module, imported when the suite runs.
"""
from __future__ import annotations

import argparse
import importlib
import re
import sys

from b2fast.utils import (DEVICE_NAMES, ArgumentError, OneLineParser, is_device_name, one_line_warnings, require,
                          stop_on_interrupt)

# suite → (module with ``measure(args) -> JSON document`` and ``format_report(document) -> text``,
# or ``run(args)`` for a suite of suites; one-line summary)
SUITES = {
    "kernels": ("b2fast.bench.kernels",
                "time, GB/s, %% of copy bandwidth and speed-up vs the torch reference of the "
                "DDIM step, log-prob (fwd, fwd+bwd), branch-fork and fork-by-index ops on every "
                "live backend"),
    "rewards": ("b2fast.bench.rewards",
                "images/s, s per 1,280 images, TFLOP/s and speed-up vs PIL preprocessing of each "
                "reward (clipscore ViT-H-14, aesthetic, bertscore, jpeg) on full-size random-weight "
                "models"),
    "sample": ("b2fast.bench.sample",
               "images/s, UNet TFLOP/s, %% of the model-dtype matmul ceiling, peak GiB and speed-up vs the "
               "per-branch batch-P loop of branch sampling and VAE decoding, SD 1.x random weights"),
    "train": ("b2fast.bench.train",
              "(trajectory, step) pairs/s, TFLOP/s, %% of ceiling, peak GiB and speed-up vs batch-2 "
              "accumulation of the LoRA PPO update, SD 1.x random weights"),
    "stage": ("b2fast.bench.stage",
              "seconds per stage (sampling, reward, training) at the reference settings, composed "
              "from parts measured in the same run, b2fast vs baseline; --full runs a real stage"),
    "objectives": ("b2fast.bench.objectives",
                   "seconds of one stage's policy update per train.objective (ppo, d3po, dro, dro_unpaired, "
                   "diffusion_dpo) on the same synthetic stage, the base-model reference pass apart"),
    "steer": ("b2fast.bench.steer",
              "seconds of FK steering (fk_sample) vs plain sampling of the same P x N images, and the "
              "overhead's decode and reward parts at the potential steps, SD 1.x random weights"),
    "lcm": ("b2fast.bench.lcm",
            "seconds of a real B² stage on an LCM policy (K steps, no CFG batch) vs the DDIM policy at "
            "equal images, UNet rows per image, speed-up; the toy models (CPU) or SD 1.x shapes"),
    "all": ("b2fast.bench.all", "kernels, rewards, sample, train and stage in turn"),
}
LCM_MODELS = ("toy", "sd")
SD_SUITES = ("sample", "train", "stage", "objectives", "steer", "lcm", "all")  # take config overrides
DTYPE_ALIASES = {"float32": "float32", "fp32": "float32", "float16": "float16",
                 "fp16": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16",
                 "float64": "float64", "fp64": "float64"}
KERNEL_CASES = ("ddim_step_with_logprob", "ddim_logprob_fwd", "ddim_logprob_fwd_bwd",
                "branch_fork", "fork_index")
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
  fork_index              (B, C, H, W) -> (B, C, H, W) rows picked by B random indices (resampling)

on every backend live on the device. Bytes are what a fused kernel must move: every tensor
the op reads counted once in its dtype, every tensor it writes counted once; the same count
for every backend (see b2fast.bench.kernels). Time: median over --repeats calls after
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
calls; CUDA events on cuda, time.perf_counter on cpu (see b2fast.bench.rewards)."""


SD_HELP = """\
{what}

Models: SD 1.x with random weights (UNet 860M, VAE, CLIP ViT-L/14 text encoder; no downloads),
saved in the model dtype (model.dtype, float16 by default) and loaded through b2fast.core.policy.Policy
as a user's checkpoint is; --quick uses the tiny test model and tiny settings instead (CPU,
seconds). Settings come from the config, defaults being the reference ones (8 prompts x 5
branches, 20 DDIM steps, intervals schedule.min_interval and schedule.max_interval = 14 and 20,
train.micro_batch 8, 2 epochs); override any field as --section.field VALUE, e.g.
--model.dtype float16 --train.micro_batch 16 --sampling.unet_batch 40 (python -m b2fast.train
--help lists every field; model.path and reward.* are not allowed: the suite builds its own
models). b2fast runs with the model section as given (fast paths included); the baseline loads its
own policy with the model's path, dtype and LoRA only, attention on PyTorch SDPA and every other
field at its default (eager).

TFLOP/s: FLOPs counted by torch.utils.flop_counter.FlopCounterMode on one untimed call of the
timed function (2 FLOPs per multiply-add of matmuls, convolutions and attention; backward
included in training), against a dense matmul in the model dtype (cuda; float32 on cpu) timed in
the same run. Time: median of --repeats calls after --warmup calls; CUDA events on cuda,
time.perf_counter on cpu. Peak GiB: torch.cuda.max_memory_allocated during the calls, weights
included (see b2fast.bench_{suite})."""
SAMPLE_WHAT = """\
Branch sampling of one batch (P prompts x K branches, decode included) at each interval L, and
VAE decoding of P*K latents:
  b2fast    sample_branches: trunk at batch P, fork, P*K branches in one UNet call per step,
            fused DDIM step + log-prob, decode of the whole batch
  baseline  the DDPO-style scripts: after the fork, a loop over the K branches, each at batch P
            (2P with CFG), plain-PyTorch DDIM step + log-prob, decode at batch P
Reported: images/s, UNet GFLOP per image, UNet TFLOP/s (its FLOPs over the time inside its
calls) and % of ceiling, peak GiB, speed-up vs baseline."""
TRAIN_WHAT = """\
One optimizer step of the LoRA PPO-clip update over --trajectories kept trajectories x L interval
steps (one epoch), on trajectories the model itself sampled, at each interval L:
  b2fast    b2fast.core.update.policy_update: train.micro_batch (trajectory, step) pairs per UNet
            forward+backward (2x with CFG; 0 = sized to the free GPU memory, as the trainer
            does), fused log-prob op, train.gradient_checkpointing as configured
  baseline  the DDPO-style scripts: 2 trajectories per call (4 with CFG), one timestep at a
            time, plain-PyTorch log-prob, gradient accumulation over the same optimizer step
Reported: pairs/s, GFLOP per pair, TFLOP/s of the call and % of ceiling, peak GiB, speed-up."""
STAGE_WHAT = """\
Seconds per stage at the config's settings (32 batches x 8 prompts x 5 branches = 1280 images,
intervals 14 and 20, 2 epochs), b2fast vs baseline, composed from parts measured in the same run
(or by the earlier suites of `all`): sampling = batches x the sample suite's ms per batch (decode
included); reward = images / clipscore ViT-H-14 images/s (the rewards suite, random weights;
baseline: PIL preprocessing); training = --kept trajectories x L x epochs x the train suite's ms
per pair; the parts are summed (a real stage overlaps decoding and scoring with sampling).
--full also runs real stages (Trainer.run_stage, b2fast only) and reports their measured seconds
and peak GiB."""
OBJECTIVES_HELP = """\
Seconds of one stage's policy update (policy_update, one epoch, train.micro_batch rows per UNet
call) for each train.objective: ppo, d3po, dro, dro_unpaired, diffusion_dpo, every other train
field as configured. All train the same synthetic stage, sampled by the model at each interval L
(schedule.min_interval and max_interval): --groups groups x sampling.branches branches, each
group's (best, worst) on random scores being its pair and its two kept trajectories (ppo,
dro_unpaired: 2 items per group; the pair objectives: 1 pair). Reported: update s, the base-model
reference pass inside it (reference s, once per stage, no grad, LoRA off), that pass in no-grad
forwards per kept trajectory and trained step, and the update's extra seconds and ratio vs ppo.

Model: SD 1.x with random weights saved in model.dtype (no downloads); --quick: the tiny test model
and tiny settings (CPU, seconds). Config overrides: --section.field VALUE (model.path and reward.*
not allowed). Time: median of --repeats calls after --warmup calls, time.perf_counter with the
device synchronised (see b2fast.bench.objectives)."""
ALL_WHAT = """\
kernels, rewards, sample, train and stage in turn, on one device, each with its default options
(--quick: every suite's quick mode); stage composes the parts the earlier suites measured.
--config and config overrides go to the SD suites (sample, train, stage). --json writes one
document with each suite's under "suites"."""
STEER_HELP = """\
Seconds of FK steering (b2fast.core.steering.fk_sample, the steer section as configured; steer.kind
is not read) against plain sampling (b2fast.core.sampling.generate) of the same P x N images in one
batch: P = sampling.prompts_per_batch prompts, N = steer.particles; the same UNet calls. Reported:
plain s, FK s, the overhead (FK - plain) and its share, its decode and reward seconds at the
potential steps (timed by wrappers during the same calls), the number of potential steps, and the
overhead per potential step per particle. Reward: clipscore on ViT-H-14 with random weights
(--model toy: toy_align on b2fast:toy).

Model: SD 1.x with random weights saved in model.dtype (no downloads); --quick: the tiny test model,
the tiny CLIP and tiny settings (CPU, seconds). Config overrides: --section.field VALUE, e.g.
--steer.particles 8 --steer.resample adaptive --sampling.num_steps 50 (model.path and reward.* not
allowed). Time: median of --repeats rounds (plain, then FK) after --warmup rounds, time.perf_counter
with the device synchronised (see b2fast.bench.steer)."""
LCM_HELP = """\
Seconds of real B² stages (Trainer.run_stage) on a latent consistency model's policy against the
DDIM policy of the same model, at equal images per stage and the same reward, selection and
training settings: ddim at sampling.num_steps steps with CFG and interval schedule.max_interval,
lcm at --lcm-steps K steps (one UNet pass per step, w as the guidance embedding) and interval K.
Reported per policy: sampling s (sampling, decoding, reward), training s (selection, update),
total s, kept trajectories, UNet rows per image in sampling and in training (a hook on the UNet),
peak GiB (cuda), and the LCM's speed-up per part.

Models (--model): toy (default) = b2fast:toy and b2fast:toy-lcm on toy_align with the toy_ddim
preset; sd = SD 1.x with random weights in model.dtype and the same weights plus a random
guidance embedding (LCMScheduler), clipscore ViT-H-14 with random weights. --quick: one batch per
stage (toy), the tiny test model, tiny CLIP and tiny settings (sd). Config overrides: --section.field
VALUE, to both policies (model.path and reward.* not allowed). Time: --warmup untimed stages, then
the median of --repeats timed stages (see b2fast.bench.lcm)."""
KEPT_FRACTION = 0.84  # kept trajectories per stage / (2 per branch group): ~430 of 512 at the reference
QUICK_CONFIG = [  # tiny settings of --quick (config overrides given on the command line win)
    "--model.dtype", "float32", "--sampling.num_steps", "6", "--sampling.prompts_per_batch", "2",
    "--sampling.branches", "3", "--sampling.batches_per_stage", "4", "--schedule.min_interval", "4",
    "--schedule.max_interval", "6", "--train.micro_batch", "4", "--train.trajectories_per_step", "8"]


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
                                     "(default: float16 on cuda, the default model.dtype; float32 on cpu)")
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


def _add_common_arguments(p: argparse.ArgumentParser, quick_help: str) -> None:
    add = p.add_argument
    add("--device", default="auto", help="'auto' (cuda if visible, else cpu), 'cpu', 'cuda' or "
                                         "'cuda:N' (default: %(default)s)")
    add("--quick", action="store_true", help=quick_help)
    add("--json", metavar="PATH", help="also write the header and raw records as JSON (atomically)")


def _add_config_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="YAML",
                   help="start from this preset instead of the built-in defaults (e.g. "
                        "b2fast/configs/sd15_24gb.yaml); its model.path, device and reward are replaced "
                        "by the suite's own")


def _add_sd_arguments(p: argparse.ArgumentParser, suite: str) -> None:
    add = p.add_argument
    add("--warmup", type=_positive, metavar="N", help="untimed calls first (default: 1)")
    add("--repeats", type=_positive, metavar="N", help="timed calls; the median is reported "
                                                       "(default: 3 cuda, 2 cpu)")
    if suite == "objectives":
        add("--groups", type=_positive, metavar="G",
            help="branch groups of the synthetic stage, 2 kept trajectories each (default: "
                 "sampling.prompts_per_batch, one sampling batch)")
    if suite == "steer":
        add("--model", choices=LCM_MODELS, default="sd",
            help="sd: SD 1.x shapes, random weights, clipscore ViT-H-14; toy: the toy world, b2fast:toy "
                 "(toy_ddim preset: 20 DDIM steps, CFG) scored by toy_align, no decoder (default: %(default)s)")
    if suite == "lcm":
        add("--model", choices=LCM_MODELS, default="toy",
            help="toy: b2fast:toy vs b2fast:toy-lcm; sd: SD 1.x shapes, random weights (default: %(default)s)")
        add("--lcm-steps", type=_positive, default=4, metavar="K", help="LCM sampling steps (default: %(default)s)")
    if suite in ("train", "stage"):
        add("--trajectories", type=_positive, metavar="T",
            help="kept trajectories per timed training call, T x L pairs (default: 8 cuda, 4 cpu, 2 quick)")
    if suite == "stage":
        add("--kept", type=_positive, metavar="N",
            help="kept trajectories per stage in the composed stage (default: 84%% of the 2 per "
                 "branch group that selection can keep: 430 of 512 at the reference 256 groups)")
        add("--full", action="store_true",
            help="also run one real stage per interval (Trainer.run_stage, b2fast only, after a "
                 "warm-up) and report its measured seconds; minutes per stage on full-size models")
    _add_config_argument(p)
    quick = (f"the tiny test model (b2fast.testing.tiny_sd) and tiny settings: {' '.join(QUICK_CONFIG)}; 1 "
             "warm-up, 2 repeats (explicit options and overrides still win)")
    _add_common_arguments(p, f"--model toy: one batch per stage; --model sd: {quick}" if suite == "lcm" else quick)
    p.epilog = "config overrides: --section.field VALUE, any field of python -m b2fast.train --help"


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m b2fast.bench", formatter_class=argparse.RawDescriptionHelpFormatter,
                        description=__doc__.split("\n\n")[2],
                        epilog="examples:\n" + __doc__.split("\n\n")[1])
    sub = p.add_subparsers(dest="suite", metavar="SUITE", required=True,
                           parser_class=OneLineParser)
    kernels = sub.add_parser("kernels", help=SUITES["kernels"][1], description=KERNELS_HELP,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_kernels_arguments(kernels)
    rewards = sub.add_parser("rewards", help=SUITES["rewards"][1], description=REWARDS_HELP,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_rewards_arguments(rewards)
    for suite, what in (("sample", SAMPLE_WHAT), ("train", TRAIN_WHAT), ("stage", STAGE_WHAT)):
        sd = sub.add_parser(suite, help=SUITES[suite][1], description=SD_HELP.format(what=what, suite=suite),
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        _add_sd_arguments(sd, suite)
    objectives = sub.add_parser("objectives", help=SUITES["objectives"][1], description=OBJECTIVES_HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_sd_arguments(objectives, "objectives")
    lcm = sub.add_parser("lcm", help=SUITES["lcm"][1], description=LCM_HELP,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_sd_arguments(lcm, "lcm")
    steer = sub.add_parser("steer", help=SUITES["steer"][1], description=STEER_HELP,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_sd_arguments(steer, "steer")
    every = sub.add_parser("all", help=SUITES["all"][1], description=ALL_WHAT,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_config_argument(every)
    _add_common_arguments(every, "every suite's --quick: tiny models and settings (a CPU, seconds)")
    p.suites = sub.choices  # each suite's parser, for its own errors
    return p


def _check_device(name: str) -> None:
    require(is_device_name(name), "--device", name, DEVICE_NAMES)


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


def suite_config(quick: bool, overrides: list[str], preset: str | None = None, toy: bool = False):
    """The validated config of an SD suite: the defaults (or ``preset``; ``toy``: the built-in
    default of ``python -m b2fast.train``), then --quick's, then the command line's overrides."""
    from b2fast.config import Config, apply_overrides, load_yaml, presets_dir, validate

    for arg in overrides:
        key = arg[2:].partition("=")[0] if arg.startswith("--") else ""
        if key == "model.path" or key.startswith("reward."):
            raise ArgumentError(f"--{key}: not allowed here; the benchmark builds its own random-weight "
                                "models (SD 1.x, clipscore ViT-H-14)")
    if toy:
        preset = preset or str(presets_dir() / "toy_ddim.yaml")
    cfg = load_yaml(preset) if preset else Config()
    if quick:
        apply_overrides(cfg, ["--sampling.batches_per_stage", "1"] if toy else QUICK_CONFIG)
    return validate(apply_overrides(cfg, overrides))


def validate_sd(a: argparse.Namespace) -> argparse.Namespace:
    """Checks argparse cannot express; the intervals measured: the schedule's first and last."""
    _check_device(a.device)
    a.intervals = sorted({a.cfg.schedule.min_interval, a.cfg.schedule.max_interval})
    if a.suite == "stage" and a.kept is None:  # 430 of the 512 a reference stage can keep
        groups = a.cfg.sampling.batches_per_stage * a.cfg.sampling.prompts_per_batch
        a.kept = max(1, round(KEPT_FRACTION * 2 * groups))
    if a.suite == "lcm" and a.lcm_steps < 2:
        raise ArgumentError(f"--lcm-steps: got {a.lcm_steps}, expected >= 2 (an LCM's last step is "
                            "deterministic, so one step leaves nothing to train)")
    return a


VALIDATORS = {"kernels": validate_kernels, "rewards": validate_rewards, "sample": validate_sd,
              "train": validate_sd, "stage": validate_sd, "objectives": validate_sd,
              "steer": validate_sd, "lcm": validate_sd, "all": validate_sd}


def parse_args(argv: list[str]) -> argparse.Namespace:
    """argv → checked options; the SD suites' unrecognised arguments are config overrides
    (``args.overrides``, applied in ``args.cfg``), any other suite's are an error."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if args.suite in SD_SUITES:
        args.overrides = extra
        args.cfg = suite_config(args.quick, extra, args.config, toy=getattr(args, "model", None) == "toy")
    elif extra:  # the suite's parser names the closest of its own options
        parser.suites[args.suite].error(f"unrecognized arguments: {' '.join(extra)}")
    if args.json:  # before anything is measured: a long run must not end unable to write its records
        from b2fast.utils import check_writable
        check_writable(args.json, "--json")
    return VALIDATORS[args.suite](args)


def run_suite(name: str, args: argparse.Namespace) -> tuple[dict, str, int]:
    """(JSON document, Markdown report, exit code: 1 if any record failed, else 0)."""
    module = importlib.import_module(SUITES[name][0])
    if hasattr(module, "run"):  # ``all``: runs the others
        return module.run(args)
    doc = module.measure(args)
    return doc, module.format_report(doc), int(any("error" in r for r in doc["records"]))


@stop_on_interrupt("no table was written")
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    one_line_warnings()
    try:
        args = parse_args(argv)
        records, report, code = run_suite(args.suite, args)
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
