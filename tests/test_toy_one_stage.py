"""benchmarks/toy_one_stage.py: its table on synthetic rows with hand-computed intervals, and one
tiny real stage (the gain is measured from the same noises: an untrained variant gains exactly 0)."""
from __future__ import annotations

import math
import statistics

import pytest
from bench_util import load_benchmark



one = load_benchmark("toy_one_stage")


def test_table_pairs_each_variant_with_its_null_by_seed():
    rows = [{"variant": "v", "seed": s, "gain": g} for s, g in enumerate([0.03, 0.05, 0.04])]
    rows += [{"variant": "v+null", "seed": s, "gain": g} for s, g in enumerate([0.01, 0.02, 0.0])]
    rows += [{"variant": "w", "seed": 0, "gain": 0.5}]
    text = one.table(rows)
    diffs = [0.02, 0.03, 0.04]                       # v − null per seed
    half = 4.3027 * statistics.stdev(diffs) / math.sqrt(3)
    assert f"+0.0300 [{0.03 - half:+.4f}, {0.03 + half:+.4f}]" in text
    gains_half = 4.3027 * statistics.stdev([0.03, 0.05, 0.04]) / math.sqrt(3)
    assert f"| v | 3 | +0.0400 [{0.04 - gains_half:+.4f}, {0.04 + gains_half:+.4f}]" in text
    assert "| w | 1 | +0.5000" in text and "v+null |" not in text


def test_a_stage_that_cannot_move_the_weights_gains_exactly_zero(tmp_path):
    """With advantages zeroed the update has no gradient, so the paired before/after rewards,
    drawn from the same noises, are equal image for image."""
    (tmp_path / "p.txt").write_text("a red circle\n")
    row = one.one_stage(0, ["--selection.null_control", "zero", "--sampling.num_steps", "4",
                            "--schedule.min_interval", "2", "--schedule.max_interval", "4",
                            "--sampling.prompts_per_batch", "2", "--train.optimizer", "nsgd", "--train.weight_decay", "0"],
                        tmp_path / "p.txt", "toy_colour_fill", 1, 4, tmp_path / "run")
    assert row["gain"] == 0.0 and row["se"] == 0.0
    assert row["images_trained"] == 8
    with pytest.raises(SystemExit):
        one.main(["--table-only", "--out", str(tmp_path / "nothing")])


@pytest.mark.parametrize("script, args, message", [
    ("toy_one_stage", ["--seeds", "0", "--variants", "nsgd", "--reward", "nosuch"], "unknown reward 'nosuch'"),
    ("toy_grad_snr", ["--stages", "3", "--train.lrr", "1"], "train.lrr: unknown field 'lrr'"),
    ("toy_ladder", ["--rungs", "brightness", "--train.lrr", "1"], "train.lrr: unknown field 'lrr'"),
    ("toy_ladder", ["--preset", "nope"], "--preset: no such file 'nope'"),
])
def test_bad_input_is_one_line_before_anything_is_written(script, args, message, tmp_path, capsys):
    module = load_benchmark(script)
    with pytest.raises(SystemExit) as exit_info:
        module.main([*args, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err.strip().splitlines()[-1] and "Traceback" not in err
    assert not (tmp_path / "out").exists()
