"""``python -m b2fast.bench``: the kernels suite runs on the CPU, reports every live backend and
writes JSON; the rewards suite runs ``--quick`` (tiny models) on the CPU and reports every reward;
the command line checks its arguments before any work (the SD suites: test_bench_sd.py).

Speed is never asserted here (docs/algorithm.md, "Measuring speed"): only that the suites run,
cover every op × live backend and every reward, and report positive, finite numbers in the
documented formats.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from b2fast import ops
from b2fast.bench import cli as bench, common as bench_common, kernels as bench_kernels, rewards as bench_rewards
from bench_util import run_main, run_quick, table_rows

CASE_OPS = {"ddim_step_with_logprob": "ddim_step_with_logprob", "ddim_logprob_fwd": "ddim_logprob",
            "ddim_logprob_fwd_bwd": "ddim_logprob", "branch_fork": "branch_fork",
            "fork_index": "fork_index"}
TOP_FIELDS = {"suite", "date", "device", "device_type", "torch", "cuda", "b2fast", "threads",
              "eps_dtype", "cache_dtype", "noise_dtype", "steps", "branches", "warmup", "repeats",
              "timer", "backends", "copy", "records"}
RECORD_FIELDS = {"case", "op", "backend", "shape", "label", "bytes", "ms", "ms_p20", "ms_p80",
                 "gbps", "pct_of_copy", "speedup_vs_torch"}
REWARDS_TOP_FIELDS = {"suite", "date", "device", "device_type", "torch", "cuda", "b2fast", "open_clip",
                      "transformers", "threads", "image_size", "images", "warmup", "repeats", "timer",
                      "float32_matmul_precision", "matmul", "records"}
REWARDS_RECORD_FIELDS = {"reward", "model", "batch_size", "ms", "ms_p20", "ms_p80", "images_per_s",
                         "s_per_1280", "gflop_per_image", "tflops", "pct_of_matmul", "peak_gib",
                         "baseline_ms", "baseline_images_per_s", "speedup_vs_baseline", "baseline_peak_gib"}


def expected_backends(op: str) -> list[str]:
    """torch (the baseline) and every other backend live on the CPU, triton excepted."""
    live = ops.available_backends(op, "cpu")
    return ["torch"] + [b for b in live if b not in ("torch", "triton")]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    return run_quick(tmp_path_factory.mktemp("bench"), "kernels")


def test_table_has_a_row_per_case_and_live_backend(quick_run):
    out, _, _ = quick_run
    rows = table_rows(out)
    got = {(r[0], r[1]) for r in rows}
    want = {(case, b) for case, op in CASE_OPS.items() for b in expected_backends(op)}
    assert got == want and len(rows) == len(want)
    assert "copy bandwidth" in out and torch.__version__ in out
    assert bench_common.device_name(torch.device("cpu")) in out.splitlines()[0]


def test_table_numbers_are_positive_and_finite(quick_run):
    for row in table_rows(quick_run[0]):
        for cell in row[3:]:  # ms, GB/s, % of copy, × vs torch
            value = float(cell)
            assert math.isfinite(value) and value > 0, row
        if row[1] == "torch":
            assert float(row[6]) == 1.0


def test_json_has_the_documented_fields(quick_run):
    out, _, doc = quick_run
    assert set(doc) == TOP_FIELDS
    assert doc["suite"] == "kernels" and doc["device_type"] == "cpu"
    assert doc["eps_dtype"] == "float32" and doc["cache_dtype"] == "float16"
    assert doc["copy"]["gbps"] > 0 and doc["copy"]["bytes"] == 2 * 16 * 2 ** 20
    assert len(doc["records"]) == len(table_rows(out))
    for r in doc["records"]:
        assert set(r) == RECORD_FIELDS, r
        assert CASE_OPS[r["case"]] == r["op"] and r["bytes"] > 0
        for key in ("ms", "ms_p20", "ms_p80", "gbps", "pct_of_copy", "speedup_vs_torch"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
        assert r["ms_p20"] <= r["ms"] <= r["ms_p80"]


def test_step_bytes_are_counted_as_documented(quick_run):
    """ε halves fp32 + x_t fp16 + noise fp32 + table + step index, write x_prev fp16 + log p."""
    step = next(r for r in quick_run[2]["records"] if r["case"] == "ddim_step_with_logprob")
    B, n = step["shape"][0], math.prod(step["shape"])
    assert step["bytes"] == n * (4 + 4 + 2 + 4 + 2) + B * (8 + 4) + 20 * 6 * 4


def test_progress_goes_to_stderr_one_line_per_measurement(quick_run):
    _, err, doc = quick_run
    lines = [line for line in err.splitlines() if " ms " in line]
    assert len(lines) == len(doc["records"])


@pytest.mark.parametrize("argv, word", [(["--help"], "kernels"), (["kernels", "--help"], "kernels"),
                                        (["--help"], "rewards"), (["rewards", "--help"], "ViT-H-14"),
                                        (["--help"], "stage"), (["sample", "--help"], "sample_branches"),
                                        (["train", "--help"], "policy_update"), (["stage", "--help"], "--full"),
                                        (["all", "--help"], "kernels, rewards, sample, train and stage")])
def test_help_exits_zero(argv, word):
    code, out, _ = run_main(argv)
    assert code == 0 and word in out


@pytest.mark.parametrize("suite, option", [("kernels", "--cache-dtype"), ("rewards", "--blip"),
                                           ("sample", "--config"), ("stage", "--kept")])
def test_help_imports_no_torch(suite, option):
    """--help is instant: the CLI module parses arguments without importing torch."""
    code = f"import sys; from b2fast.bench.cli import main; rc = main([{suite!r}, '--help']); " \
           "assert rc == 0 and 'torch' not in sys.modules, sorted(sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert option in done.stdout


@pytest.mark.parametrize("argv, names", [
    (["kernels", "--device", "tpu"], "--device"),
    (["kernels", "--dtype", "int8"], "--dtype"),
    (["kernels", "--shapes", "4x4"], "--shapes"),
    (["kernels", "--backends", "tpu"], "--backends"),
    (["kernels", "--repeats", "0"], "--repeats"),
    (["benchmarks"], "SUITE"),
    (["rewards", "--device", "tpu"], "--device"),
    (["rewards", "--rewards", "clipscore", "pickscore"], "--rewards"),
    (["rewards", "--images", "0"], "--images"),
    (["rewards", "--blip", "huge"], "--blip"),
    (["kernels", "--train.lr", "1"], "unrecognized arguments: --train.lr 1"),
    (["sample", "--device", "tpu"], "--device"),
    (["sample", "--train.micro_batchx", "3"], "train.micro_batchx: unknown field"),
    (["train", "--train.micro_batch", "-1"], "train.micro_batch: got -1"),
    (["train", "--sampling.num_steps", "lots"], "sampling.num_steps"),
    (["sample", "junk"], "'junk'"),
    (["stage", "--model.path", "/models/sd15"], "--model.path"),
    (["stage", "--reward.name=jpeg_compressibility"], "--reward.name"),
    (["stage", "--kept", "0"], "--kept"),
    (["train", "--trajectories", "x"], "--trajectories"),
    (["sample", "--config", "no-such-preset.yaml"], "--config"),
    (["all", "--quick", "--schedule.max_interval", "30"], "schedule.max_interval"),
])
def test_bad_option_exits_with_one_line_error(argv, names):
    code, out, err = run_main(argv)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and names in err


@pytest.mark.parametrize("suite", ["kernels", "rewards", "sample", "all"])
def test_unwritable_json_path_fails_before_measuring(suite, tmp_path, monkeypatch):
    """--json is checked first: a long run must not end unable to write its records."""
    def never(*args, **kwargs):
        raise AssertionError("the benchmark ran before --json was checked")

    monkeypatch.setattr(bench, "run_suite", never)
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep\n")
    for path, fragment in [(a_file / "k.json", "is a file, not a folder"), (tmp_path, "is a folder; give a file path")]:
        code, out, err = run_main([suite, "--quick", "--device", "cpu", "--json", str(path)])
        assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
        assert err.startswith("error: --json: ") and fragment in err
    assert a_file.read_text() == "keep\n" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error when no CUDA is visible")
def test_cuda_without_a_gpu_is_a_one_line_error():
    code, _, err = run_main(["kernels", "--device", "cuda", "--quick"])
    assert code == 2 and err.strip() == "error: --device: got 'cuda' but no CUDA device is visible; use --device cpu"


def test_shape_options_resolve_without_torch_work():
    args = bench.parse_args(["kernels", "--batch", "8", "--large"])
    assert args.shapes == [(8, 4, 64, 64), (8, 4, 128, 128)]
    args = bench.parse_args(["kernels", "--shapes", "3x2x5x7", "--ops", "branch_fork"])
    assert args.shapes == [(3, 2, 5, 7)] and args.ops == ["branch_fork"]


def test_a_failing_backend_gives_a_failed_row_and_exit_code_1(monkeypatch, tmp_path):
    """A kernel that raises costs its row, not the run; the torch baseline still reports."""
    monkeypatch.setattr(bench_kernels, "backends_to_run", lambda op, device, requested:
                        ["torch", "no-such-backend"])
    path = tmp_path / "k.json"
    code, out, err = run_main(["kernels", "--quick", "--device", "cpu", "--ops", "branch_fork",
                               "--json", str(path)])
    assert code == 1
    rows = table_rows(out)
    assert [r[1] for r in rows] == ["torch", "no-such-backend"] and "failed" in rows[1][3]
    records = json.loads(path.read_text(encoding="utf-8"))["records"]
    assert "error" in records[1] and records[0]["ms"] > 0


# ---- rewards ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rewards_run(tmp_path_factory):
    out, _, doc = run_quick(tmp_path_factory.mktemp("bench"), "rewards")
    return out, doc


def test_rewards_table_has_a_row_per_reward_with_positive_numbers(rewards_run):
    out, _ = rewards_run
    rows = table_rows(out, "reward")
    assert [r[0] for r in rows] == list(bench.REWARD_CASES)
    for row in rows:
        cells = row[3:6] if row[0] == "jpeg" else row[3:9] + row[10:]  # jpeg: no FLOPs, no baseline
        for cell in cells:  # ms/call, images/s, s per 1280, [GFLOP/image, TFLOP/s, % of matmul, baseline]
            assert math.isfinite(float(cell)) and float(cell) > 0, row
        assert row[9] == "-"  # peak memory: CUDA only
    assert "float32 matmul" in out and bench_common.device_name(torch.device("cpu")) in out.splitlines()[0]


def test_rewards_json_has_the_documented_fields(rewards_run):
    _, doc = rewards_run
    assert set(doc) == REWARDS_TOP_FIELDS
    assert doc["suite"] == "rewards" and doc["image_size"] == 64 and doc["images"] == 4
    assert doc["matmul"]["tflops"] > 0
    for r in doc["records"]:
        assert set(r) == REWARDS_RECORD_FIELDS, r
        assert r["ms_p20"] <= r["ms"] <= r["ms_p80"] and r["peak_gib"] is None
        assert r["images_per_s"] == pytest.approx(4 / (r["ms"] / 1e3))
        assert r["s_per_1280"] == pytest.approx(1280 / r["images_per_s"])
        if r["reward"] == "jpeg":
            assert r["baseline_ms"] is None and r["gflop_per_image"] is None
        else:
            assert r["speedup_vs_baseline"] == pytest.approx(r["baseline_ms"] / r["ms"])
            assert r["gflop_per_image"] > 0 and r["batch_size"] >= 1


def test_rewards_suite_builds_every_reward_the_cli_offers():
    assert set(bench_rewards.BUILDERS) == set(bench.REWARD_CASES)
    assert bench.parse_args(["rewards", "--rewards", "jpeg", "clipscore"]).rewards == ["clipscore", "jpeg"]


def test_flop_count_includes_fused_multi_head_attention():
    """open_clip's towers run nn.MultiheadAttention's fused inference path, which FlopCounterMode
    alone counts as 0 FLOPs: projections 2·B·E²·(2·Lq + 2·Lk) + attention 4·B·Lq·Lk·E."""
    mha = torch.nn.MultiheadAttention(16, 2, batch_first=True).eval().requires_grad_(False)
    x = torch.rand(3, 5, 16)
    with torch.inference_mode():
        flops = bench_common.flop_count(lambda: mha(x, x, x, need_weights=False))
    assert flops == 2 * 3 * 16 * 16 * (2 * 5 + 2 * 5) + 4 * 3 * 5 * 5 * 16


def test_a_failing_reward_gives_a_failed_row_and_exit_code_1(monkeypatch, tmp_path):
    """A reward that cannot be built costs its row, not the run."""
    def broken(args, device, tmp):
        raise RuntimeError("CUDA out of memory\nsecond line")

    monkeypatch.setitem(bench_rewards.BUILDERS, "clipscore", broken)
    path = tmp_path / "r.json"
    code, out, _ = run_main(["rewards", "--quick", "--device", "cpu", "--rewards", "clipscore", "jpeg",
                             "--json", str(path)])
    assert code == 1
    rows = table_rows(out, "reward")
    assert [r[0] for r in rows] == ["clipscore", "jpeg"] and "failed: RuntimeError: CUDA out of memory" in rows[0][1]
    records = json.loads(path.read_text(encoding="utf-8"))["records"]
    assert records[0] == {"reward": "clipscore", "error": "RuntimeError: CUDA out of memory"}
    assert records[1]["images_per_s"] > 0
