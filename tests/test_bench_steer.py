"""``python -m b2fast.bench steer --quick``: FK steering against plain sampling of the same images on
the tiny model.

Speed is never asserted here (docs/algorithm.md, "Measuring speed"): only that the suite runs,
reports the documented fields, that the overhead is FK − plain, that both make the same UNet calls,
and that the potential steps are the ones ``resampling_steps`` schedules.
"""
from __future__ import annotations

import math

import pytest
from bench_util import run_main, run_quick, table_rows

from b2fast.bench import steer as bench_steer
from b2fast.core.steering import resampling_steps

MEASURED = {"prompts", "particles", "images", "num_steps", "potential_steps", "potential_step_indices", "resample",
            "unet_calls_plain", "unet_calls_fk", "reward_images", "plain_s", "plain_s_p20", "plain_s_p80", "fk_s",
            "fk_s_p20", "fk_s_p80", "overhead_s", "overhead_share", "decode_s", "reward_s", "other_s",
            "overhead_ms_per_step_particle"}


@pytest.fixture(scope="module")
def steer_run(tmp_path_factory):
    """``steer --quick --device cpu --repeats 1 --json``: stdout and the JSON document."""
    out, _, doc = run_quick(tmp_path_factory.mktemp("bench"), "steer", "--repeats", "1")
    return out, doc


def test_fields_and_settings(steer_run):
    _, doc = steer_run
    assert doc["suite"] == "steer" and doc["device_type"] == "cpu" and doc["quick"]
    s = doc["settings"]
    assert s["prompts"] == 2 and s["particles"] == 4 and s["reward"] == "clipscore"  # --quick: P = 2, N = 4
    assert s["steer"]["lam"] == 10.0 and s["steer"]["potential"] == "diff"
    [r] = doc["records"]
    assert set(r) == MEASURED, r
    assert r["prompts"] == 2 and r["particles"] == 4 and r["images"] == 8 and r["num_steps"] == 6
    for key in ("plain_s", "fk_s", "decode_s", "reward_s"):
        assert isinstance(r[key], float) and math.isfinite(r[key]) and r[key] > 0, (key, r)
    assert r["plain_s_p20"] <= r["plain_s"] <= r["plain_s_p80"] and r["fk_s_p20"] <= r["fk_s"] <= r["fk_s_p80"]


def test_overhead_is_fk_minus_plain_and_its_parts(steer_run):
    _, doc = steer_run
    [r] = doc["records"]
    assert r["overhead_s"] == pytest.approx(r["fk_s"] - r["plain_s"], abs=1e-12)
    assert r["overhead_share"] == pytest.approx(r["overhead_s"] / r["fk_s"])
    assert r["other_s"] == pytest.approx(r["overhead_s"] - r["decode_s"] - r["reward_s"], abs=1e-12)
    assert r["overhead_ms_per_step_particle"] == pytest.approx(
        r["overhead_s"] * 1e3 / (r["potential_steps"] * r["images"]))


def test_potential_steps_and_equal_unet_calls(steer_run):
    _, doc = steer_run
    [r] = doc["records"]
    st = doc["settings"]["steer"]
    steps = resampling_steps(st["start"], st["every"], st["end"], r["num_steps"])
    assert r["potential_steps"] == len(steps) and r["potential_step_indices"] == steps == [0, 1, 2, 5]
    assert r["unet_calls_plain"] == r["unet_calls_fk"] == r["num_steps"]  # one CFG batch per step
    assert r["reward_images"] == len(steps) * r["images"]


def test_report_has_the_table(steer_run):
    out, doc = steer_run
    report = bench_steer.format_report(doc)
    assert out.strip() == report.strip()
    assert report.startswith("## b2fast steer on ") and "(cpu, " in report
    [row] = table_rows(report, "images")
    r = doc["records"][0]
    assert row[:4] == ["8", "6", str(r["potential_steps"]), f"{r['unet_calls_plain']} / {r['unet_calls_fk']}"]
    assert "| overhead s | overhead % | decode s | reward s |" in report


def test_a_failed_case_is_a_one_line_error_row():
    doc = {"settings": {"prompts": 2, "particles": 4, "reward": "clipscore", "reward_model": "m",
                        "steer": {"particles": 4, "lam": 10.0, "potential": "diff", "resample": "schedule",
                                  "weights": "smc"}},
           "suite": "steer", "device": "cpu", "device_type": "cpu", "threads": 1, "torch": "t", "cuda": None,
           "diffusers": "d", "b2fast": "b", "date": "now", "model": "tiny", "dtype": "float32", "preset": None,
           "quick": True, "overrides": [], "repeats": 1, "warmup": 1, "timer": "perf_counter",
           "records": [{"error": "RuntimeError: out of memory"}]}
    report = bench_steer.format_report(doc)
    assert "| failed: RuntimeError: out of memory |" in report


def test_a_deterministic_sampler_is_refused_in_one_line():
    code, out, err = run_main(["steer", "--quick", "--device", "cpu", "--sampling.eta", "0"])
    assert code == 2 and out == ""
    assert err.startswith("error: sampling.eta") and err.count("\n") == 1, err


def test_the_toy_world_model_steers_by_toy_align(tmp_path):
    """``--model toy``: b2fast:toy with the toy_ddim preset, scored by the exact toy_align; the same
    UNet calls for plain and FK (CFG: one batch per step), every potential step scored."""
    _, _, doc = run_quick(tmp_path, "steer", "--model", "toy", "--repeats", "1", "--sampling.num_steps", "4",
                          "--schedule.min_interval", "2", "--schedule.max_interval", "4",
                          "--sampling.prompts_per_batch", "2")
    assert doc["model"] == "b2fast:toy" and doc["preset"].endswith("toy_ddim.yaml")
    s = doc["settings"]
    assert (s["reward"], s["reward_model"], s["prompts"]) == ("toy_align", "exact detector", 2)
    [r] = doc["records"]
    assert set(r) == MEASURED, r
    st = s["steer"]
    steps = resampling_steps(st["start"], st["every"], st["end"], 4)
    assert r["potential_step_indices"] == steps and r["reward_images"] == len(steps) * 8
    assert r["unet_calls_plain"] == r["unet_calls_fk"] == 4
    report = bench_steer.format_report(doc)
    assert "model: b2fast:toy" in report and "reward toy_align, exact detector" in report


def test_steer_refuses_an_unknown_model_in_one_line():
    code, out, err = run_main(["steer", "--device", "cpu", "--model", "sdxl"])
    assert code == 2 and out == "" and "--model" in err
