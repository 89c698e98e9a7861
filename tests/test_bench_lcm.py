"""``python -m b2fast.bench lcm --quick``: a B² stage on an LCM policy against the DDIM policy at
equal images, on the toy models and on the tiny SD model with a guidance embedding.

Speed is never asserted (docs/algorithm.md, "Measuring speed"): only that both policies run real
stages of the same images, that the UNet rows the hook counts are the ones each policy's
sampling and update must run, and that the speed-ups are the ratios of the reported seconds.
"""
from __future__ import annotations

import math

import pytest
from bench_util import run_main, run_quick, table_rows

FIELDS = {"policy", "model", "steps", "interval", "trained_steps", "images", "sampling_s", "training_s", "total_s",
          "kept", "sampling_rows_per_image", "training_rows_per_image", "peak_gib"}


@pytest.fixture(scope="module", params=["toy", "sd"])
def lcm_run(request, tmp_path_factory):
    extra = ["--sampling.prompts_per_batch", "4"] if request.param == "toy" else []
    out, _, doc = run_quick(tmp_path_factory.mktemp("bench"), "lcm", "--model", request.param,
                            "--warmup", "1", "--repeats", "1", *extra)
    return request.param, out, doc


def test_both_policies_run_a_stage_of_the_same_images(lcm_run):
    model, _, doc = lcm_run
    assert doc["suite"] == "lcm" and doc["settings"]["models"] == model and doc["settings"]["lcm_steps"] == 4
    ddim, lcm = doc["records"]
    assert ddim["policy"] == "ddim" and lcm["policy"] == "lcm"
    for r in (ddim, lcm):
        assert set(r) - {"speedup_vs_ddim"} == FIELDS, r
        assert r["images"] == doc["settings"]["images"] and r["kept"] > 0
        for key in ("sampling_s", "training_s", "total_s"):
            assert isinstance(r[key], float) and math.isfinite(r[key]) and r[key] > 0, (key, r)
        assert r["total_s"] == pytest.approx(r["sampling_s"] + r["training_s"], abs=1e-3)  # timed apart
    cfg = doc["config"]
    assert ddim["steps"] == ddim["interval"] == ddim["trained_steps"] == cfg["schedule"]["max_interval"]
    assert (lcm["steps"], lcm["interval"], lcm["trained_steps"]) == (4, 4, 3)     # the last step: deterministic
    if model == "toy":
        assert ddim["model"] == "b2fast:toy" and lcm["model"] == "b2fast:toy-lcm"


def test_unet_rows_are_what_each_policy_must_run(lcm_run):
    """Branches forked at step 0 (interval = steps): DDIM samples 2 rows (CFG) per image and step,
    the LCM 1; the update runs kept × trained steps × epochs rows, ×2 with CFG."""
    _, _, doc = lcm_run
    epochs = doc["config"]["train"]["epochs"]
    for r, cfg_rows in zip(doc["records"], (2, 1)):
        assert r["sampling_rows_per_image"] == cfg_rows * r["steps"], r
        assert r["training_rows_per_image"] * r["images"] == cfg_rows * r["kept"] * r["trained_steps"] * epochs, r


def test_speedups_are_ratios_of_the_seconds_and_the_table_shows_them(lcm_run):
    _, out, doc = lcm_run
    ddim, lcm = doc["records"]
    for part in ("sampling", "training", "total"):
        assert lcm["speedup_vs_ddim"][part] == pytest.approx(ddim[f"{part}_s"] / lcm[f"{part}_s"])
    rows = table_rows(out, "policy")
    assert [r[0] for r in rows] == ["ddim", "lcm"] and rows[0][-1] == "1 (baseline)"
    assert rows[1][-1].count(",") == 2


@pytest.mark.parametrize("argv, message", [(["--lcm-steps", "1"], "--lcm-steps"),
                                           (["--model", "xl"], "--model"),
                                           (["--model.path", "x"], "--model.path")])
def test_bad_arguments_fail_in_one_line_before_measuring(argv, message):
    code, out, err = run_main(["lcm", "--device", "cpu", *argv])
    assert code == 2 and out == "" and message in err and err.count("\n") == 1, err
