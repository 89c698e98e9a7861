"""The ``objectives`` suite of ``python -m b2fast.bench``: seconds of one stage's policy update per
``train.objective``, all on the same synthetic stage.

Per interval length L of the config (``schedule.min_interval`` and ``schedule.max_interval``), the
model samples one stage of ``--groups`` G branch groups × K branches (``sampling.branches``) with
:func:`b2fast.bench.train.synthetic_trajectories` (not decoded). Every branch gets a random score;
each group's best and worst branch are its (winner, loser) pair, and the kept trajectories are
exactly those pair members (the best with advantage +1, the worst −1). So every objective trains
the same 2G trajectories: ``ppo`` and ``dro_unpaired`` as 2G items of one member, ``d3po``,
``dro`` and ``diffusion_dpo`` as G pairs of two members. For each objective of :data:`OBJECTIVES`
(every other ``train`` field as configured, ``train.loser_guard`` included):

* ``update_s``: one :func:`b2fast.core.update.policy_update` over one epoch (a stage runs
  ``train.epochs``; the reference pass runs once per stage whatever the epochs), at
  ``train.micro_batch`` UNet rows per call (0: sized as the trainer sizes it); every call starts
  from the same LoRA weights, a fresh optimizer and the same shuffles and noises. ``--warmup``
  untimed calls, then the median of ``--repeats`` timed ones (``time.perf_counter``, the device
  synchronised before and after).
* ``reference_s``: the time of those calls spent in ``b2fast.core.update._reference_terms`` (the
  base model's log-probs or denoising errors: no grad, LoRA off, once per stage), timed by a
  wrapper around it during the same calls; 0 for an objective that needs no reference (``ppo``;
  ``dro`` and ``dro_unpaired`` when ``train.loser_guard`` is 0).
* ``forward_ms_per_row``: one call of the helper the reference pass uses
  (``b2fast.core.update._unit_terms``, no grad, LoRA off) on one micro-batch of the objective's
  units, for its term (``error`` for the denoising objectives, ``log_prob`` for ppo and d3po),
  divided by its UNet rows (median of the repeats; CUDA events on cuda, ``time.perf_counter`` on cpu).
* ``reference_forwards_per_kept_step`` = reference_s ÷ (forward_ms_per_row × kept members ×
  trained window steps): ≈ 1 when the reference costs one no-grad forward per kept trajectory and
  trained interval step; 0 without a reference.
* ``extra_vs_ppo_s`` = update_s − ppo's update_s, ``ratio_vs_ppo`` = update_s ÷ ppo's (None when
  ppo failed).

JSON (``--json``): the header fields of the sample suite (``suite`` … ``backends``, no
``ceiling``; ``timer`` names both timers), ``settings`` {``groups``, ``branches``, ``kept``,
``micro_batch``, ``loser_guard``, ``intervals``, ``objectives``} and ``records``, one per interval
× objective: ``interval``,
``objective``, ``needs`` (the terms its loss reads), ``items``, ``members`` (trajectories per item),
``trained_steps``, ``units`` (items × trained steps: the (item, step) units of one epoch), ``rows``
(units × members: UNet rows trained per epoch), ``micro_batch``, ``update_s``, ``update_s_p20``,
``update_s_p80``, ``reference_s``, ``forward_ms_per_row``, ``reference_forwards_per_kept_step``,
``extra_vs_ppo_s``, ``ratio_vs_ppo`` — or ``error`` (one line) for a case that failed: the run goes
on and the exit code is 1.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from functools import partial

import torch

from b2fast.bench import sd as bench_sd, train as bench_train
from b2fast.bench.common import summarize, sync, time_calls
from b2fast.bench.sd import cell, progress

OBJECTIVES = ("ppo", "d3po", "dro", "dro_unpaired", "diffusion_dpo")
REFERENCE_TERMS = frozenset({"ref_log_prob", "ref_error"})


def synthetic_stage(policy, cfg, L: int, groups: int):
    """(TrajectoryBatch, Selection): ``groups`` × K branches sampled by ``policy``; each group's
    (best, worst) on random scores is its pair, and the pair members are the kept trajectories."""
    from b2fast.core.selection import Selection

    K = cfg.sampling.branches
    batch, _ = bench_train.synthetic_trajectories(policy, cfg, L, groups * K,
                                                  torch.Generator(policy.device).manual_seed(L))
    scores = torch.rand(len(batch), generator=torch.Generator().manual_seed(L))
    group_ids = batch.group_ids.cpu()
    pairs = []
    for g in range(groups):
        rows = torch.nonzero(group_ids == g).flatten()
        pairs.append([int(rows[scores[rows].argmax()]), int(rows[scores[rows].argmin()])])
    pairs = torch.tensor(pairs, dtype=torch.int64)
    kept = pairs.flatten().sort().values
    positive = torch.isin(kept, pairs[:, 0])
    selection = Selection(indices=kept, advantages=positive.float() * 2 - 1, positive=positive,
                          n_positive=groups, n_negative=groups, pairs=pairs)
    return batch, selection


def time_update(policy, lora: dict, batch, selection, tcfg, scfg, device, warmup: int,
                repeats: int) -> tuple[list[float], list[float]]:
    """Seconds of ``repeats`` policy_update calls after ``warmup`` (each from the weights ``lora``,
    a fresh optimizer and the same generator), and of the reference pass inside each."""
    from b2fast.core import update

    real, spent = update._reference_terms, []

    def timed_reference(*a, **kw):
        sync(device)
        start = time.perf_counter()
        real(*a, **kw)
        sync(device)
        spent.append(time.perf_counter() - start)

    update_s, reference_s = [], []
    update._reference_terms = timed_reference  # policy_update looks it up at each call
    try:
        for call in range(warmup + repeats):
            policy.load_lora_state_dict(lora)
            optimizer = update.make_optimizer(policy.lora_parameters(), tcfg)
            sync(device)
            start = time.perf_counter()
            update.policy_update(policy, optimizer, batch, selection, tcfg, scfg, torch.Generator().manual_seed(0))
            sync(device)
            if call >= warmup:
                update_s.append(time.perf_counter() - start)
                reference_s.append(spent[-1])
    finally:
        update._reference_terms = real
    policy.load_lora_state_dict(lora)
    return update_s, reference_s


def forward_ms_per_row(policy, batch, selection, tcfg, scfg, device, warmup: int, repeats: int) -> float:
    """ms per UNet row of one no-grad, LoRA-off micro-batch of the objective's term, through the
    reference pass's helper."""
    from b2fast.core import update
    from b2fast.core.objectives import get_objective

    objective = get_objective(tcfg.objective)
    needs = objective.needs(tcfg)
    term = frozenset({"error" if "error" in needs else "log_prob"})
    units = update._stage_units(objective, needs, batch, selection, torch.arange(len(batch)), tcfg,
                                torch.Generator().manual_seed(0))
    n_items = units.rows.shape[0]
    flat = torch.arange(min(max(1, tcfg.micro_batch // units.members), n_items * batch.interval_len))
    items, positions = (flat % n_items).to(device), (flat // n_items).to(device)

    def call():
        update._unit_terms(policy, batch, units, items, positions, term, tcfg, scfg)

    with torch.no_grad(), policy.base_weights():  # entered once, as the reference pass does
        ms = summarize(time_calls(call, device, warmup, repeats))["ms"]
    return ms / (flat.numel() * units.members)


def measure_objective(policy, lora, batch, selection, tcfg, scfg, device, args) -> dict:
    """One record's measured fields (see the module doc), without the comparisons to ppo."""
    from b2fast.core.objectives import get_objective
    from b2fast.core.update import trained_positions

    objective = get_objective(tcfg.objective)
    needs = objective.needs(tcfg)
    items = objective.items(selection, tcfg)
    trained = int(trained_positions(policy, batch, tcfg).sum())
    n_items, members = items.rows.shape
    update_s, reference_s = time_update(policy, lora, batch, selection, tcfg, scfg, device,
                                        args.warmup, args.repeats)
    stats = summarize(update_s)  # median, p20, p80 (of seconds, whatever the keys say)
    reference = statistics.median(reference_s) if needs & REFERENCE_TERMS else 0.0
    per_row = forward_ms_per_row(policy, batch, selection, tcfg, scfg, device, args.warmup, args.repeats)
    return {"needs": sorted(needs), "items": n_items, "members": members, "trained_steps": trained,
            "units": n_items * trained, "rows": n_items * trained * members, "micro_batch": tcfg.micro_batch,
            "update_s": stats["ms"], "update_s_p20": stats["ms_p20"], "update_s_p80": stats["ms_p80"],
            "reference_s": reference, "forward_ms_per_row": per_row,
            "reference_forwards_per_kept_step": reference / (per_row * 1e-3 * n_items * members * trained)}


def add_ppo_comparisons(records: list[dict]) -> None:
    """``extra_vs_ppo_s`` and ``ratio_vs_ppo`` against the ppo record of the same interval."""
    ppo = {r["interval"]: r for r in records if r["objective"] == "ppo" and "error" not in r}
    for r in records:
        if "error" in r:
            continue
        base = ppo.get(r["interval"])
        r["extra_vs_ppo_s"] = r["update_s"] - base["update_s"] if base else None
        r["ratio_vs_ppo"] = r["update_s"] / base["update_s"] if base else None


def measure(args: argparse.Namespace) -> dict:
    """Run the suite; the JSON document (header and records) described in the module doc."""
    cfg = args.cfg
    if cfg.sampling.branches < 2:
        raise ValueError(f"sampling.branches: got {cfg.sampling.branches}, the objectives suite needs >= 2 "
                         "(a group's best and worst must differ)")
    device = bench_sd.start(args)
    groups = args.groups or cfg.sampling.prompts_per_batch
    policy = bench_sd.load_policy(cfg, bench_sd.model_folder(cfg, args.quick), device, baseline=False)
    lora, records = policy.lora_state_dict(), []
    with bench_sd.backend_context(cfg):
        for L in args.intervals:
            stage = bench_sd.guarded(f"objectives L={L} sampling",
                                     lambda L=L: {"data": synthetic_stage(policy, cfg, L, groups)}, device)
            for name in OBJECTIVES:
                record = {"interval": L, "objective": name}
                if "error" in stage:
                    records.append({**record, "error": f"sampling failed: {stage['error']}"})
                    continue
                batch, selection = stage["data"]
                tcfg = dataclasses.replace(bench_train.one_epoch_config(cfg, policy, batch), objective=name)
                record.update(bench_sd.guarded(f"objectives L={L} {name}", partial(
                    measure_objective, policy, lora, batch, selection, tcfg, cfg.sampling, device, args), device))
                if "error" not in record:
                    progress(f"objectives L={L} {name}: update {cell(record['update_s'])} s, reference "
                             f"{cell(record['reference_s'])} s")
                records.append(record)
    add_ppo_comparisons(records)
    micro_batch = next((r["micro_batch"] for r in records if "micro_batch" in r), cfg.train.micro_batch)
    timer = "time.perf_counter, device synchronised" + "; forward: cuda events" * (device.type == "cuda")
    return {**bench_sd.header("objectives", args, device), "timer": timer,
            "settings": {"groups": groups, "branches": cfg.sampling.branches, "kept": 2 * groups,
                         "micro_batch": micro_batch, "loser_guard": cfg.train.loser_guard,
                         "intervals": list(args.intervals), "objectives": list(OBJECTIVES)},
            "records": records}


def format_report(doc: dict) -> str:
    """The Markdown table under the common header lines."""
    s = doc["settings"]
    what = (f"one synthetic stage of {s['groups']} groups × {s['branches']} branches, {s['kept']} kept "
            f"trajectories = each group's (best, worst) pair, one epoch, micro-batch {s['micro_batch']} rows, "
            f"loser_guard {s['loser_guard']}")
    lines = bench_sd.header_lines(doc, what) + [
        "update s: one policy_update (fresh optimizer, same weights); reference s: its base-model pass "
        "(once per stage); ref. forwards / kept step: reference s ÷ (one no-grad forward per row × kept "
        "members × trained steps)", "",
        "| L | objective | units | update s | reference s | ref. forwards / kept step | extra vs ppo s | "
        "× vs ppo |",
        "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in doc["records"]:
        head = f"| {r['interval']} | {r['objective']} |"
        if "error" in r:
            lines.append(f"{head} failed: {r['error'][:80]} | | | | | |")
            continue
        lines.append(f"{head} {r['units']} | {cell(r['update_s'])} | {cell(r['reference_s'])} | "
                     f"{cell(r['reference_forwards_per_kept_step'])} | {cell(r['extra_vs_ppo_s'])} | "
                     f"{cell(r['ratio_vs_ppo'])} |")
    return "\n".join(lines)
