"""The ``stage`` suite of ``python -m b2fast.bench``: seconds per stage, b2fast vs baseline.

A real stage on the full-size model takes minutes, so by default a stage is **composed** from
parts measured in the same run (by this suite, or by the earlier suites of ``all``), for each
interval length L of the config (14 and 20 by default) and each method:

* sampling = ``sampling.batches_per_stage`` × the sample suite's ms per batch of P prompts ×
  K branches at L (decoding included);
* reward = the stage's images (batches × P × K = 1,280) ÷ the rewards suite's clipscore images/s
  (OpenCLIP ViT-H-14 with random weights on 512² images; baseline: the research scripts' PIL
  preprocessing, same model);
* training = ``--kept`` trajectories × L × ``train.epochs`` × the train suite's ms per
  (trajectory, step) pair at L (an optimizer step per call of ``--trajectories`` trajectories
  rather than per 128: a few ms more per 128 trajectories). ``--kept`` is assumed, not measured:
  by default 84% of the 2 per branch group that selection can keep, 430 at the reference settings.

The parts are summed: decoding and scoring run after sampling, where a real stage overlaps them
with the next batch's sampling (``sampling.overlap_reward``). Selection, bookkeeping and logging
are left out (milliseconds). ``--full`` also runs, after a warm-up (one sampling batch and one
update), one real stage per interval with ``Trainer.run_stage`` (b2fast only: the config's
settings, clipscore ViT-H-14 with random weights, no checkpoints but the last stage's, no grids
or sample logs) and reports its measured seconds and peak CUDA memory, split by timing the
trainer's ``sample_stage`` (sampling, decoding and scoring, overlapped as configured); training
there includes selection, and its kept count is the one selection made on random rewards.

Reported per interval and method: sampling, reward, training and total seconds, kept
trajectories, and the speed-up of the total vs the baseline's (the measured stage: vs the
composed baseline training as many trajectories as selection kept).

JSON (``--json``): the header fields of the sample suite (no ``ceiling``), ``settings``
{``batches``, ``prompts``, ``branches``, ``images``, ``epochs``, ``kept``, ``intervals``},
``parts_from`` ("this suite" or "earlier suites of all"), ``parts`` {``sample``, ``train``:
their records; ``reward``: the clipscore record} and ``records``, one per interval × method ×
source: ``interval``, ``method``, ``source`` (composed, measured), ``sampling_s``, ``reward_s``
(measured: null, inside ``sampling_s``), ``training_s``, ``total_s``, ``kept``, ``peak_gib``
(measured rows on cuda, else null), ``speedup_vs_baseline``, and for measured rows ``stage`` (the
stage index run) — or ``error`` (one line): the run goes on and the exit code is 1.
"""
from __future__ import annotations

import argparse
import copy
import tempfile
import time

import torch

from b2fast.bench import rewards as bench_rewards, sample as bench_sample, sd as bench_sd, train as bench_train
from b2fast.bench.sd import cell, progress

PARTS = ("sample", "train", "rewards")


def measure_parts(args) -> tuple[dict, str]:
    """The sample, train and rewards documents: the earlier suites' under ``all``, else measured
    here with this suite's options (rewards: clipscore only, the rewards suite's defaults)."""
    earlier = getattr(args, "earlier", None) or {}
    if all(name in earlier for name in PARTS):
        return {name: earlier[name] for name in PARTS}, "earlier suites of all"
    from b2fast.bench.cli import parse_args

    reward_args = parse_args(["rewards", "--rewards", "clipscore", "--device", args.device]
                             + ["--quick"] * args.quick)
    return {"sample": bench_sample.measure(args), "train": bench_train.measure(args),
            "rewards": bench_rewards.measure(reward_args)}, "this suite"


def _find(records: list[dict], **keys) -> dict:
    return next((r for r in records if all(r.get(k) == v for k, v in keys.items())), {"error": "not measured"})


def compose(parts: dict, cfg, kept: int, intervals: list[int]) -> list[dict]:
    """One composed record per interval × method (see the module doc)."""
    s = cfg.sampling
    images = s.batches_per_stage * s.prompts_per_batch * s.branches
    clip = _find(parts["rewards"]["records"], reward="clipscore")
    records = []
    for L in intervals:
        for method in ("b2fast", "baseline"):
            sample = _find(parts["sample"]["records"], case="sample", interval=L, method=method)
            train = _find(parts["train"]["records"], interval=L, method=method)
            rate = clip.get("images_per_s" if method == "b2fast" else "baseline_images_per_s")
            record = {"interval": L, "method": method, "source": "composed", "kept": kept, "peak_gib": None}
            errors = [part["error"] for part in (sample, train, clip) if "error" in part]
            if errors or rate is None:
                records.append({**record, "error": f"a part failed: {errors[0] if errors else 'no reward rate'}"})
                continue
            record.update(sampling_s=s.batches_per_stage * sample["ms"] * 1e-3, reward_s=images / rate,
                          training_s=kept * L * cfg.train.epochs * train["ms_per_pair"] * 1e-3)
            record["total_s"] = record["sampling_s"] + record["reward_s"] + record["training_s"]
            records.append(record)
    return records


def _timed_method(timings: dict, name: str, fn, device: torch.device):
    """``fn`` wrapped to store its seconds (device work included) in ``timings[name]``."""
    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        result = fn(*args, **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        timings[name] = time.perf_counter() - started
        return result
    return wrapper


def _warm_up(trainer, cfg, interval_len: int) -> None:
    """One sampling batch and one update, so the measured stages exclude one-time costs."""
    from b2fast.core.update import policy_update

    n = min(cfg.sampling.prompts_per_batch * cfg.sampling.branches, 8)
    gen = torch.Generator(trainer.device).manual_seed(0)
    batch, selection = bench_train.synthetic_trajectories(trainer.policy, cfg, interval_len, n, gen)
    policy_update(trainer.policy, trainer.optimizer, batch, selection,
                  bench_train.one_epoch_config(cfg, trainer.policy, batch), cfg.sampling, torch.Generator(),
                  bench_sd.SILENT)


def full_stages(args, device: torch.device) -> list[dict]:
    """One ``Trainer.run_stage`` per interval (the first stage whose schedule gives it)."""
    from b2fast.config import apply_overrides
    from b2fast.testing.tiny_clip import register_tiny_clip
    from b2fast.run.trainer import Trainer

    clip = register_tiny_clip() if args.quick else "ViT-H-14"
    with tempfile.TemporaryDirectory(prefix="b2fast-bench-stage-") as out:
        cfg = apply_overrides(copy.deepcopy(args.cfg), [
            "--model.path", bench_sd.model_folder(args.cfg, args.quick), "--out", out,
            "--reward.name", "clipscore", "--reward.options", f"{{model_name: {clip}, pretrained: null}}",
            "--log.progress", "false", "--log.samples", "false", "--log.grid_every", "0",
            "--eval.enabled", "false", "--checkpoint_every", str(10 ** 9)])
        progress("full stages: loading the trainer")
        trainer = Trainer(cfg)
        timings: dict = {}
        trainer.sample_stage = _timed_method(timings, "sampling_s", trainer.sample_stage, device)
        _warm_up(trainer, cfg, args.intervals[0])
        records = [bench_sd.guarded(f"full stage L={L}", lambda L=L: _run_stage(trainer, L, timings), device)
                   for L in args.intervals]
    return [{"interval": L, "method": "b2fast", "source": "measured", **r}
            for L, r in zip(args.intervals, records)]


def _run_stage(trainer, L: int, timings: dict) -> dict:
    stages = [s for s in range(trainer.cfg.schedule.num_stages) if trainer.interval_len(s) == L]
    if not stages:
        raise ValueError(f"schedule {trainer.cfg.schedule.kind!r} has no stage with interval {L}")
    cuda = trainer.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(trainer.device)
    result = trainer.run_stage(stages[0])
    progress(f"full stage L={L}: {cell(result['seconds'])} s")
    return {"stage": stages[0], "sampling_s": timings["sampling_s"], "reward_s": None,
            "training_s": result["seconds"] - timings["sampling_s"], "total_s": result["seconds"],
            "kept": result["n_selected"],
            "peak_gib": torch.cuda.max_memory_allocated(trainer.device) / 2 ** 30 if cuda else None}


def _add_speedups(records: list[dict]) -> None:
    """Total seconds of the composed baseline, training the row's kept count, over the row's."""
    base = {r["interval"]: r for r in records
            if r["method"] == "baseline" and r["source"] == "composed" and "error" not in r}
    for r in records:
        if "error" in r:
            continue
        b, r["speedup_vs_baseline"] = base.get(r["interval"]), None
        if b is not None:
            total = b["sampling_s"] + b["reward_s"] + b["training_s"] * r["kept"] / b["kept"]
            r["speedup_vs_baseline"] = total / r["total_s"]


def measure(args: argparse.Namespace) -> dict:
    """Run the suite; the JSON document (header and records) described in the module doc."""
    device = bench_sd.start(args)
    parts, parts_from = measure_parts(args)
    records = compose(parts, args.cfg, args.kept, args.intervals)
    if args.full:
        records += full_stages(args, device)
        bench_sd.free(device)  # the trainer, gone with its frame
    _add_speedups(records)
    s = args.cfg.sampling
    return {**bench_sd.header("stage", args, device),
            "settings": {"batches": s.batches_per_stage, "prompts": s.prompts_per_batch, "branches": s.branches,
                         "images": s.batches_per_stage * s.prompts_per_batch * s.branches,
                         "epochs": args.cfg.train.epochs, "kept": args.kept, "intervals": list(args.intervals)},
            "parts_from": parts_from,
            "parts": {"sample": parts["sample"]["records"], "train": parts["train"]["records"],
                      "reward": _find(parts["rewards"]["records"], reward="clipscore")},
            "records": records}


def format_report(doc: dict) -> str:
    """The Markdown table under the common header lines."""
    s = doc["settings"]
    what = (f"{s['batches']} batches × {s['prompts']} prompts × {s['branches']} branches = {s['images']} "
            f"images per stage, {s['epochs']} epochs")
    lines = bench_sd.header_lines(doc, what) + [
        f"composed (parts summed, no overlap) from parts measured by {doc['parts_from']}: sampling = "
        f"{s['batches']} × ms per batch "
        f"(decode included); reward = {s['images']} images ÷ clipscore images/s; training = {s['kept']} "
        f"kept trajectories (assumed, --kept) × L × {s['epochs']} epochs × ms per pair"]
    if any(r["source"] == "measured" for r in doc["records"]):
        lines.append("measured: Trainer.run_stage after a warm-up (b2fast only; sampling s includes decoding "
                     "and reward, overlapped as configured; training includes selection; kept = what selection "
                     "kept on random rewards); its × is vs the composed baseline training that many")
    lines += [
        "",
        "| L | method | source | sampling s | reward s | training s | total s | kept | peak GiB | "
        "× vs baseline |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in doc["records"]:
        head = f"| {r['interval']} | {r['method']} | {r['source']} |"
        if "error" in r:
            lines.append(f"{head} failed: {r['error'][:80]} | | | | | | |")
            continue
        lines.append(f"{head} {cell(r['sampling_s'])} | {cell(r['reward_s'])} | {cell(r['training_s'])} | "
                     f"{cell(r['total_s'])} | {r['kept']} | {cell(r['peak_gib'])} | "
                     f"{cell(r['speedup_vs_baseline'])} |")
    return "\n".join(lines)
