"""``python -m b2fast.bench all --quick``: every suite in turn, the SD suites (sample, train,
stage) on the tiny model, each reporting b2fast against its baseline measured in the same run.

Speed is never asserted here (docs/algorithm.md, "Measuring speed"): only that the suites run,
report positive, finite numbers in the documented formats, and compose as documented.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from b2fast.bench import cli as bench, common as bench_common
from bench_util import run_main, run_quick, table_rows


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
    out, _, doc = run_quick(tmp_path_factory.mktemp("bench"), "all")
    return out, doc


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


def test_stage_compose_on_round_numbers():
    """compose() and the speed-ups on hand-made parts, expected seconds worked out by hand from
    the module doc's formulas: sampling = batches × ms per batch; reward = batches·P·K images ÷
    images/s; training = kept × L × epochs × ms per pair; total = their sum. 4 batches of 2
    prompts × 5 branches = 40 images, kept 10, 2 epochs."""
    from b2fast.bench import stage as bench_stage
    from b2fast.config import Config

    cfg = Config()
    cfg.sampling.batches_per_stage, cfg.sampling.prompts_per_batch, cfg.sampling.branches = 4, 2, 5
    cfg.train.epochs = 2
    sample = [{"case": "sample", "interval": 4, "method": "b2fast", "ms": 250.0},
              {"case": "sample", "interval": 4, "method": "baseline", "ms": 1000.0},
              {"case": "decode", "interval": None, "method": "b2fast", "ms": 99.0},   # not a part
              {"case": "sample", "interval": 6, "method": "b2fast", "ms": 500.0},
              {"case": "sample", "interval": 6, "method": "baseline", "error": "out of memory"}]
    train = [{"interval": 4, "method": "b2fast", "ms_per_pair": 10.0},
             {"interval": 4, "method": "baseline", "ms_per_pair": 25.0},
             {"interval": 6, "method": "b2fast", "ms_per_pair": 10.0}]
    clip = {"reward": "clipscore", "images_per_s": 20.0, "baseline_images_per_s": 8.0}
    parts = {"sample": {"records": sample}, "train": {"records": train},
             "rewards": {"records": [{"reward": "jpeg", "images_per_s": 1.0}, clip]}}
    records = bench_stage.compose(parts, cfg, kept=10, intervals=[4, 6])
    measured = {"interval": 4, "method": "b2fast", "source": "measured", "sampling_s": 3.0,
                "reward_s": None, "training_s": 1.0, "total_s": 4.0, "kept": 5}
    bench_stage._add_speedups(records + [measured])
    got = [(r["interval"], r["method"], r.get("sampling_s"), r.get("reward_s"), r.get("training_s"),
            r.get("total_s"), r.get("speedup_vs_baseline"), r.get("error")) for r in records]
    a = pytest.approx
    assert got == [
        # 4 × 0.25 s,  40 / 20,  10 × 4 × 2 × 0.010 s;  1 + 2 + 0.8;  baseline 11 s / 3.8 s
        (4, "b2fast", a(1.0), a(2.0), a(0.8), a(3.8), a(11.0 / 3.8), None),
        # 4 × 1 s,  40 / 8,  10 × 4 × 2 × 0.025 s;  4 + 5 + 2
        (4, "baseline", a(4.0), a(5.0), a(2.0), a(11.0), a(1.0), None),
        # 4 × 0.5 s,  40 / 20,  10 × 6 × 2 × 0.010 s;  no baseline at L = 6, so no speed-up
        (6, "b2fast", a(2.0), a(2.0), a(1.2), a(5.2), None, None),
        # its sample part failed (its train part is missing too: the first error is named)
        (6, "baseline", None, None, None, None, None, "a part failed: out of memory")]
    assert all(r["kept"] == 10 and r["source"] == "composed" for r in records)
    # a measured row keeping 5: baseline 4 + 5 + 2 × 5/10 = 10 s, over its 4 s
    assert measured["speedup_vs_baseline"] == pytest.approx(2.5)


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
    from b2fast.bench import rewards as bench_rewards, sample as bench_sample, train as bench_train

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
    from b2fast.bench import sample as bench_sample, sd as bench_sd

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
    assert full.cfg.model.dtype == "float16" and full.intervals == [20] and full.kept == 430


def test_all_passes_config_and_overrides_to_the_sd_suites_only():
    from b2fast.bench.all import suite_argv

    args = bench.parse_args(["all", "--quick", "--device", "cpu", "--train.micro_batch", "2"])
    assert suite_argv("kernels", args) == ["kernels", "--device", "cpu", "--quick"]
    assert suite_argv("train", args) == ["train", "--device", "cpu", "--quick", "--train.micro_batch", "2"]


def test_baseline_policy_drops_the_fast_paths():
    from b2fast.bench.sd import baseline_model_config
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
    from b2fast.bench.common import flop_counter_mode
    from b2fast.bench.sd import ModuleShare

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
    assert bench_common.flop_count(lambda: attention(q, k, v)) == forward > 0
    both = bench_common.flop_count(lambda: attention(q, k, v).sum().backward())
    assert both == forward + sdpa_backward_flop_count(q.shape, q.shape, k.shape, v.shape)


def test_the_train_suites_two_methods_make_the_same_update():
    """The train suite's speed-up compares the same work: one optimizer step of b2fast's update and
    one of the baseline's, on the same trajectories from the same LoRA, move the weights alike.
    ``adam_eps`` 1 makes the first AdamW step about lr·g, so the weights compare the gradients."""
    from functools import partial

    from b2fast.bench.sd import SILENT, load_policy, model_folder
    from b2fast.bench.train import baseline_update, one_epoch_config, synthetic_trajectories
    from b2fast.core.update import make_optimizer, policy_update

    cfg = bench.parse_args(["train", "--quick", "--device", "cpu", "--train.adam_eps", "1", "--train.micro_batch",
                            "3", "--train.trajectories_per_step", "8"]).cfg
    folder, data, moved = model_folder(cfg, True), None, []
    for baseline in (False, True):
        policy = load_policy(cfg, folder, torch.device("cpu"), baseline)
        before = [p.detach().clone() for p in policy.lora_parameters()]
        data = data or synthetic_trajectories(policy, cfg, 4, 8, torch.Generator().manual_seed(0))
        update = baseline_update if baseline else partial(policy_update, progress=SILENT)
        optimizer = make_optimizer(policy.lora_parameters(), cfg.train)
        update(policy, optimizer, *data, one_epoch_config(cfg, policy, data[0]), cfg.sampling,
               torch.Generator().manual_seed(1))
        moved.append([p.detach() - b for p, b in zip(policy.lora_parameters(), before)])
    scale = max(float(d.abs().max()) for d in moved[0])
    assert scale > 0
    for fast, plain in zip(*moved):
        torch.testing.assert_close(fast, plain, rtol=1e-3, atol=1e-3 * scale)
