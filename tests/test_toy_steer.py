"""benchmarks/toy_steer.py: its table on synthetic rows with hand-computed intervals, and one tiny
end-to-end run (1 seed, 1 held-out prompt per template, 4 steps) in a subprocess."""
from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from bench_util import load_benchmark

ROOT = Path(__file__).resolve().parents[1]
T975 = {2: 4.3027, 3: 3.1824}  # Student-t 97.5% quantiles (toy_compare.T975) by degrees of freedom


steer = load_benchmark("toy_steer")


def ci(values: list[float], sign: str = "") -> str:
    m = statistics.mean(values)
    half = T975[len(values) - 1] * statistics.stdev(values) / math.sqrt(len(values))
    return f"{m:{sign}.4f} [{m - half:{sign}.4f}, {m + half:{sign}.4f}]"


def synthetic_rows() -> list[dict]:
    plain, mean4, best, fk = [0.40, 0.50, 0.45], [0.42, 0.47, 0.44], [0.60, 0.70, 0.62], [0.68, 0.75, 0.70]
    rows = [{"seed": 9, "method": "fk", "toy_align": 0.0, "success": 0.0, "unet_evals": 160, "reward_calls": 28}]
    for s in range(3):  # seed 9 has fk alone: in fk's mean, in no paired difference
        rows += [{"seed": s, "method": "plain", "toy_align": plain[s], "toy_align_mean4": mean4[s], "success": 0.1,
                  "unet_evals": 40, "reward_calls": 0},
                 {"seed": s, "method": "best-of-4", "toy_align": best[s], "success": 0.3, "unet_evals": 160,
                  "reward_calls": 4},
                 {"seed": s, "method": "fk", "toy_align": 0.0, "success": 0.0, "unet_evals": 160, "reward_calls": 28},
                 {"seed": s, "method": "fk", "toy_align": fk[s], "success": 0.4, "unet_evals": 160,
                  "reward_calls": 28}]  # a rerun of the seed: the last line counts
    return rows


def test_table_means_and_paired_differences_by_seed():
    text = steer.table(synthetic_rows())
    assert f"| plain | 3 | {ci([0.40, 0.50, 0.45])} | 0.100 | 40 | 0 |" in text
    assert f"| plain, mean of 4 | 3 | {ci([0.42, 0.47, 0.44])} | - | 40 | 0 |" in text
    assert f"| best-of-4 | 3 | {ci([0.60, 0.70, 0.62])} | 0.300 | 160 | 4 |" in text
    assert f"| fk | 4 | {ci([0.68, 0.75, 0.70, 0.0])} | 0.300 | 160 | 28 |" in text  # seed 9 too
    assert f"| fk − best-of-4 | 3 | {ci([0.08, 0.05, 0.08], '+')} | fk better |" in text
    assert f"| fk − plain (mean of 4) | 3 | {ci([0.26, 0.28, 0.26], '+')} | fk better |" in text
    assert "fk-adaptive" not in text and "lora-" not in text  # comparisons only where both methods ran
    lines = text.splitlines()
    assert [l.split("|")[1].strip() for l in lines[2:6]] == ["plain", "plain, mean of 4", "best-of-4", "fk"]


def test_a_difference_whose_interval_holds_zero_is_within_noise():
    rows = [{"seed": s, "method": m, "toy_align": v, "success": 0.0, "unet_evals": 1, "reward_calls": 0}
            for s, (a, b) in enumerate([(0.5, 0.6), (0.6, 0.5), (0.55, 0.55)])
            for m, v in (("lora-fk", a), ("fk", b))]
    text = steer.table(rows)
    assert f"| lora-fk − fk | 3 | {ci([-0.1, 0.1, 0.0], '+')} | within noise |" in text


def zero_lora(folder: Path) -> Path:
    """The toy_ddim preset's freshly initialised LoRA (B = 0): the base model's outputs exactly."""
    import torch

    from b2fast.config import load_yaml
    from b2fast.core.policy import Policy
    from b2fast.config import presets_dir

    cfg = load_yaml(presets_dir() / "toy_ddim.yaml")
    Policy(cfg.model, torch.device("cpu"), 4, 1.0).save_lora(folder)
    return folder


def test_tiny_end_to_end_run(tmp_path):
    """1 seed, 1 prompt per template, 4 DDIM steps, a zero LoRA: a row per method, equal UNet
    evaluations for best-of-4 and FK (plain a quarter), FK's reward calls = N × potential steps, and
    the zero LoRA's rows equal to the base model's (same seeds)."""
    from b2fast.core.steering import resampling_steps

    out = tmp_path / "steer"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "toy_steer.py"), "--seeds", "3", "--max-prompts", "1",
           "--images-per-prompt", "1", "--sampling.num_steps", "4", "--lora", str(zero_lora(tmp_path / "lora")),
           "--out", str(out)]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "toy_steer.jsonl").read_text().splitlines()]
    methods = ("plain", "best-of-4", "fk", "fk-adaptive")
    assert [(r["seed"], r["method"]) for r in rows] == [(3, p + m) for p in ("", "lora-") for m in methods]
    by = {r["method"]: r for r in rows}
    for m in methods:
        base, lora = dict(by[m]), dict(by["lora-" + m])
        for key in ("method", "lora", "seconds"):
            base.pop(key), lora.pop(key)
        assert lora == base, m
    assert "| lora-fk − fk | 1 | +0.0000 [" in done.stdout
    steps = len(resampling_steps(5, 5, 30, 4))
    cfg_rows = 2 * 4  # CFG's two halves × 4 steps per image
    assert by["best-of-4"]["unet_evals"] == by["fk"]["unet_evals"] == by["fk-adaptive"]["unet_evals"] == 4 * cfg_rows
    assert by["plain"]["unet_evals"] == cfg_rows
    assert [by[m]["reward_calls"] for m in ("plain", "best-of-4", "fk", "fk-adaptive")] == [0, 4, 4 * steps, 4 * steps]
    for r in rows:
        assert r["prompt_seeds"] == 3 and set(r["per_template"]) == set(steer.TEMPLATES) and r["num_steps"] == 4
        assert r["split"] == "test"
        assert 0 <= r["toy_align"] <= 1 and r["toy_align"] == pytest.approx(statistics.mean(r["per_template"].values()))
    assert by["best-of-4"]["toy_align"] >= max(by["plain"]["toy_align"], by["plain"]["toy_align_mean4"])
    assert by["fk"]["toy_align"] >= by["fk"]["particle_mean"]
    assert "| fk − best-of-4 | 1 |" in done.stdout and (out / "toy_steer.md").read_text() == done.stdout
    redraw = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "toy_steer.py"), "--table-only", "--out",
                             str(out)], check=False, capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert redraw.returncode == 0 and redraw.stdout == done.stdout


def test_one_lora_per_seed_or_one_for_all(tmp_path):
    """--lora takes one run for every seed, or one per seed (independent training runs); any other
    count is refused in one line before a model is loaded."""
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "toy_steer.py"), "--seeds", "0", "1", "2",
                           "--lora", "runA", "runB", "--out", str(tmp_path / "steer")],
                          check=False, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 2 and "one per seed (3), not 2" in done.stderr
    assert not (tmp_path / "steer").exists()


def test_train_split_for_tuning(tmp_path, monkeypatch):
    """--split train draws the prompts from the training split (for choosing lam and the potential)."""
    from b2fast.prompts import load_prompts

    seen = []
    monkeypatch.setattr(steer, "run_seed", lambda policy, scored, cfg, units, seed, batch: seen.extend(units) or [])
    with pytest.raises(SystemExit):  # no rows were written, so there is no table to print
        steer.main(["--seeds", "0", "--max-prompts", "2", "--images-per-prompt", "1", "--split", "train",
                    "--sampling.num_steps", "2", "--out", str(tmp_path / "steer")])
    assert [t for t, _ in seen] == [t for t in steer.TEMPLATES for _ in range(2)]
    for template, prompt in seen:
        assert prompt in load_prompts(template, "train") and prompt not in load_prompts(template, "test")
