"""The ``sample`` suite of ``python -m b2fast.bench``: images/s of branch sampling and decoding.

Sampling time is mostly UNet calls, then VAE decoding. Per interval length L of the config
(``schedule.min_interval`` and ``schedule.max_interval``: 14 and 20 of 20 steps by default),
one call samples one batch of P prompts × K branches (8 × 5 by default), decoded images included:

* **b2fast**: :func:`b2fast.core.sampling.sample_branches`: the trunk at batch P, the fork, then all
  P·K branches in one UNet call per step, the fused DDIM step + log-prob (``b2fast.ops``), and
  ``Policy.decode`` of the P·K final latents at once.
* **baseline**, the DDPO-style research scripts: the same trunk, then a Python loop over the K
  branches, each running the interval at batch P (2P with CFG) with the plain-PyTorch DDIM step
  + log-prob (:mod:`b2fast.ops.reference.ddim`, the spec) and decoding its P images, on the eager
  baseline policy (:mod:`b2fast.bench.sd`). Prompt embeddings are cached for both (the scripts
  re-encode each batch: a few GFLOP, not counted against them).

The ``decode`` case times ``Policy.decode`` of P·K random latents: b2fast at the whole batch
(``sampling.unet_batch`` chunks, as ``sample_branches`` decodes), the baseline in K calls at
batch P, as the scripts' pipeline decodes.

Reported per case, interval and method: ms per call (median, p20, p80), images/s, GFLOP of the
call, GFLOP per image and TFLOP/s of the UNet (sample: the UNet's FLOPs over the time spent
inside its forward calls, see ``bench_sd.ModuleShare``) or of the whole call (decode: the VAE),
% of the matmul ceiling measured in the same run, peak CUDA memory (weights included) and the
speed-up vs the baseline (baseline ms / b2fast ms). Any config field can be overridden as
``--section.field value`` (e.g. ``--sampling.unet_batch 40``, ``--sampling.cuda_graphs true``,
fast-path fields of ``model``). Replayed CUDA graphs run no module hooks and dispatch no ops that
FlopCounterMode sees: with ``sampling.cuda_graphs`` on a GPU the b2fast sample rows report the
whole call's TFLOP/s, with FLOPs counted on the same call with graphs off.

JSON (``--json``): ``suite``, ``date``, ``device``, ``device_type``, ``torch``, ``cuda``,
``diffusers``, ``b2fast``, ``threads``, ``model``, ``dtype``, ``preset`` (``--config`` or null),
``quick``, ``overrides``, ``config`` (the whole config measured), ``warmup``, ``repeats``, ``timer``, ``flops``, ``backends``, ``ceiling`` {``dtype``, ``n``, ``ms``,
``tflops``}, ``settings`` {``prompts``, ``branches``, ``steps``, ``guidance_scale``,
``cache_dtype``, ``intervals``}, ``methods`` (what each method runs) and ``records``, one per
case × interval × method: ``case`` (sample, decode), ``interval`` (null for decode), ``method``
(b2fast, baseline), ``batch`` (sample: "trunk/branches" images per UNet call, CFG included;
decode: images per VAE call), ``images``, ``ms``, ``ms_p20``, ``ms_p80``, ``images_per_s``, ``gflop``,
``flops_of`` (unet, call), ``gflop_per_image``, ``unet_ms`` (ms inside the UNet per call, sample
rows; null otherwise), ``tflops``, ``pct_of_ceiling``,
``peak_gib``, ``speedup_vs_baseline`` — or ``error`` (one line) for a case that failed: the run
goes on, the row says "failed" and the exit code is 1.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
from functools import partial

import torch

from b2fast.bench import sd as bench_sd
from b2fast.bench.sd import cell, progress
from b2fast.ops.reference import ddim as reference

METHODS = {
    "b2fast": "sample_branches: trunk at batch P, fork, P·K branches in one UNet call per step, "
              "fused DDIM op, decode at P·K",
    "baseline": "eager, per-branch loop: K × the interval at batch P, reference DDIM step, "
                "decode at batch P",
}


@torch.no_grad()
def baseline_sample(policy, prompts: list[str], interval_len: int, cfg,
                    generator: torch.Generator) -> list[tuple]:
    """The scripts' branch sampler: per branch, (latents (P, L, C, H, W), log-probs (P, L),
    images) with the UNet at batch P (2P with CFG) and the reference DDIM step."""
    S, P, device = policy.steps.num_steps, len(prompts), policy.device
    w, cache_dtype = cfg.guidance_scale, getattr(torch, cfg.cache_dtype)
    cond = policy.embed(prompts)                                            # (P, 77, D)

    def step(x: torch.Tensor, i: int):
        t = torch.full((P,), i, dtype=torch.long, device=device)
        eps_u, eps_c = policy.predict_eps(x, t, cond, w, w != 1.0)
        noise = torch.randn(x.shape, generator=generator, device=device)
        return reference.ddim_step_with_logprob(eps_u, eps_c, w, x, noise, policy.steps.table, t,
                                                cache_dtype, policy.steps.clip_sample_range,
                                                cfg.logprob_reduction)

    x = torch.randn((P, *policy.latent_shape), generator=generator, device=device).to(cache_dtype)
    for i in range(S - interval_len):                                       # shared trunk
        x, _ = step(x, i)
    branches = []
    for _ in range(cfg.branches):                                           # one branch at a time
        xk, latents, log_probs = x, [], []
        for i in range(S - interval_len, S):
            xk, log_prob = step(xk, i)
            latents.append(xk)
            log_probs.append(log_prob)
        branches.append((torch.stack(latents, 1), torch.stack(log_probs, 1), policy.decode(xk)))
    return branches


def unet_batches(cfg, baseline: bool) -> tuple[str, str]:
    """(sampling, decoding) images per UNet / VAE call, as the table shows them."""
    s = cfg.sampling
    P, PK, cap = s.prompts_per_batch, s.prompts_per_batch * s.branches, s.unet_batch or 10 ** 9
    m = 2 if s.guidance_scale != 1.0 else 1
    if baseline:
        return f"{m * P}/{m * P}", str(P)
    return f"{m * min(P, cap)}/{m * min(PK, cap)}", str(min(PK, cap))


def _measure_method(args, folder: str, device, ceiling_tflops: float, baseline: bool) -> list[dict]:
    """Load one method's policy, time its sampling at each interval and its decode."""
    from b2fast.core.sampling import sample_branches

    cfg, method = args.cfg, "baseline" if baseline else "b2fast"
    s = cfg.sampling
    policy = bench_sd.load_policy(cfg, folder, device, baseline)
    prompts, gen = bench_sd.prompts_of(cfg, s.prompts_per_batch), torch.Generator(device).manual_seed(0)
    ids, n = torch.arange(len(prompts)), s.prompts_per_batch * s.branches
    sample_batch, decode_batch = unet_batches(cfg, baseline)
    records = []
    # Replayed CUDA graphs run no module hooks and dispatch no ops: then the UNet is not watched
    # (TFLOP/s of the whole call) and FLOPs are counted on the same call without graphs.
    graphs = s.cuda_graphs and device.type == "cuda" and not baseline
    uncaptured = dataclasses.replace(s, cuda_graphs=False)
    with contextlib.nullcontext() if baseline else bench_sd.backend_context(cfg):
        for L in args.intervals:
            if baseline:
                fn, count = partial(baseline_sample, policy, prompts, L, s, gen), None
            else:
                fn = partial(sample_branches, policy, prompts, ids, L, s, gen)
                count = partial(sample_branches, policy, prompts, ids, L, uncaptured, gen) if graphs else None
            m = bench_sd.guarded(f"sample L={L} {method}", lambda: bench_sd.measure_call(
                fn, device, args.warmup, args.repeats, None if graphs else policy.unet, count), device)
            records.append(_record("sample", L, method, sample_batch, n, m, ceiling_tflops))
        latents = torch.randn((n, *policy.latent_shape), generator=gen, device=device)
        if baseline:
            decode = lambda: [policy.decode(c) for c in latents.split(s.prompts_per_batch)]  # noqa: E731
        else:
            decode = lambda: policy.decode(latents, s.unet_batch)  # noqa: E731
        m = bench_sd.guarded(f"decode {method}", lambda: bench_sd.measure_call(
            decode, device, args.warmup, args.repeats), device)
        records.append(_record("decode", None, method, decode_batch, n, m, ceiling_tflops))
    return records


def _record(case: str, interval, method: str, batch: str, images: int, m: dict,
            ceiling_tflops: float) -> dict:
    record = {"case": case, "interval": interval, "method": method, "batch": batch,
              "images": images}
    if "error" in m:
        return {**record, **m}
    rates = bench_sd.rate_fields(m, ceiling_tflops)
    flops = m["module_flops"] if rates["flops_of"] == "unet" else m["flops"]
    record.update(rates, images_per_s=images / (m["ms"] * 1e-3), gflop_per_image=flops / images / 1e9)
    label = f"{case}{'' if interval is None else f' L={interval}'} {method}"
    progress(f"{label}: {cell(record['images_per_s'])} images/s, {cell(record['tflops'])} TFLOP/s")
    return record


def measure(args: argparse.Namespace) -> dict:
    """Run the suite; the JSON document (header and records) described in the module doc."""
    device, ceiling, records = bench_sd.measure_methods(args, partial(_measure_method, args))
    s = args.cfg.sampling
    return {**bench_sd.header("sample", args, device), "ceiling": ceiling,
            "settings": {"prompts": s.prompts_per_batch, "branches": s.branches, "steps": s.num_steps,
                         "guidance_scale": s.guidance_scale, "cache_dtype": s.cache_dtype,
                         "intervals": list(args.intervals)},
            "methods": METHODS, "records": records}


def format_report(doc: dict) -> str:
    """The Markdown table under the common header lines."""
    s = doc["settings"]
    what = (f"{s['prompts']} prompts × {s['branches']} branches per call, {s['steps']} DDIM steps, "
            f"CFG {s['guidance_scale']}, cache {s['cache_dtype']}")
    lines = bench_sd.header_lines(doc, what) + [
        f"b2fast: {doc['methods']['b2fast']}", f"baseline: {doc['methods']['baseline']}",
        "GFLOP/image and TFLOP/s of: unet = the UNet's FLOPs (and the time inside its calls), call = "
        "the whole call's (decode: the VAE)", "",
        "| case | L | method | batch | ms/call | images/s | GFLOP/image | TFLOP/s | of | % of ceiling | "
        "peak GiB | × vs baseline |",
        "|---|---:|---|---|---:|---:|---:|---:|---|---:|---:|---:|"]
    for r in doc["records"]:
        head = f"| {r['case']} | {r['interval'] or '-'} | {r['method']} | {r['batch']} |"
        if "error" in r:
            lines.append(f"{head} failed: {r['error'][:80]} | | | | | | | |")
            continue
        lines.append(f"{head} {cell(r['ms'])} | {cell(r['images_per_s'])} | {cell(r['gflop_per_image'])} | "
                     f"{cell(r['tflops'])} | {r['flops_of']} | {cell(r['pct_of_ceiling'])} | "
                     f"{cell(r['peak_gib'])} | {cell(r['speedup_vs_baseline'])} |")
    return "\n".join(lines)
