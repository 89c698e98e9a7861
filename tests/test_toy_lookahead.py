"""benchmarks/toy_lookahead.py: its per-step metrics on hand-made rewards, and one tiny end-to-end
run whose finished images must be toy_steer's best-of-4 images (same seeds)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from bench_util import load_benchmark

ROOT = Path(__file__).resolve().parents[1]
lookahead = load_benchmark("toy_lookahead")


def test_pick_random_oracle_and_ties():
    early = torch.tensor([[0.9, 0.1, 0.1, 0.1], [0.5, 0.5, 0.0, 0.0]], dtype=torch.float64)
    final = torch.tensor([[1.0, 0.0, 0.0, 0.2], [0.4, 0.8, 0.0, 0.0]], dtype=torch.float64)
    m = lookahead.step_metrics(early, final)
    assert m["pick"].tolist() == pytest.approx([1.0, 0.6])  # unit 2: a tie, the mean of the tied two
    assert m["random"].tolist() == pytest.approx([0.3, 0.3])
    assert m["oracle"].tolist() == pytest.approx([1.0, 0.8])
    assert m["captured"] == pytest.approx((0.7 + 0.3) / (0.7 + 0.5))
    a = early - early.mean(dim=1, keepdim=True)
    b = final - final.mean(dim=1, keepdim=True)
    assert m["corr"] == pytest.approx(float((a * b).sum() / (a.square().sum() * b.square().sum()).sqrt()))


def test_a_perfect_and_an_uninformative_look_ahead():
    final = torch.rand(50, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    perfect = lookahead.step_metrics(2 * final + 1, final)  # same ranking, other scale
    assert perfect["captured"] == pytest.approx(1.0) and perfect["corr"] == pytest.approx(1.0)
    blind = lookahead.step_metrics(torch.zeros_like(final), final)  # every particle tied
    assert blind["captured"] == pytest.approx(0.0) and torch.equal(blind["pick"], blind["random"])
    assert blind["corr"] != blind["corr"]  # NaN: no spread to correlate


def test_table_means_over_seeds_per_step():
    rows = [{"seed": s, "model": "base", "step": i, "pick": 0.5 + 0.1 * i, "random": 0.4, "oracle": 0.8,
             "captured": 0.25 * i, "corr": 0.1 * s} for s in range(3) for i in range(2)]
    text = lookahead.table(rows)
    assert "| base | 0 | 3 | 0.500 [0.500, 0.500] | 0.400 [0.400, 0.400] | 0.800 [0.800, 0.800] |" in text
    assert "| base | 1 | 3 | 0.600 [0.600, 0.600] |" in text and "| 0.250 [0.250, 0.250] | 0.100 [" in text


def test_tiny_end_to_end_run_reproduces_best_of_4(tmp_path):
    """1 seed, 1 prompt per template, 4 DDIM steps: a row per step, and the last step's oracle and
    random equal toy_steer's best-of-4 and plain mean of 4 (the same images)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}
    common = ["--seeds", "3", "--max-prompts", "1", "--images-per-prompt", "1", "--preset", "toy_ddim",
              "--sampling.num_steps", "4"]
    runs = {}
    for name in ("toy_lookahead", "toy_steer"):
        cmd = [sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), *common, "--out", str(tmp_path / name)]
        done = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        runs[name] = [json.loads(line) for line in (tmp_path / name / f"{name}.jsonl").read_text().splitlines()]
    rows = runs["toy_lookahead"]
    assert [(r["seed"], r["model"], r["step"]) for r in rows] == [(3, "base", i) for i in range(4)]
    steer = {r["method"]: r for r in runs["toy_steer"]}
    for r in rows:
        assert r["oracle"] == pytest.approx(steer["best-of-4"]["toy_align"])
        assert r["random"] == pytest.approx(steer["plain"]["toy_align_mean4"])
        assert r["pick"] <= r["oracle"] + 1e-12  # a pick is one of the 4 (or a mean of tied ones)
    assert (tmp_path / "toy_lookahead" / "toy_lookahead.md").read_text().count("| base |") == 4
