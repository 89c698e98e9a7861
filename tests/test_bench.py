"""``python -m b2fast.bench``: the kernels suite runs on the CPU, reports every live backend and
writes JSON; the rewards suite runs ``--quick`` (tiny models) on the CPU and reports every reward;
``all --quick`` runs every suite in turn, the SD suites (sample, train, stage) on the tiny model,
each reporting b2fast against its baseline measured in the same run.

Speed is never asserted here (docs/algorithm.md, "Measuring speed"): only that the suites run,
cover every op × live backend and every reward, and report positive, finite numbers in the
documented formats.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import subprocess
import sys

import pytest
import torch

from b2fast import bench, bench_kernels, bench_rewards, ops

CASE_OPS = {"ddim_step_with_logprob": "ddim_step_with_logprob", "ddim_logprob_fwd": "ddim_logprob",
            "ddim_logprob_fwd_bwd": "ddim_logprob", "branch_fork": "branch_fork"}
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


def run_main(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = bench.main(argv)
    return code, out.getvalue(), err.getvalue()


def table_rows(report: str, first_header: str = "op") -> list[list[str]]:
    """The body rows of the Markdown table, as lists of stripped cells."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in report.splitlines() if line.startswith("| ")]
    assert rows and rows[0][0] == first_header, report
    return rows[1:]


def expected_backends(op: str) -> list[str]:
    """torch (the baseline) and every other backend live on the CPU, triton excepted."""
    live = ops.available_backends(op, "cpu")
    return ["torch"] + [b for b in live if b not in ("torch", "triton")]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "kernels.json"
    code, out, err = run_main(["kernels", "--quick", "--device", "cpu", "--json", str(path)])
    assert code == 0, err
    return out, err, json.loads(path.read_text(encoding="utf-8"))


def test_table_has_a_row_per_case_and_live_backend(quick_run):
    out, _, _ = quick_run
    rows = table_rows(out)
    got = {(r[0], r[1]) for r in rows}
    want = {(case, b) for case, op in CASE_OPS.items() for b in expected_backends(op)}
    assert got == want and len(rows) == len(want)
    assert "copy bandwidth" in out and torch.__version__ in out
    assert bench_kernels.device_name(torch.device("cpu")) in out.splitlines()[0]


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
    code = f"import sys; from b2fast.bench import main; rc = main([{suite!r}, '--help']); " \
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
    assert code == 2 and err.strip() == "error: --device: got 'cuda' but no CUDA device is visible"


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
    path = tmp_path_factory.mktemp("bench") / "rewards.json"
    code, out, err = run_main(["rewards", "--quick", "--device", "cpu", "--json", str(path)])
    assert code == 0, err
    return out, json.loads(path.read_text(encoding="utf-8"))


def test_rewards_table_has_a_row_per_reward_with_positive_numbers(rewards_run):
    out, _ = rewards_run
    rows = table_rows(out, "reward")
    assert [r[0] for r in rows] == list(bench.REWARD_CASES)
    for row in rows:
        cells = row[3:6] if row[0] == "jpeg" else row[3:9] + row[10:]  # jpeg: no FLOPs, no baseline
        for cell in cells:  # ms/call, images/s, s per 1280, [GFLOP/image, TFLOP/s, % of matmul, baseline]
            assert math.isfinite(float(cell)) and float(cell) > 0, row
        assert row[9] == "-"  # peak memory: CUDA only
    assert "float32 matmul" in out and bench_kernels.device_name(torch.device("cpu")) in out.splitlines()[0]


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
        flops = bench_rewards.flop_count(lambda: mha(x, x, x, need_weights=False))
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


# ---- SD suites: sample, train, stage, all ---------------------------------------------------------

SD_TOP_FIELDS = {"suite", "date", "device", "device_type", "torch", "cuda", "diffusers", "b2fast", "threads",
                 "model", "dtype", "preset", "quick", "overrides", "config", "warmup", "repeats", "timer",
                 "flops", "backends"}
RATE_FIELDS = {"method", "interval", "case", "batch", "ms", "ms_p20", "ms_p80", "peak_gib", "gflop", "flops_of",
               "unet_ms", "tflops", "pct_of_ceiling", "speedup_vs_baseline"}
SAMPLE_FIELDS = RATE_FIELDS | {"images", "images_per_s", "gflop_per_image"}
TRAIN_FIELDS = RATE_FIELDS | {"trajectories", "pairs", "pairs_per_s", "ms_per_pair", "gflop_per_pair"}
STAGE_FIELDS = {"interval", "method", "source", "sampling_s", "reward_s", "training_s", "total_s", "kept",
                "peak_gib", "speedup_vs_baseline"}
QUICK_INTERVALS = [4, 6]  # schedule.min_interval, max_interval of --quick


@pytest.fixture(scope="module")
def all_run(tmp_path_factory):
    """``all --quick`` once: every suite in turn; stage composed from the earlier suites' parts."""
    path = tmp_path_factory.mktemp("bench") / "all.json"
    code, out, err = run_main(["all", "--quick", "--device", "cpu", "--json", str(path)])
    assert code == 0, err
    return out, json.loads(path.read_text(encoding="utf-8"))


def report_of(out: str, suite: str) -> str:
    """The part of ``all``'s stdout that is ``suite``'s report."""
    start = out.index(f"## b2fast {suite} on ")
    end = out.find("## b2fast ", start + 1)
    return out[start:end if end >= 0 else None]


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_all_runs_every_suite_in_order(all_run):
    out, doc = all_run
    assert doc["suite"] == "all" and list(doc["suites"]) == ["kernels", "rewards", "sample", "train", "stage"]
    assert [line.split()[2] for line in out.splitlines() if line.startswith("## b2fast ")] == list(doc["suites"])
    assert doc["suites"]["stage"]["parts_from"] == "earlier suites of all"


def test_sample_reports_every_case_with_consistent_numbers(all_run):
    out, doc = all_run
    sample = doc["suites"]["sample"]
    assert set(sample) == SD_TOP_FIELDS | {"ceiling", "settings", "methods", "records"}
    assert sample["ceiling"]["dtype"] == "float32" and positive(sample["ceiling"]["tflops"])
    assert sample["settings"]["intervals"] == QUICK_INTERVALS and sample["dtype"] == "float32"
    keys = [(r["case"], r["interval"], r["method"]) for r in sample["records"]]
    assert keys == [("sample", 4, "b2fast"), ("sample", 6, "b2fast"), ("decode", None, "b2fast"),
                    ("sample", 4, "baseline"), ("sample", 6, "baseline"), ("decode", None, "baseline")]
    assert len(table_rows(report_of(out, "sample"), "case")) == len(keys)
    by_key = {k: r for k, r in zip(keys, sample["records"])}
    for (case, L, method), r in by_key.items():
        assert set(r) == SAMPLE_FIELDS, r
        assert r["images"] == 2 * 3 and r["peak_gib"] is None  # P x K; no CUDA memory on a CPU
        for key in ("ms", "images_per_s", "gflop", "gflop_per_image", "tflops", "pct_of_ceiling"):
            assert positive(r[key]), (key, r)
        assert r["ms_p20"] <= r["ms"] <= r["ms_p80"]
        assert r["images_per_s"] == pytest.approx(6 / (r["ms"] / 1e3))
        assert r["flops_of"] == ("unet" if case == "sample" else "call")
        if case == "sample":  # the UNet is part of the call, in time and in FLOPs
            assert 0 < r["unet_ms"] < r["ms"] and r["gflop_per_image"] * 6 < r["gflop"]
        base = by_key[(case, L, "baseline")]
        assert r["speedup_vs_baseline"] == pytest.approx(base["ms"] / r["ms"])
        # the same work either way: equal UNet (or VAE) FLOPs per image
        assert r["gflop_per_image"] == pytest.approx(base["gflop_per_image"], rel=1e-9)
    assert by_key[("sample", 6, "b2fast")]["gflop_per_image"] > by_key[("sample", 4, "b2fast")]["gflop_per_image"]
    assert by_key[("sample", 4, "b2fast")]["batch"] == "4/12" and by_key[("sample", 4, "baseline")]["batch"] == "4/4"


def test_train_reports_pairs_per_second_for_both_methods(all_run):
    out, doc = all_run
    train = doc["suites"]["train"]
    assert set(train) == SD_TOP_FIELDS | {"ceiling", "settings", "methods", "records"}
    assert train["settings"]["trajectories"] == 2 and train["settings"]["micro_batch"] == 4
    assert [(r["interval"], r["method"]) for r in train["records"]] == \
        [(4, "b2fast"), (6, "b2fast"), (4, "baseline"), (6, "baseline")]
    assert len(table_rows(report_of(out, "train"), "L")) == 4
    for r in train["records"]:
        assert set(r) == TRAIN_FIELDS, r
        assert r["pairs"] == 2 * r["interval"] and r["flops_of"] == "call" and r["unet_ms"] is None
        for key in ("ms", "pairs_per_s", "ms_per_pair", "gflop_per_pair", "tflops", "pct_of_ceiling"):
            assert positive(r[key]), (key, r)
        assert r["pairs_per_s"] == pytest.approx(r["pairs"] / (r["ms"] / 1e3))
        assert r["batch"] == (8 if r["method"] == "b2fast" else 4)  # CFG doubles micro_batch 4 and 2
    per_pair = {r["gflop_per_pair"] for r in train["records"]}
    assert max(per_pair) == pytest.approx(min(per_pair), rel=1e-9)  # same LoRA fwd+bwd per pair


def test_stage_is_composed_from_the_measured_parts(all_run):
    out, doc = all_run
    stage, suites = doc["suites"]["stage"], doc["suites"]
    assert set(stage) == SD_TOP_FIELDS | {"settings", "parts_from", "parts", "records"}
    s = stage["settings"]
    assert (s["batches"], s["images"], s["epochs"], s["kept"]) == (4, 24, 2, round(0.84 * 2 * 4 * 2))
    assert len(table_rows(report_of(out, "stage"), "L")) == 4
    clip = next(r for r in suites["rewards"]["records"] if r["reward"] == "clipscore")
    for r in stage["records"]:
        assert set(r) == STAGE_FIELDS and r["source"] == "composed", r
        sample = next(x for x in suites["sample"]["records"]
                      if (x["case"], x["interval"], x["method"]) == ("sample", r["interval"], r["method"]))
        train = next(x for x in suites["train"]["records"]
                     if (x["interval"], x["method"]) == (r["interval"], r["method"]))
        rate = clip["images_per_s"] if r["method"] == "b2fast" else clip["baseline_images_per_s"]
        assert r["sampling_s"] == pytest.approx(4 * sample["ms"] / 1e3)
        assert r["reward_s"] == pytest.approx(24 / rate)
        assert r["training_s"] == pytest.approx(s["kept"] * r["interval"] * 2 * train["ms_per_pair"] / 1e3)
        assert r["total_s"] == pytest.approx(r["sampling_s"] + r["reward_s"] + r["training_s"])
        base = next(x for x in stage["records"] if x["interval"] == r["interval"] and x["method"] == "baseline")
        assert r["speedup_vs_baseline"] == pytest.approx(base["total_s"] / r["total_s"])


def test_stage_full_runs_real_stages(all_run, tmp_path):
    """--full: one Trainer.run_stage per interval after the composed rows (parts from ``all``)."""
    args = bench.parse_args(["stage", "--quick", "--device", "cpu", "--full"])
    args.earlier = all_run[1]["suites"]
    doc, report, code = bench.run_suite("stage", args)
    assert code == 0
    measured = [r for r in doc["records"] if r["source"] == "measured"]
    assert [r["interval"] for r in measured] == QUICK_INTERVALS
    for r in measured:
        assert set(r) == STAGE_FIELDS | {"stage"} and r["method"] == "b2fast" and r["reward_s"] is None
        assert positive(r["sampling_s"]) and positive(r["training_s"]) and 0 <= r["kept"] <= 2 * 8
        assert r["total_s"] == pytest.approx(r["sampling_s"] + r["training_s"])
        base = next(x for x in doc["records"] if x["interval"] == r["interval"] and x["method"] == "baseline")
        same_kept = base["sampling_s"] + base["reward_s"] + base["training_s"] * r["kept"] / base["kept"]
        assert r["speedup_vs_baseline"] == pytest.approx(same_kept / r["total_s"])
    assert "Trainer.run_stage" in report and len(table_rows(report, "L")) == 6


def test_stage_alone_measures_its_own_parts(all_run, monkeypatch):
    """Without ``all``, stage runs the sample, train and rewards measurements itself (stubbed
    here with ``all``'s documents; the suites themselves are tested above)."""
    from b2fast import bench_rewards, bench_sample, bench_train

    suites, calls = all_run[1]["suites"], []
    for module, name in ((bench_sample, "sample"), (bench_train, "train"), (bench_rewards, "rewards")):
        monkeypatch.setattr(module, "measure", lambda args, name=name: calls.append(
            (name, getattr(args, "rewards", None))) or suites[name])
    doc, _, code = bench.run_suite("stage", bench.parse_args(["stage", "--quick", "--device", "cpu"]))
    assert code == 0 and doc["parts_from"] == "this suite"
    assert calls == [("sample", None), ("train", None), ("rewards", ["clipscore"])]
    assert [r["total_s"] for r in doc["records"]] == [r["total_s"] for r in suites["stage"]["records"]]


def test_a_failing_case_gives_a_failed_row_and_exit_code_1(monkeypatch, tmp_path):
    """An OOM in the baseline costs its rows and the speed-ups, not the run."""
    from b2fast import bench_sample, bench_sd

    def fake_measure(fn, device, warmup, repeats, module=None, count_fn=None):
        if getattr(fn, "func", None) is bench_sample.baseline_sample:
            raise RuntimeError("CUDA out of memory\nsecond line")
        watched = module is not None
        return {"ms": 2.0, "ms_p20": 1.0, "ms_p80": 3.0, "peak_gib": None, "flops": 10 ** 9,
                "module_ms": 1.0 if watched else None, "module_flops": 10 ** 8 if watched else None}

    monkeypatch.setattr(bench_sd, "measure_call", fake_measure)
    path = tmp_path / "s.json"
    code, out, _ = run_main(["sample", "--quick", "--device", "cpu", "--json", str(path)])
    assert code == 1
    records = json.loads(path.read_text(encoding="utf-8"))["records"]
    failed = [r for r in records if "error" in r]
    assert [(r["case"], r["method"]) for r in failed] == [("sample", "baseline")] * 2
    assert failed[0]["error"] == "RuntimeError: CUDA out of memory"
    ok = {(r["case"], r["method"]): r for r in records if "error" not in r}
    assert ok[("sample", "b2fast")]["speedup_vs_baseline"] is None
    assert ok[("decode", "b2fast")]["speedup_vs_baseline"] == 1.0
    assert ok[("sample", "b2fast")]["tflops"] == pytest.approx(1e8 / 1e-3 / 1e12)  # UNet FLOPs / UNet time
    assert sum("failed: RuntimeError: CUDA out of memory" in " ".join(r) for r in table_rows(out, "case")) == 2


def test_config_overrides_reach_the_suites():
    args = bench.parse_args(["train", "--quick", "--train.micro_batch", "2", "--model.channels_last", "true",
                             "--schedule.max_interval=5", "--trajectories", "3"])
    assert args.cfg.train.micro_batch == 2 and args.cfg.model.channels_last is True
    assert args.cfg.sampling.num_steps == 6 and args.cfg.model.dtype == "float32"  # --quick's settings
    assert args.intervals == [4, 5] and args.trajectories == 3
    assert args.overrides == ["--train.micro_batch", "2", "--model.channels_last", "true", "--schedule.max_interval=5"]
    full = bench.parse_args(["stage", "--schedule.min_interval", "20"])
    assert full.cfg.model.dtype == "bfloat16" and full.intervals == [20] and full.kept == 430


def test_all_passes_config_and_overrides_to_the_sd_suites_only():
    from b2fast.bench_all import suite_argv

    args = bench.parse_args(["all", "--quick", "--device", "cpu", "--train.micro_batch", "2"])
    assert suite_argv("kernels", args) == ["kernels", "--device", "cpu", "--quick"]
    assert suite_argv("train", args) == ["train", "--device", "cpu", "--quick", "--train.micro_batch", "2"]


def test_baseline_policy_drops_the_fast_paths():
    from b2fast.bench_sd import baseline_model_config
    from b2fast.config import ModelConfig

    fast = ModelConfig(path="x", dtype="float16", lora_rank=8, attention="xformers", channels_last=True,
                       compile=True, compile_mode="max-autotune")
    base = baseline_model_config(fast)
    assert (base.path, base.dtype, base.lora_rank, base.lora_targets) == ("x", "float16", 8, fast.lora_targets)
    assert base.attention == "sdpa" and not base.channels_last and not base.compile


def test_random_sd15_has_the_sd15_architecture():
    """Parameter counts of runwayml/stable-diffusion-v1-5's UNet, VAE and text encoder (on the
    meta device: no memory, no time)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from b2fast.testing.random_sd import SD15_TEXT, SD15_UNET, SD15_VAE

    with torch.device("meta"):
        sizes = [sum(p.numel() for p in m.parameters()) for m in (
            UNet2DConditionModel(**SD15_UNET), AutoencoderKL(**SD15_VAE), CLIPTextModel(CLIPTextConfig(**SD15_TEXT)))]
    assert sizes == [859_520_964, 83_653_863, 123_060_480]


def test_module_share_counts_time_and_flops_inside_one_module():
    from b2fast.bench_rewards import flop_counter_mode
    from b2fast.bench_sd import ModuleShare

    inner = torch.nn.Linear(8, 16)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), inner)
    x, cpu = torch.rand(3, 4), torch.device("cpu")
    with flop_counter_mode() as counter, ModuleShare(inner, cpu, counter) as share:
        model(x)
        model(x)
    assert share.flops == 2 * (2 * 3 * 8 * 16) and counter.get_total_flops() == share.flops + 2 * (2 * 3 * 4 * 8)
    assert len(share.spans) == 2 and share.ms() > 0
    inner(x @ torch.ones(4, 8))  # not watched any more
    assert len(share.spans) == 2


def test_flop_count_includes_cpu_scaled_dot_product_attention():
    """The CPU kernel FlopCounterMode skips (the UNet's attention in --quick), forward and backward."""
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    q, k, v = (torch.rand(2, 3, n, 8, requires_grad=True) for n in (5, 7, 7))
    attention = torch.nn.functional.scaled_dot_product_attention
    forward = sdpa_flop_count(q.shape, k.shape, v.shape)
    assert bench_rewards.flop_count(lambda: attention(q, k, v)) == forward > 0
    both = bench_rewards.flop_count(lambda: attention(q, k, v).sum().backward())
    assert both == forward + sdpa_backward_flop_count(q.shape, q.shape, k.shape, v.shape)
