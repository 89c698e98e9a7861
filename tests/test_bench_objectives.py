"""``python -m b2fast.bench objectives --quick``: one stage's policy update per train.objective on
the tiny model, all objectives on the same synthetic stage.

Speed is never asserted here (docs/algorithm.md, "Measuring speed"): only that every objective
runs, reports positive, finite numbers in the documented format, and that the pair objectives
train half as many units as ppo on the same kept trajectories.
"""
from __future__ import annotations

import math

import pytest

from b2fast.bench import objectives as bench_objectives
from bench_util import run_quick, table_rows

OBJECTIVES = ["ppo", "d3po", "dro", "dro_unpaired", "diffusion_dpo"]
QUICK_INTERVALS = [4, 6]  # schedule.min_interval, max_interval of --quick
MEASURED = {"needs", "items", "members", "trained_steps", "units", "rows", "micro_batch", "update_s",
            "update_s_p20", "update_s_p80", "reference_s", "forward_ms_per_row",
            "reference_forwards_per_kept_step", "extra_vs_ppo_s", "ratio_vs_ppo"}


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def objectives_run(tmp_path_factory):
    """``objectives --quick --device cpu --repeats 1 --json``: stdout and the JSON document."""
    out, _, doc = run_quick(tmp_path_factory.mktemp("bench"), "objectives", "--repeats", "1")
    return out, doc


def test_every_objective_is_measured_per_interval_without_errors(objectives_run):
    _, doc = objectives_run
    assert doc["suite"] == "objectives" and doc["device_type"] == "cpu" and doc["quick"]
    s = doc["settings"]
    assert s["intervals"] == QUICK_INTERVALS and s["objectives"] == OBJECTIVES
    assert s["groups"] == 2 and s["branches"] == 3 and s["kept"] == 4 and s["micro_batch"] == 4
    assert [(r["interval"], r["objective"]) for r in doc["records"]] == \
        [(L, name) for L in QUICK_INTERVALS for name in OBJECTIVES]
    for r in doc["records"]:
        assert "error" not in r, r
        assert set(r) == MEASURED | {"interval", "objective"}, r
        for key in ("update_s", "forward_ms_per_row"):
            assert positive(r[key]), (key, r)
        assert r["update_s_p20"] <= r["update_s"] <= r["update_s_p80"]
        assert r["trained_steps"] == r["interval"]  # train.max_step_gain 0: every step trained


def test_pair_objectives_train_half_the_units_of_ppo_on_the_same_trajectories(objectives_run):
    _, doc = objectives_run
    for L in QUICK_INTERVALS:
        by_name = {r["objective"]: r for r in doc["records"] if r["interval"] == L}
        ppo = by_name["ppo"]
        assert ppo["items"] == 4 and ppo["members"] == 1 and ppo["units"] == 4 * L
        assert by_name["dro_unpaired"]["units"] == ppo["units"]
        for name in ("d3po", "dro", "diffusion_dpo"):
            r = by_name[name]
            assert r["members"] == 2 and r["units"] * 2 == ppo["units"] and r["rows"] == ppo["rows"]


def test_reference_pass_and_comparisons_to_ppo(objectives_run):
    _, doc = objectives_run
    for L in QUICK_INTERVALS:
        by_name = {r["objective"]: r for r in doc["records"] if r["interval"] == L}
        ppo = by_name["ppo"]
        assert ppo["ratio_vs_ppo"] == 1 and ppo["extra_vs_ppo_s"] == 0
        assert ppo["reference_s"] == 0 and ppo["reference_forwards_per_kept_step"] == 0
        for name in ("d3po", "diffusion_dpo", "dro", "dro_unpaired"):  # loser_guard 0.1: dro needs ref_error too
            r = by_name[name]
            assert positive(r["reference_s"]) and r["reference_s"] < r["update_s"], r
            assert positive(r["reference_forwards_per_kept_step"]), r
            assert r["ratio_vs_ppo"] == pytest.approx(r["update_s"] / ppo["update_s"])
            assert r["extra_vs_ppo_s"] == pytest.approx(r["update_s"] - ppo["update_s"])
        assert "ref_log_prob" in by_name["d3po"]["needs"] and "ref_error" in by_name["diffusion_dpo"]["needs"]


def test_report_has_a_row_per_interval_and_objective(objectives_run):
    out, doc = objectives_run
    report = bench_objectives.format_report(doc)
    assert out.strip() == report.strip()
    assert report.startswith("## b2fast objectives on ") and "(cpu, " in report
    rows = table_rows(report, "L")
    assert [(int(r[0]), r[1]) for r in rows] == [(L, name) for L in QUICK_INTERVALS for name in OBJECTIVES]
    for name in OBJECTIVES:
        assert f"| {name} |" in report


def test_a_failed_objective_is_a_one_line_error_row():
    doc = {"records": [{"interval": 4, "objective": "ppo", "error": "RuntimeError: out of memory"},
                       {"interval": 4, "objective": "d3po", "update_s": 2.0, "reference_s": 0.5, "units": 4}]}
    bench_objectives.add_ppo_comparisons(doc["records"])
    assert doc["records"][1]["ratio_vs_ppo"] is None and doc["records"][1]["extra_vs_ppo_s"] is None
