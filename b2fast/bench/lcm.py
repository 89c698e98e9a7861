"""The ``lcm`` suite of ``python -m b2fast.bench``: a B² stage on an LCM policy vs the DDIM policy.

Both policies run real stages (``Trainer.run_stage``) one after the other in the same process,
with the same images per stage (``sampling.batches_per_stage`` × ``prompts_per_batch`` ×
``branches``), reward, selection and training settings; only the policy differs:

* **ddim**: the model's DDIM policy, ``sampling.num_steps`` steps with CFG (a conditional and an
  unconditional UNet row per image and step), every stage at ``schedule.max_interval``;
* **lcm**: its latent consistency model, ``--lcm-steps`` K steps, one UNet row per image and step
  (w is the guidance embedding), every stage at interval K (the deterministic last step is never
  trained, so K − 1 trained steps).

Models: ``toy`` (default): ``b2fast:toy`` and ``b2fast:toy-lcm`` on ``toy_align``, from the
``toy_ddim`` preset (the 20-step DDIM toy run). ``sd``: SD 1.x with random weights in ``model.dtype``
and the same weights with a random guidance embedding and an ``LCMScheduler``, scored by clipscore
on ViT-H-14 with random weights (shapes and speed, not images). ``--quick``: one batch per stage
(toy), the tiny test model and tiny CLIP (sd).

Per policy: ``--warmup`` untimed stages, then ``--repeats`` timed stages, the one of median total
seconds reported with its parts as the trainer times them (sampling: sampling, decoding and
reward; training: selection and the update), the kept trajectories, and the UNet rows per image
(counted by a hook on the UNet: rows run without gradient in sampling, with gradient in
training). The LCM's speed-up is the DDIM stage's seconds over its own, per part and in total.

JSON (``--json``): the header fields of the SD suites, ``settings`` {``models``, ``images``,
``lcm_steps``} and ``records``, one per policy: ``policy``, ``model``, ``steps``, ``interval``,
``trained_steps``, ``images``, ``sampling_s``, ``training_s``, ``total_s``, ``kept``,
``sampling_rows_per_image``, ``training_rows_per_image``, ``peak_gib`` (cuda) and, on the lcm
record, ``speedup_vs_ddim`` {``sampling``, ``training``, ``total``} — or ``error`` (one line).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import tempfile

import torch

from b2fast.bench import sd as bench_sd
from b2fast.bench.sd import cell, progress

LCM_COND_DIM = 256  # the guidance-embedding width of LCM-distilled SD 1.5 UNets
TOY_MODELS = ("b2fast:toy", "b2fast:toy-lcm")


def _models(args, scratch: str) -> tuple[str, str, list[str]]:
    """(DDIM folder, LCM folder, reward overrides) of ``--model``."""
    if args.model == "toy":
        return TOY_MODELS[0], TOY_MODELS[1], []
    from b2fast.testing.lcm import copy_as_lcm
    from b2fast.testing.tiny_clip import register_tiny_clip

    ddim = bench_sd.model_folder(args.cfg, args.quick)
    progress("adding a guidance embedding (the LCM)")
    lcm = str(copy_as_lcm(ddim, f"{scratch}/lcm", LCM_COND_DIM))
    clip = register_tiny_clip() if args.quick else "ViT-H-14"
    return ddim, lcm, ["--reward.name", "clipscore", "--reward.options", f"{{model_name: {clip}, pretrained: null}}"]


def stage_config(args, policy: str, path: str, reward: list[str], out: str):
    """The config of one policy's stages: the suite's, its model, a constant interval, nothing logged."""
    from b2fast.config import apply_overrides, validate

    stages = args.warmup + args.repeats
    common = ["--model.path", path, "--out", out, "--schedule.kind", "constant", "--schedule.num_stages",
              str(stages), "--log.progress", "false", "--log.samples", "false", "--log.grid_every", "0",
              "--eval.enabled", "false", "--checkpoint_every", str(10 ** 9), *reward]
    if policy == "lcm":
        k = str(args.lcm_steps)
        common += ["--sampling.scheduler", "lcm", "--sampling.num_steps", k, "--schedule.min_interval", k,
                   "--schedule.max_interval", k]
    else:
        common += ["--schedule.min_interval", str(args.cfg.schedule.max_interval)]
    return validate(apply_overrides(copy.deepcopy(args.cfg), common))


class RowCounter:
    """Counts the UNet's input rows, split by whether autograd records them (training) or not."""

    def __init__(self, unet: torch.nn.Module):
        self.rows = {"sampling": 0, "training": 0}
        self.handle = unet.register_forward_pre_hook(self._count)

    def _count(self, module, inputs) -> None:
        self.rows["training" if torch.is_grad_enabled() else "sampling"] += int(inputs[0].shape[0])

    def reset(self) -> None:
        self.rows = {"sampling": 0, "training": 0}


def measure_policy(args, policy: str, path: str, reward: list[str], device: torch.device) -> dict:
    """Warm-up stages, then the timed ones; the record of the median-total stage."""
    from b2fast.run.trainer import Trainer

    with tempfile.TemporaryDirectory(prefix="b2fast-bench-lcm-") as out:
        cfg = stage_config(args, policy, path, reward, out)
        progress(f"{policy}: loading the trainer ({path})")
        trainer = Trainer(cfg)
        counter = RowCounter(trainer.policy.unet)
        timed = []
        for stage in range(cfg.schedule.num_stages):
            counter.reset()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            result = trainer.run_stage(stage)
            warm = stage >= args.warmup
            progress(f"{policy}: stage {stage}{'' if warm else ' (warm-up)'} {cell(result['seconds'])} s")
            if warm:
                peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
                timed.append((result, dict(counter.rows), peak))
        counter.handle.remove()
    median = statistics.median_low([r["seconds"] for r, _, _ in timed])
    result, rows, peak = next(t for t in timed if t[0]["seconds"] == median)
    images = result["n_images"]
    return {"policy": policy, "model": path, "steps": cfg.sampling.num_steps, "interval": result["interval_len"],
            "trained_steps": result["trained_steps"], "images": images,
            "sampling_s": result["seconds_sampling"], "training_s": result["seconds_training"],
            "total_s": result["seconds"], "kept": result["n_selected"],
            "sampling_rows_per_image": rows["sampling"] / images, "training_rows_per_image": rows["training"] / images,
            "peak_gib": peak}


def _add_speedup(records: list[dict]) -> None:
    ddim, lcm = records
    if "error" in ddim or "error" in lcm:
        return
    lcm["speedup_vs_ddim"] = {part: ddim[f"{part}_s"] / lcm[f"{part}_s"] if lcm[f"{part}_s"] > 0 else None
                              for part in ("sampling", "training", "total")}


def measure(args: argparse.Namespace) -> dict:
    """Run the suite; the JSON document (header and records) described in the module doc."""
    device = bench_sd.start(args)
    with tempfile.TemporaryDirectory(prefix="b2fast-bench-lcm-models-") as scratch:
        ddim, lcm, reward = _models(args, scratch)
        records = []
        for policy, path in (("ddim", ddim), ("lcm", lcm)):
            records.append(bench_sd.guarded(f"{policy} stage", lambda: measure_policy(
                args, policy, path, reward, device), device))
            records[-1].setdefault("policy", policy)
            bench_sd.free(device)  # the trainer, gone with its frame
    _add_speedup(records)
    s = args.cfg.sampling
    model = "toy (b2fast:toy, b2fast:toy-lcm)" if args.model == "toy" else bench_sd.MODELS[args.quick]
    preset = args.config or ("b2fast/configs/toy_ddim.yaml" if args.model == "toy" else None)
    return {**bench_sd.header("lcm", args, device), "model": model, "preset": preset,
            "settings": {"models": args.model, "lcm_steps": args.lcm_steps,
                         "images": s.batches_per_stage * s.prompts_per_batch * s.branches},
            "records": records}


def format_report(doc: dict) -> str:
    """The Markdown table under the common header lines."""
    s = doc["settings"]
    lines = bench_sd.header_lines(doc, f"{s['images']} images per stage, LCM K = {s['lcm_steps']}") + [
        "stages: Trainer.run_stage; sampling s = sampling, decoding and reward; training s = selection and "
        "update; UNet rows per image counted by a hook (sampling: no grad, training: grad)", "",
        "| policy | steps | L | trained | images | sampling s | training s | total s | kept | "
        "UNet rows/img sampling | training | peak GiB | × vs ddim (sampling, training, total) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in doc["records"]:
        if "error" in r:
            lines.append(f"| {r['policy']} | failed: {r['error'][:100]} | | | | | | | | | | | |")
            continue
        up = r.get("speedup_vs_ddim")
        speed = "1 (baseline)" if r["policy"] == "ddim" else (
            "-" if up is None else ", ".join(cell(up[k]) for k in ("sampling", "training", "total")))
        lines.append(f"| {r['policy']} | {r['steps']} | {r['interval']} | {r['trained_steps']} | {r['images']} | "
                     f"{cell(r['sampling_s'])} | {cell(r['training_s'])} | {cell(r['total_s'])} | {r['kept']} | "
                     f"{cell(r['sampling_rows_per_image'])} | {cell(r['training_rows_per_image'])} | "
                     f"{cell(r['peak_gib'])} | {speed} |")
    return "\n".join(lines)
