"""The ``train`` suite of ``python -m b2fast.bench``: (trajectory, step) pairs/s of the policy update.

Per interval length L of the config (``schedule.min_interval`` and ``schedule.max_interval``), one
timed call is one optimizer step of the PPO-clip update over ``--trajectories`` T kept
trajectories × their L interval steps (one epoch: T·L pairs; a stage runs kept × L × epochs
pairs, an optimizer step per 128 trajectories). The trajectories are sampled by the model itself
with :func:`b2fast.core.sampling.sample_branches` (so the PPO ratio starts at 1, as in a stage) and
kept alternately as positives and negatives with advantages ±1:

* **b2fast**: :func:`b2fast.core.update.policy_update` with the config's ``train`` section:
  ``train.micro_batch`` pairs per UNet forward+backward (2× with CFG, ``train.cfg``; 0 = sized
  to the free GPU memory as the trainer sizes it), the fused log-prob op and its fused backward,
  gradient checkpointing when ``train.gradient_checkpointing``.
* **baseline**, the DDPO-style research scripts: 2 trajectories per UNet call (4 with CFG), one
  timestep at a time (each trajectory's steps in its own shuffled order), the plain-PyTorch
  log-prob (:mod:`b2fast.ops.reference.ddim`), the same PPO-clip loss, gradients accumulated over
  the same optimizer step, on the eager baseline policy (:mod:`b2fast.bench.sd`).

Reported per interval and method: ms per call (median, p20, p80), pairs/s, ms per pair, GFLOP per
pair, TFLOP/s of the whole call and its % of the matmul ceiling measured in the same run (the
counted FLOPs are the UNet's LoRA forward+backward: the log-prob, loss and AdamW are elementwise
and cached prompt embeddings cost none; they are the FLOPs executed, so with
``train.gradient_checkpointing`` they include the recomputed forward and pairs/s, not TFLOP/s,
is the figure to compare), peak CUDA memory (weights and the trajectories included) and the
speed-up vs the baseline. Any config field can be overridden as
``--section.field value`` (e.g. ``--train.micro_batch 16``, fast-path fields of ``model``).

JSON (``--json``): the header fields of the sample suite (``suite`` … ``ceiling``), ``settings``
{``trajectories``, ``micro_batch``, ``cfg``, ``guidance_scale``, ``intervals``}, ``methods`` and
``records``, one per interval × method: ``case`` (train), ``interval``, ``method``, ``batch``
(images per UNet call, CFG included), ``trajectories``, ``pairs``, ``ms``, ``ms_p20``,
``ms_p80``, ``pairs_per_s``, ``ms_per_pair``, ``gflop``, ``flops_of`` (call), ``gflop_per_pair``,
``unet_ms`` (null), ``tflops``, ``pct_of_ceiling``, ``peak_gib``, ``speedup_vs_baseline`` — or
``error`` (one line) for a case that failed: the run goes on and the exit code is 1.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
from functools import partial

import torch

from b2fast.bench import sd as bench_sd
from b2fast.bench.sd import cell, progress
from b2fast.ops.reference import ddim as reference

METHODS = {
    "b2fast": "policy_update: train.micro_batch pairs per UNet forward+backward, fused log-prob op",
    "baseline": "eager, 2 trajectories per call, one timestep at a time, reference log-prob, "
                "gradient accumulation over the same optimizer step",
}
BASELINE_TRAJECTORIES = 2  # DDPO's train batch size for SD at 512²


def synthetic_trajectories(policy, cfg, interval_len: int, n: int, generator: torch.Generator):
    """(TrajectoryBatch, Selection): ``n`` branches sampled by ``policy`` (whole batches of P·K,
    not decoded: training needs no images), kept alternately as positives (z = 1) and negatives
    (z = −1)."""
    from b2fast.core.sampling import TrajectoryBatch, sample_branches
    from b2fast.core.selection import Selection

    s = cfg.sampling
    per_batch = s.prompts_per_batch * s.branches
    prompts = bench_sd.prompts_of(cfg, s.prompts_per_batch)
    batch = TrajectoryBatch.cat([sample_branches(policy, prompts, torch.arange(len(prompts)), interval_len, s,
                                                 generator, decode=False)
                                 for _ in range(math.ceil(n / per_batch))])
    z = torch.tensor([1.0, -1.0]).repeat(n)[:n]
    selection = Selection(indices=torch.arange(n), advantages=z, positive=z > 0,
                          n_positive=int((z > 0).sum()), n_negative=int((z < 0).sum()))
    return batch, selection


def baseline_update(policy, optimizer, batch, selection, tcfg, scfg, generator: torch.Generator) -> None:
    """One epoch of the scripts' update: 2 trajectories × one timestep per UNet call, gradients
    accumulated over ``trajectories_per_step`` trajectories, then clip and AdamW."""
    from b2fast.core.objectives import advantage_weights, ppo_clip_loss

    kept, L = selection.indices.cpu(), batch.interval_len
    adv = advantage_weights(selection.advantages.float(), tcfg.adv_clip, tcfg.pos_weight, tcfg.neg_weight)
    use_cfg = tcfg.cfg and scfg.guidance_scale != 1.0
    w, device = scfg.guidance_scale if use_cfg else 1.0, batch.latents.device
    order = torch.randperm(kept.numel(), generator=generator)
    step_order = torch.rand(kept.numel(), L, generator=generator).argsort(dim=1)
    for start in range(0, kept.numel(), tcfg.trajectories_per_step):
        chunk = order[start:start + tcfg.trajectories_per_step]
        for b in range(0, chunk.numel(), BASELINE_TRAJECTORIES):
            pick = chunk[b:b + BASELINE_TRAJECTORIES]
            rows = kept[pick].to(device)
            cond = policy.embed([batch.prompts[r] for r in rows.tolist()])
            for p in range(L):                                     # one timestep at a time
                j = step_order[pick, p].to(device)
                x_t, step = batch.x_t(rows, j), batch.step_indices[j]
                eps_u, eps_c = policy.predict_eps(x_t, step, cond, scfg.guidance_scale, use_cfg)
                log_prob = reference.ddim_logprob(eps_u, eps_c, w, x_t, batch.x_prev(rows, j),
                                                  policy.steps.table, step, policy.steps.clip_sample_range,
                                                  scfg.logprob_reduction)
                loss, _ = ppo_clip_loss(log_prob, batch.log_probs[rows, j], adv[pick].to(device),
                                        tcfg.clip_range)
                (loss.sum() / (chunk.numel() * L)).backward()
        params = policy.lora_parameters()
        torch.nn.utils.clip_grad_norm_(params, tcfg.max_grad_norm if tcfg.max_grad_norm > 0 else float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _measure_method(args, folder: str, device, ceiling_tflops: float, baseline: bool,
                    data: dict) -> list[dict]:
    """Load one method's policy, time one update call per interval. ``data`` holds the
    trajectories per interval: sampled by the b2fast policy (measured first), reused by the baseline."""
    from b2fast.core.update import make_optimizer, policy_update

    cfg, method = args.cfg, "baseline" if baseline else "b2fast"
    policy = bench_sd.load_policy(cfg, folder, device, baseline)
    optimizer = make_optimizer(policy.lora_parameters(), cfg.train)
    gen = torch.Generator().manual_seed(0)
    cfg_factor = 2 if cfg.train.cfg and cfg.sampling.guidance_scale != 1.0 else 1
    records = []
    with contextlib.nullcontext() if baseline else bench_sd.backend_context(cfg):
        for L in args.intervals:
            if L not in data:
                data[L] = synthetic_trajectories(policy, cfg, L, args.trajectories,
                                                 torch.Generator(device).manual_seed(L))
            batch, selection = data[L]
            tcfg = one_epoch_config(cfg, policy, batch)
            batch_size = cfg_factor * (BASELINE_TRAJECTORIES if baseline else tcfg.micro_batch)
            update = baseline_update if baseline else partial(policy_update, progress=bench_sd.SILENT)
            fn = partial(update, policy, optimizer, batch, selection, tcfg, cfg.sampling, gen)
            m = bench_sd.guarded(f"train L={L} {method}", lambda: bench_sd.measure_call(
                fn, device, args.warmup, args.repeats), device)
            records.append(_record(L, method, batch_size, args.trajectories, m, ceiling_tflops))
    return records


def one_epoch_config(cfg, policy, batch):
    """``cfg.train`` for one timed call: one epoch, an automatic micro-batch (0) resolved the way
    the trainer resolves it (a probe of the free GPU memory; 8 on a CPU)."""
    from b2fast.core.update import auto_micro_batch

    tcfg = dataclasses.replace(cfg.train, epochs=1)
    if tcfg.micro_batch == 0:
        tcfg.micro_batch = auto_micro_batch(policy, batch, tcfg, cfg.sampling)
    return tcfg


def _record(L: int, method: str, batch: int, trajectories: int, m: dict, ceiling_tflops: float) -> dict:
    pairs = trajectories * L
    record = {"case": "train", "interval": L, "method": method, "batch": batch,
              "trajectories": trajectories, "pairs": pairs}
    if "error" in m:
        return {**record, **m}
    record.update(bench_sd.rate_fields(m, ceiling_tflops), pairs_per_s=pairs / (m["ms"] * 1e-3),
                  ms_per_pair=m["ms"] / pairs, gflop_per_pair=m["flops"] / pairs / 1e9)
    progress(f"train L={L} {method}: {cell(record['pairs_per_s'])} pairs/s, "
             f"{cell(record['tflops'])} TFLOP/s")
    return record


def measure(args: argparse.Namespace) -> dict:
    """Run the suite; the JSON document (header and records) described in the module doc."""
    measure_method = partial(_measure_method, args, data={})  # trajectories shared by both methods
    device, ceiling, records = bench_sd.measure_methods(args, measure_method)
    cfg = args.cfg
    t = cfg.train
    return {**bench_sd.header("train", args, device), "ceiling": ceiling,
            "settings": {"trajectories": args.trajectories, "micro_batch": t.micro_batch, "cfg": t.cfg,
                         "guidance_scale": cfg.sampling.guidance_scale, "intervals": list(args.intervals)},
            "methods": METHODS, "records": records}


def format_report(doc: dict) -> str:
    """The Markdown table under the common header lines."""
    s = doc["settings"]
    what = (f"one optimizer step over {s['trajectories']} trajectories × L steps per call, "
            f"LoRA, CFG {s['guidance_scale'] if s['cfg'] else 'off'} in training")
    lines = bench_sd.header_lines(doc, what) + [
        f"b2fast: {doc['methods']['b2fast']}", f"baseline: {doc['methods']['baseline']}",
        "TFLOP/s: the whole call's (UNet LoRA forward+backward as executed, recomputation included; "
        "nothing else in it counts FLOPs)", "",
        "| L | method | UNet batch | pairs/call | ms/call | pairs/s | GFLOP/pair | TFLOP/s | % of ceiling | "
        "peak GiB | × vs baseline |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in doc["records"]:
        head = f"| {r['interval']} | {r['method']} | {r['batch']} | {r['pairs']} |"
        if "error" in r:
            lines.append(f"{head} failed: {r['error'][:80]} | | | | | | |")
            continue
        lines.append(f"{head} {cell(r['ms'])} | {cell(r['pairs_per_s'])} | {cell(r['gflop_per_pair'])} | "
                     f"{cell(r['tflops'])} | {cell(r['pct_of_ceiling'])} | {cell(r['peak_gib'])} | "
                     f"{cell(r['speedup_vs_baseline'])} |")
    return "\n".join(lines)
