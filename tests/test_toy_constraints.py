"""benchmarks/toy_constraints.py: its measures on clean renders (known answers), its table, and one
tiny end-to-end run whose success equals toy_steer's plain sample (the same images)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from bench_util import load_benchmark

from b2fast.toy.grammar import prompts as toy_prompts
from b2fast.toy.world import sample_images

ROOT = Path(__file__).resolve().parents[1]
constraints = load_benchmark("toy_constraints")


def _renders(prompts: list[str], seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(sample_images(prompts, np.random.default_rng(seed)))


def test_clean_renders_meet_every_constraint_and_only_their_relation():
    prompts = toy_prompts("spatial", "train")[:40]
    m = constraints.constraint_measures(_renders(prompts), prompts)
    for k in ("A present", "A shape", "B present", "B shape", "both shapes", "relation", "relation if both",
              "success"):
        assert m[k] == pytest.approx(1.0), k
    assert m["other relations if both"] == pytest.approx(0.0)  # the four relations are exclusive
    assert m["relation gain"] == pytest.approx(1.0)


def test_a_model_drawing_the_opposite_relation_gains_nothing_over_chance():
    flip = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
    asked = toy_prompts("spatial", "train")[:40]
    drawn = []
    for p in asked:
        rel = next(r for r in flip if f" {r} " in p)
        drawn.append(p.replace(f" {rel} ", f" {flip[rel]} "))
    m = constraints.constraint_measures(_renders(drawn), asked)
    assert m["both shapes"] == pytest.approx(1.0) and m["relation"] == pytest.approx(0.0)
    assert m["other relations if both"] == pytest.approx(1 / 3)  # the drawn one is one of the three others
    assert m["relation gain"] == pytest.approx(-1 / 3) and m["success"] == 0.0


def test_blank_images_meet_nothing_and_leave_relation_measures_undefined():
    prompts = toy_prompts("spatial", "train")[:4] + toy_prompts("attribute", "train")[:2]
    blank = torch.ones(4, 3, 32, 32)  # white background: no colour anywhere
    m = constraints.constraint_measures(blank, prompts[:4])
    assert m["A present"] == m["B present"] == m["success"] == m["relation"] == 0.0
    assert math.isnan(m["relation if both"]) and math.isnan(m["relation gain"])
    single = constraints.constraint_measures(_renders(prompts[4:]), prompts[4:])
    assert single["A shape"] == single["success"] == pytest.approx(1.0)
    assert math.isnan(single["B present"]) and math.isnan(single["both shapes"])


def test_table_means_over_seeds_and_pairs_lora_with_base():
    def row(seed, model, success):
        return {"seed": seed, "model": model, "measures": {"toy_attribute": {"success": success, "A present": 1.0}}}
    rows = [row(s, "base", 0.2 + 0.1 * s) for s in range(3)] + [row(s, "lora", 0.5 + 0.1 * s) for s in range(3)]
    rows.append(row(0, "lora", 0.6))  # a rerun line: the last one of a seed and model counts
    text = constraints.table(rows)
    line = next(x for x in text.splitlines() if x.startswith("| toy_attribute | success |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[2].startswith("0.300 [") and cells[3].startswith("0.633 [") and cells[4].startswith("0.333 [")
    assert "| toy_spatial |" not in text and "seeds: 0, 1, 2" in text


def test_tiny_end_to_end_run_matches_toy_steers_plain_sample(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}
    common = ["--seeds", "2", "--max-prompts", "2", "--images-per-prompt", "1", "--preset", "toy_ddim",
              "--sampling.num_steps", "3"]
    runs = {}
    for name in ("toy_constraints", "toy_steer"):
        cmd = [sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), *common, "--out", str(tmp_path / name)]
        if name == "toy_steer":
            cmd += ["--steer.lam", "0"]
        done = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, cwd=ROOT, timeout=180)
        assert done.returncode == 0, done.stderr[-2000:]
        runs[name] = [json.loads(line) for line in (tmp_path / name / f"{name}.jsonl").read_text().splitlines()]
    (row,) = runs["toy_constraints"]
    assert (row["seed"], row["model"], row["prompt_seeds"]) == (2, "base", 6)
    plain = next(r for r in runs["toy_steer"] if r["method"] == "plain")
    success = [row["measures"][t]["success"] for t in ("toy_attribute", "toy_two_object", "toy_spatial")]
    assert sum(success) / 3 == pytest.approx(plain["success"])
    assert "| toy_spatial | relation gain |" in (tmp_path / "toy_constraints" / "toy_constraints.md").read_text()
