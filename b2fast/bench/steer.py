"""The ``steer`` suite of ``python -m b2fast.bench``: what FK steering costs beyond its particles'
UNet calls.

P prompts (``sampling.prompts_per_batch``, the config's prompt set) × N particles
(``steer.particles``) are one batch of P·N rows. Two calls are timed:

* ``fk``: :func:`b2fast.core.steering.fk_sample` with the config's ``steer`` section (``steer.kind``
  is not read: the suite always steers), scored by the reward below; one generator for the batch
  (seed ``seed``) and one for the resampling;
* ``plain``: :func:`b2fast.core.sampling.generate` of the same P·N rows (each prompt N times, the
  same sampling settings and seed): the same UNet calls (``sampling.num_steps`` calls of P·N rows,
  2·P·N with CFG; both counted by a hook on the UNet) and the same final decode, no reward.

Each of ``--warmup`` untimed and ``--repeats`` timed rounds calls plain, then fk (alternating, so
drift hits both), timed by ``time.perf_counter`` with the device synchronised before and after.
During the timed fk calls, wrappers around the policy's ``decode`` and the reward callable time
each potential step's decode and scoring (also synchronised). Reward: ``clipscore`` on OpenCLIP
ViT-H-14 with random weights (the stage suite's); model: SD 1.x with random weights in
``model.dtype``; ``--quick``: the tiny test model and the tiny CLIP on a CPU, seconds. ``--model toy``:
the toy world instead, ``b2fast:toy`` with the ``toy_ddim`` preset's sampling and prompts, scored by
the exact ``toy_align`` (pixel space: decoding is a clamp), what ``benchmarks/toy_steer.py`` measures
alignment with.

Record fields: ``prompts``, ``particles``, ``images`` (P·N), ``num_steps``, ``potential_steps``
(``len(resampling_steps(...))``, the last step included) and ``potential_step_indices``,
``resample``, ``unet_calls_plain``, ``unet_calls_fk`` (UNet forward calls of one call: equal),
``reward_images`` (images scored per fk call: potential steps × P·N), ``plain_s``, ``fk_s`` (medians
over the timed calls) and their ``_p20``/``_p80``, ``overhead_s`` = fk_s − plain_s,
``overhead_share`` = overhead_s ÷ fk_s, ``decode_s`` (median seconds in ``decode`` at the potential
steps before the last: the last one's decode, of the final images, plain makes too), ``reward_s``
(median seconds in the reward at every potential step: plain scores nothing), ``other_s`` =
overhead_s − decode_s − reward_s (x̂0, weights, resampling by ``fork_index``, timer noise; may be
< 0), ``overhead_ms_per_step_particle`` = overhead_s ÷ (potential_steps × P·N) in ms — or
``error`` (one line) when the case failed: the exit code is then 1.

JSON (``--json``): the header fields of the sample suite (``suite`` … ``backends``, no
``ceiling``), ``settings`` {``prompts``, ``particles``, ``reward``, ``reward_model``, ``steer``} and
``records`` (one).
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from functools import partial

import torch

from b2fast.bench import sd as bench_sd
from b2fast.bench.common import summarize, sync
from b2fast.bench.sd import cell, progress

REWARD = "clipscore"
TOY_REWARD, TOY_MODEL = "toy_align", "b2fast:toy"


def build_reward(quick: bool, device: torch.device, toy: bool = False):
    """(reward(images, prompts) → float32 CPU scores, reward name, model name): clipscore with random
    weights, or (``toy``) the toy world's exact toy_align."""
    from b2fast.rewards import build_reward as build
    from b2fast.rewards import score_images
    from b2fast.testing.tiny_clip import register_tiny_clip

    if toy:
        return partial(score_images, build(TOY_REWARD, {}, device), name=TOY_REWARD), TOY_REWARD, "exact detector"
    model = register_tiny_clip() if quick else "ViT-H-14"
    reward = build(REWARD, {"model_name": model, "pretrained": None}, device)
    return partial(score_images, reward, name=REWARD), REWARD, f"{model} (random weights)"


class Spans:
    """Seconds of each call of ``fn`` while the wrapper is in use (device synchronised)."""

    def __init__(self, fn, device: torch.device):
        self.fn, self.device, self.seconds = fn, device, []

    def __call__(self, *a, **kw):
        sync(self.device)
        start = time.perf_counter()
        out = self.fn(*a, **kw)
        sync(self.device)
        self.seconds.append(time.perf_counter() - start)
        return out


def count_unet_calls(policy, fn) -> int:
    """UNet forward calls during one ``fn()``."""
    calls = []
    handle = policy.unet.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        fn()
    finally:
        handle.remove()
    return len(calls)


def measure_steering(policy, prompts: list[str], cfg, reward, device: torch.device, args) -> dict:
    """One record's measured fields (see the module doc)."""
    from b2fast.core.sampling import generate
    from b2fast.core.steering import fk_sample, resampling_steps

    st, s = cfg.steer, cfg.sampling
    rows = [p for p in prompts for _ in range(st.particles)]
    steps = resampling_steps(st.start, st.every, st.end, s.num_steps)
    decode, scored = Spans(policy.decode, device), Spans(reward, device)

    def plain():
        return generate(policy, rows, s, torch.Generator(device).manual_seed(cfg.seed))

    def fk():
        return fk_sample(policy, prompts, s, st, scored, torch.Generator(device).manual_seed(cfg.seed),
                         torch.Generator().manual_seed(cfg.seed + 1))

    def timed(fn) -> float:
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        return time.perf_counter() - start

    plain_s, fk_s, decode_s, reward_s = [], [], [], []
    policy.decode = decode  # an instance attribute: fk_sample and generate call it by name
    try:
        for call in range(args.warmup + args.repeats):
            p = timed(plain)
            decode.seconds.clear()
            scored.seconds.clear()
            f = timed(fk)
            if len(decode.seconds) != len(steps) or len(scored.seconds) != len(steps):
                raise RuntimeError(f"fk_sample decoded {len(decode.seconds)} and scored {len(scored.seconds)} "
                                   f"times, expected one of each per potential step ({len(steps)})")
            if call >= args.warmup:
                plain_s.append(p)
                fk_s.append(f)
                decode_s.append(sum(decode.seconds[:-1]))
                reward_s.append(sum(scored.seconds))
        unet_plain, unet_fk = count_unet_calls(policy, plain), count_unet_calls(policy, fk)
    finally:
        del policy.decode
    pl, fs = summarize(plain_s), summarize(fk_s)  # median, p20, p80 (of seconds, whatever the keys say)
    overhead, dec, rew = fs["ms"] - pl["ms"], statistics.median(decode_s), statistics.median(reward_s)
    return {"prompts": len(prompts), "particles": st.particles, "images": len(rows), "num_steps": s.num_steps,
            "potential_steps": len(steps), "potential_step_indices": steps, "resample": st.resample,
            "unet_calls_plain": unet_plain, "unet_calls_fk": unet_fk, "reward_images": len(steps) * len(rows),
            "plain_s": pl["ms"], "plain_s_p20": pl["ms_p20"], "plain_s_p80": pl["ms_p80"],
            "fk_s": fs["ms"], "fk_s_p20": fs["ms_p20"], "fk_s_p80": fs["ms_p80"],
            "overhead_s": overhead, "overhead_share": overhead / fs["ms"], "decode_s": dec, "reward_s": rew,
            "other_s": overhead - dec - rew,
            "overhead_ms_per_step_particle": overhead * 1e3 / (len(steps) * len(rows))}


def measure(args: argparse.Namespace) -> dict:
    """Run the suite; the JSON document (header and records) described in the module doc."""
    cfg = args.cfg
    if cfg.sampling.eta <= 0:
        raise ValueError(f"sampling.eta: got {cfg.sampling.eta}, FK steering needs a stochastic sampler (eta > 0)")
    device = bench_sd.start(args)
    toy = args.model == "toy"
    folder = TOY_MODEL if toy else bench_sd.model_folder(cfg, args.quick)
    policy = bench_sd.load_policy(cfg, folder, device, baseline=False)
    reward, reward_name, model = build_reward(args.quick, device, toy)
    prompts = bench_sd.prompts_of(cfg, cfg.sampling.prompts_per_batch)
    with bench_sd.backend_context(cfg):
        record = bench_sd.guarded("steer", partial(measure_steering, policy, prompts, cfg, reward, device, args),
                                  device)
    if "error" not in record:
        progress(f"steer: plain {cell(record['plain_s'])} s, fk {cell(record['fk_s'])} s, overhead "
                 f"{cell(record['overhead_s'])} s")
    return {**bench_sd.header("steer", args, device), "timer": "time.perf_counter, device synchronised",
            **({"model": TOY_MODEL, "preset": args.config or "b2fast/configs/toy_ddim.yaml"} if toy else {}),
            "settings": {"prompts": len(prompts), "particles": cfg.steer.particles, "reward": reward_name,
                         "reward_model": model, "steer": dataclasses.asdict(cfg.steer)},
            "records": [record]}


def format_report(doc: dict) -> str:
    """The Markdown table under the common header lines."""
    s = doc["settings"]
    st = s["steer"]
    what = (f"{s['prompts']} prompts × {st['particles']} particles in one batch; FK λ {st['lam']}, {st['potential']}, "
            f"{st['resample']}, weights {st['weights']}; reward {s['reward']}, {s['reward_model']}")
    lines = bench_sd.header_lines(doc, what) + [
        "overhead s = FK s − plain s (same UNet calls); decode s: decodes at the potential steps before the last "
        "(plain decodes the final images too); reward s: reward calls at every potential step; other s: the rest "
        "(x̂0, weights, resampling)", "",
        "| images | steps | potential steps | UNet calls plain / FK | plain s | FK s | overhead s | overhead % "
        "| decode s | reward s | other s | overhead ms / step / particle |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in doc["records"]:
        if "error" in r:
            lines.append(f"| failed: {r['error'][:80]} | | | | | | | | | | | |")
            continue
        lines.append(f"| {r['images']} | {r['num_steps']} | {r['potential_steps']} | {r['unet_calls_plain']} / "
                     f"{r['unet_calls_fk']} | {cell(r['plain_s'])} | {cell(r['fk_s'])} | {cell(r['overhead_s'])} | "
                     f"{cell(100 * r['overhead_share'])} | {cell(r['decode_s'])} | {cell(r['reward_s'])} | "
                     f"{cell(r['other_s'])} | {cell(r['overhead_ms_per_step_particle'])} |")
    return "\n".join(lines)
