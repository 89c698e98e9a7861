"""Paired bootstrap intervals of after − before: the statistic against hand computations and a
plain numpy re-implementation, its coverage on synthetic data, per-prompt means kept by the
evaluator, and the intervals in the eval CLI's table, eval.json and eval_diff.csv."""
import csv
import json
import math

import numpy as np
import pytest
import torch

import b2fast.eval.evaluator
from b2fast.eval.evaluator import EvalRow, evaluate_prompts, format_comparison
from b2fast.eval.stats import compare_rows, format_differences, paired_bootstrap_ci


pytestmark = pytest.mark.usefixtures("one_thread")


# ---- the statistic -------------------------------------------------------------------------

def test_identical_columns_give_exactly_zero():
    before = np.random.default_rng(1).random(12)
    got = paired_bootstrap_ci(before, before.copy())
    assert (got.diff, got.ci_low, got.ci_high, got.n) == (0.0, 0.0, 0.0, 12)
    assert got.within_noise is True


def test_a_constant_shift_gives_a_zero_width_interval_at_the_shift():
    # 0.25 and the values below are exact binary fractions, so every resampled mean is exactly 0.25
    before = np.array([0.0, 0.25, 0.5, 0.75, 0.5, 0.25, 0.0, 0.5])
    got = paired_bootstrap_ci(before, before + 0.25)
    assert (got.diff, got.ci_low, got.ci_high) == (0.25, 0.25, 0.25)
    assert got.within_noise is False


def test_two_prompts_by_hand():
    """Differences 0 and 1: a resample of 2 prompts has mean 0, 0.5 or 1 with probabilities
    1/4, 1/2, 1/4, so with 2,000 resamples the 2.5% and 97.5% quantiles are 0 and 1 (each end
    holds ~500 resamples, far more than the 50 the quantiles reach into)."""
    got = paired_bootstrap_ci([0.0, 0.0], [0.0, 1.0])
    assert (got.diff, got.ci_low, got.ci_high, got.within_noise) == (0.5, 0.0, 1.0, True)


def test_matches_a_plain_numpy_reimplementation():
    rng = np.random.default_rng(7)
    before, after = rng.random(17), rng.random(17) + 0.1
    got = paired_bootstrap_ci(before, after, resamples=2000, level=0.9, seed=3)
    d = after - before
    index = np.random.default_rng(3).integers(0, 17, size=(2000, 17))   # one row per resample
    means = np.array([d[row].mean() for row in index])
    assert got.diff == pytest.approx(d.mean(), abs=1e-15)
    assert got.ci_low == pytest.approx(np.percentile(means, 5), abs=1e-12)
    assert got.ci_high == pytest.approx(np.percentile(means, 95), abs=1e-12)
    assert paired_bootstrap_ci(before, after, level=0.9, seed=3) == got  # the seed fixes the table
    assert paired_bootstrap_ci(before, after, level=0.9, seed=4) != got


def test_non_finite_prompts_are_left_out_and_one_prompt_has_no_interval():
    got = paired_bootstrap_ci([0.5, math.nan, 0.25], [0.75, 1.0, 0.5])
    assert (got.diff, got.ci_low, got.ci_high, got.n) == (0.25, 0.25, 0.25, 2)
    one = paired_bootstrap_ci([0.5], [1.0])
    assert one.diff == 0.5 and math.isnan(one.ci_low) and math.isnan(one.ci_high) and one.within_noise is None
    none = paired_bootstrap_ci([], [])
    assert none.n == 0 and math.isnan(none.diff)


def test_coverage_and_width_on_synthetic_data_with_a_known_mean():
    """1,000 synthetic evaluations of 24 prompts whose per-prompt differences are N(0.1, 0.3²):
    the 95% interval should hold 0.1 about 95% of the time. The percentile interval of a mean
    is a little narrow at n = 24: it is about ±1.96 plug-in standard errors, i.e. ±1.96·√(23/24)
    = ±1.92 estimated ones, and a t with 23 degrees of freedom stays within ±1.92 93.3% of the
    time. With 1,000 draws the binomial sd is 0.8 points, so [90%, 97%] is > 3.5 sd either side.
    The mean width should be that of the normal interval, 2·1.96·0.3/√24 ≈ 0.240 (± 10%)."""
    rng = np.random.default_rng(2024)
    hits, widths = 0, []
    for draw in range(1000):
        before = rng.random(24)
        after = before + rng.normal(0.1, 0.3, 24)
        got = paired_bootstrap_ci(before, after, resamples=1000, seed=draw)
        hits += got.ci_low <= 0.1 <= got.ci_high
        widths.append(got.ci_high - got.ci_low)
    assert 0.90 <= hits / 1000 <= 0.97, hits
    assert np.mean(widths) == pytest.approx(2 * 1.96 * 0.3 / math.sqrt(24), rel=0.1)


def test_power_a_real_shift_is_found_and_no_shift_mostly_is_not():
    """Shift 0.3 with sd 0.3 over 24 prompts is 4.9 standard errors: the interval excludes 0 in
    (nearly) every draw; with no shift it excludes 0 in about 7% of draws (1 − the 93% coverage
    above; 200 draws have a binomial sd of 1.8 points, so < 12% is > 2.5 sd away)."""
    rng = np.random.default_rng(5)
    found = [not paired_bootstrap_ci(b, b + rng.normal(0.3, 0.3, 24), resamples=500, seed=i).within_noise
             for i, b in enumerate(rng.random((100, 24)))]
    false_alarms = [not paired_bootstrap_ci(b, b + rng.normal(0.0, 0.3, 24), resamples=500, seed=i).within_noise
                    for i, b in enumerate(rng.random((200, 24)))]
    assert sum(found) >= 99 and sum(false_alarms) / 200 < 0.12


# ---- rows, table -----------------------------------------------------------------------------

def _row(split, score, success, per_score, per_success, name="toy_align"):
    return EvalRow("toy_attribute", split, len(per_score), 4 * len(per_score), score, success, 1.0, 2.0,
                   scores={name: score}, successes={name: success},
                   per_prompt={name: per_score, f"{name}_success": per_success})


def test_compare_rows_and_the_table_mark_noise():
    before = [_row("train", 0.5, 0.25, [0.5, 0.5, 0.5, 0.5], [0.25, 0.25, 0.25, 0.25]),
              EvalRow("toy_attribute", "test", 3, 12, 0.5, 0.0, 1.0, 2.0)]   # stored without per-prompt means
    after = [_row("train", 0.75, 0.25, [0.75, 0.75, 0.75, 0.75], [0.0, 0.5, 0.0, 0.5]),
             EvalRow("toy_attribute", "test", 3, 12, 0.625, 0.0, 1.0, 2.0)]
    records = compare_rows(before, after)
    assert [(r["split"], r["metric"]) for r in records] == [("train", "toy_align"), ("train", "toy_align_success"),
                                                            ("test", "score"), ("test", "success")]
    score, success, legacy = records[0], records[1], records[2]
    assert (score["diff"], score["ci_low"], score["ci_high"], score["within_noise"]) == (0.25, 0.25, 0.25, False)
    # per-prompt differences -0.25, +0.25, -0.25, +0.25: mean 0, interval symmetric around it
    assert success["diff"] == 0.0 and success["ci_low"] < 0 < success["ci_high"] and success["within_noise"]
    assert legacy["diff"] == 0.125 and math.isnan(legacy["ci_low"]) and legacy["within_noise"] is None
    lines = format_differences(records).splitlines()
    assert lines[1].split() == ["prompt", "set", "split", "metric", "prompts", "before", "after", "diff",
                                "95%", "CI", "sig"]
    assert lines[3].split() == ["toy_attribute", "train", "toy_align", "4", "0.500", "0.750", "+0.250",
                                "[+0.250,", "+0.250]", "yes"]
    assert lines[4].split()[-1] == "noise" and lines[5].split()[-1] == "n/a"
    assert "noise = it contains 0" in lines[-1]
    text = format_comparison({"before": before, "after": after})
    assert text.startswith(b2fast.eval.evaluator.format_rows({"before": before, "after": after}))
    assert "after - before, paired by prompt" in text
    assert "paired" not in format_comparison({"before": before})             # one column: nothing to compare


def test_evaluator_keeps_per_prompt_means(monkeypatch):
    """Two prompts × 4 images, scores by hand (one NaN, left out of its prompt's mean)."""
    scores = torch.tensor([1.0, 0.5, math.nan, 1.0, 0.0, 0.0, 0.0, 1.0])
    monkeypatch.setattr(b2fast.eval.evaluator, "generate",
                        lambda policy, prompts, cfg, generator: torch.rand(len(prompts), 3, 8, 8))

    class Policy:
        device = torch.device("cpu")

    with pytest.warns(RuntimeWarning, match="1 non-finite"):
        metrics, _ = evaluate_prompts(Policy(), ["p", "q"], {"toy_align": lambda images, prompts: scores},
                                      None, n_per_prompt=4, seed=0)
    assert metrics["per_prompt"]["toy_align"] == pytest.approx([2.5 / 3, 0.25], abs=1e-12)
    assert metrics["per_prompt"]["toy_align_success"] == pytest.approx([2 / 3, 0.25], abs=1e-12)
    assert metrics["score"] == pytest.approx(3.5 / 7) and metrics["success"] == pytest.approx(3 / 7)
    row = EvalRow("s", "train", 2, 8, **metrics)
    assert [label for label, _ in row.reward_cells()] == list(row.per_prompt)
    stored = json.loads(json.dumps({k: v for k, v in row.as_dict().items()}))
    assert EvalRow.from_dict(stored) == row
    with_nan = EvalRow.from_dict({**stored, "per_prompt": {"toy_align": [None, 0.5]}})
    assert math.isnan(with_nan.per_prompt["toy_align"][0])                   # strict JSON null → NaN
    unnamed, _ = evaluate_prompts(Policy(), ["p", "q"], lambda images, prompts: torch.ones(8), None, 4, 0)
    assert unnamed["per_prompt"] == {"score": [1.0, 1.0], "success": [1.0, 1.0]}


# ---- the eval CLI on the toy world -----------------------------------------------------------

@pytest.fixture(scope="module")
def toy_lora(tmp_path_factory):
    """A LoRA of the toy model with noise on every weight, so trained ≠ base."""
    from b2fast.config import ModelConfig
    from b2fast.core.policy import Policy

    folder = tmp_path_factory.mktemp("toy-lora")
    torch.manual_seed(3)
    policy = Policy(ModelConfig(path="b2fast:toy", dtype="float32"), torch.device("cpu"), num_steps=4, eta=1.0)
    with torch.no_grad():
        for p in policy.lora_parameters():
            p.add_(0.3 * torch.randn_like(p))
    policy.save_lora(folder)
    return folder


def test_cli_reports_paired_intervals_for_all_prompts(toy_lora, tmp_path, capsys):
    """--prompts-per-set 0: every prompt of the split (toy_attribute test has 3); the differences
    in eval.json and eval_diff.csv are those of the stored per-prompt means, recomputed here."""
    from b2fast.eval.cli import main
    from b2fast.prompts import load_prompts

    out = tmp_path / "eval"
    assert main(["--prompts", "toy_attribute", "--splits", "test", "--prompts-per-set", "0",
                 "--images-per-prompt", "2", "--num-steps", "4", "--device", "cpu", "--lora", str(toy_lora),
                 "--out", str(out)]) == 0
    record = json.loads((out / "eval.json").read_text())
    (base,), (trained,) = record["columns"]["base"], record["columns"]["trained"]
    assert base["n_prompts"] == len(load_prompts("toy_attribute", "test")) == 3 and base["n_images"] == 6
    differences = record["differences"]
    assert [d["metric"] for d in differences] == ["toy_align", "toy_align_success"]
    with (out / "eval_diff.csv").open() as f:
        lines = list(csv.DictReader(f))
    for d, line in zip(differences, lines):
        expected = paired_bootstrap_ci(base["per_prompt"][d["metric"]], trained["per_prompt"][d["metric"]])
        assert (d["diff"], d["ci_low"], d["ci_high"]) == (expected.diff, expected.ci_low, expected.ci_high)
        means = "scores" if d["metric"] == "toy_align" else "successes"       # the table's numbers
        assert d["diff"] == pytest.approx(trained[means]["toy_align"] - base[means]["toy_align"], abs=1e-6)
        assert float(line["diff"]) == pytest.approx(d["diff"]) and float(line["ci_low"]) == pytest.approx(d["ci_low"])
    printed = capsys.readouterr().out
    assert "trained - base, paired by prompt" in printed and "sig: yes = the CI excludes 0" in printed
    assert (out / "compare_toy_attribute_test.png").stat().st_size > 0
