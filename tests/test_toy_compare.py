"""benchmarks/toy_compare.py's learning curves: t-intervals over seeds, the paired table and the
figure on synthetic results with known answers; one tiny end-to-end run of the script."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from bench_util import load_benchmark

from b2fast.eval import stats

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "toy_compare.py"
SETS = ("toy_attribute", "toy_two_object", "toy_spatial")


tc = load_benchmark("toy_compare")


def _rows(test: float, train: float) -> list[dict]:
    """EvalRow-like dicts whose mean score over the three sets is ``test`` / ``train``."""
    return [{"prompt_set": name, "split": split, "score": value + offset, "success": 0.5, "diversity": 0.1}
            for split, value in (("train", train), ("test", test))
            for name, offset in zip(SETS, (-0.1, 0.0, 0.1))]


def _run(method: str, seed: int, lr: float, points: dict, rewards=(0.5, 0.6, 0.7, 0.8)) -> dict:
    """A results.json run: 4 stages of 10 queries each; ``points``: stage -> (test, train)."""
    queries = [10 * (k + 1) for k in range(len(rewards))]
    curve = [{"stage": "before", "queries": 0, "rows": _rows(0.30 + 0.01 * seed, 0.35)}]
    curve += [{"stage": s, "queries": queries[s], "rows": _rows(*v)} for s, v in sorted(points.items())]
    return {"method": method, "seed": seed, "lr": lr, "train_minutes": 0.1, "reward_first": rewards[0],
            "reward_last": rewards[-1], "stage_rewards": list(rewards), "queries": queries,
            "eval_curve": curve, "before": curve[0]["rows"], "after": curve[-1]["rows"]}


def _results() -> list[dict]:
    """B2 at stage 1 minus DDPO: 0.2, 0.3, 0.1 over seeds (CI contains 0); at stage 3: 0.30,
    0.32, 0.34 (CI excludes 0). DDPO also ran at lr 0.1 with a lower training reward (not chosen)."""
    b2 = {0: {1: (0.5, 0.55), 3: (0.80, 0.9)}, 1: {1: (0.7, 0.65), 3: (0.82, 0.9)}, 2: {1: (0.6, 0.6), 3: (0.84, 0.9)}}
    ddpo = {0: {1: (0.3, 0.5), 3: (0.5, 0.6)}, 1: {1: (0.4, 0.5), 3: (0.5, 0.6)}, 2: {1: (0.5, 0.5), 3: (0.5, 0.6)}}
    results = []
    for seed in range(3):
        results.append(_run("B2-DiffuRL", seed, 0.01, b2[seed]))
        results.append(_run("DDPO", seed, 0.01, ddpo[seed]))
        results.append(_run("DDPO", seed, 0.1, {1: (9.0, 9.0), 3: (9.0, 9.0)}, rewards=(0.1, 0.1, 0.1, 0.1)))
    return results


def _three_methods() -> list[dict]:
    """_results(), DDPO scoring half as many images per stage, plus D3PO (lr 0.03). B2 − D3PO:
    stage 1 test 0.1, 0.2, 0.0 (CI contains 0), train 0.0, 0.1, 0.05; stage 3 test −0.10, −0.08,
    −0.06 (CI excludes 0: D3PO ahead), train 0.2, 0.1, 0.3."""
    d3po = {0: {1: (0.4, 0.55), 3: (0.9, 0.7)}, 1: {1: (0.5, 0.55), 3: (0.9, 0.8)}, 2: {1: (0.6, 0.55), 3: (0.9, 0.6)}}
    results = []
    for r in _results():
        if r["method"] == "DDPO":
            r["queries"] = [q // 2 for q in r["queries"]]
            for point in r["eval_curve"]:
                point["queries"] //= 2
        results.append(r)
    results += [_run("D3PO", seed, 0.03, d3po[seed]) for seed in range(3)]
    return results


def test_t_interval_matches_the_hand_computed_bounds():
    # n = 3: mean 0.4, sd 0.2, t(0.975, 2) = 4.3027 -> half width 4.3027 * 0.2 / sqrt(3) = 0.49683
    mean, low, high = stats.mean_ci([0.2, 0.4, 0.6])
    assert mean == pytest.approx(0.4)
    assert (low, high) == (pytest.approx(0.4 - 0.496833, abs=1e-5), pytest.approx(0.4 + 0.496833, abs=1e-5))
    # n = 2: mean 2, sd sqrt(2), t(0.975, 1) = 12.7062 -> 2 ± 12.7062
    assert stats.mean_ci([1.0, 3.0]) == (2.0, pytest.approx(-10.7062), pytest.approx(14.7062))
    # one value: no interval; None and NaN are left out
    mean, low, high = stats.mean_ci([0.7, None, math.nan])
    assert mean == 0.7 and math.isnan(low) and math.isnan(high)
    # beyond the table, the expansion: t(0.975, 40) = 2.02108, t(0.975, 100) = 1.98397
    assert stats.t975(40) == pytest.approx(2.02108, abs=1e-4) and stats.t975(100) == pytest.approx(1.98397, abs=1e-4)
    assert stats.t975(30) == 2.0423


def test_paired_difference_is_by_seed():
    d = tc.paired_difference({0: 0.5, 1: 0.7, 2: 0.6, 5: 1.0}, {0: 0.3, 1: 0.4, 2: 0.5})  # seed 5 has no pair
    half = 4.3027 * 0.1 / math.sqrt(3)  # differences 0.2, 0.3, 0.1: sd 0.1
    assert d.n == 3 and d.diff == pytest.approx(0.2)
    assert (d.ci_low, d.ci_high) == (pytest.approx(0.2 - half), pytest.approx(0.2 + half))
    assert d.within_noise is True


def test_curves_table_reports_cis_and_marks_noise():
    table = tc.curves_table(_results())
    lines = table.splitlines()
    # the chosen lr (by training reward) labels the method; the lr-0.1 runs play no part
    assert any(line.startswith("| DDPO (lr 0.01) | 1 | 20 | 3 |") for line in lines)
    assert "lr 0.1)" not in table and "9.000" not in table
    # B2 at stage 1, test: 0.5, 0.7, 0.6 -> 0.6 ± 4.3027 * 0.1 / sqrt(3) = [0.352, 0.848]
    assert "| B2-DiffuRL (lr 0.01) | 1 | 20 | 3 | 0.600 [0.352, 0.848] |" in table
    # base model: one point per seed (0.30, 0.31, 0.32), shared by both methods
    assert "| base model | before | 0 | 3 | 0.310 [0.285, 0.335] |" in table
    # paired differences: stage 1 test diff 0.2 [-0.048, +0.448] within noise, stage 3: 0.32 [+0.270, +0.370]
    stage1 = next(line for line in lines if line.startswith("| 1 | 20 | 3 |"))
    assert "+0.200 [-0.048, +0.448] | within noise" in stage1
    stage3 = next(line for line in lines if line.startswith("| 3 | 40 | 3 |"))
    assert "+0.320 [+0.270, +0.370] | B2-DiffuRL ahead" in stage3
    assert "Student-t" in table


def test_curves_table_pairs_the_reference_with_each_other_method():
    table = tc.curves_table(_three_methods())
    assert "| D3PO (lr 0.03) | 1 | 20 | 3 | 0.500 [0.252, 0.748] |" in table
    assert "| DDPO (lr 0.01) | 1 | 10 | 3 |" in table
    # one paired table per other method, in METHODS order
    ddpo, d3po = table.split("\nPaired difference ")[1:]
    assert ddpo.startswith("B2-DiffuRL − DDPO per budget") and d3po.startswith("B2-DiffuRL − D3PO per budget")
    # B2 − DDPO as in the two-method table, now at unequal budgets (10 vs 5 images per stage)
    stage1 = next(line for line in ddpo.splitlines() if line.startswith("| 1 | 20 / 10 | 3 |"))
    assert "+0.200 [-0.048, +0.448] | within noise" in stage1
    assert "Note: at equal stages the methods scored different numbers of images (B2-DiffuRL / DDPO)" in ddpo
    # B2 − D3PO, equal budgets (the same B² samples), no note:
    # stage 1 test 0.1, 0.2, 0.0 -> 0.1 ± 4.3027 * 0.1 / sqrt(3) = [-0.148, +0.348];
    # train 0.0, 0.1, 0.05 -> 0.05 ± 4.3027 * 0.05 / sqrt(3) = [-0.074, +0.174]
    lines = d3po.splitlines()
    assert ("| 1 | 20 | 3 | +0.100 [-0.148, +0.348] | within noise | +0.050 [-0.074, +0.174] | within noise |"
            in lines)
    # stage 3 test −0.10, −0.08, −0.06 -> −0.08 ± 4.3027 * 0.02 / sqrt(3) = [−0.130, −0.030];
    # train 0.2, 0.1, 0.3 -> 0.2 ± 4.3027 * 0.1 / sqrt(3) = [−0.048, +0.448]
    assert ("| 3 | 40 | 3 | -0.080 [-0.130, -0.030] | D3PO ahead | +0.200 [-0.048, +0.448] | within noise |"
            in lines)
    assert "Note:" not in d3po


def test_methods_from_different_starting_models_get_a_base_row_each():
    """B2-DiffuRL-LCM starts from the toy LCM: its before-training evaluation is not pooled with
    the DDIM model's, in the curves table or in the summary."""
    results = []
    for seed in range(3):
        results.append({**_run("B2-DiffuRL", seed, 0.01, {3: (0.5, 0.5)}), "model": "b2fast:toy"})
        lcm = _run("B2-DiffuRL-LCM", seed, 0.003, {3: (0.6, 0.6)})
        for point in lcm["eval_curve"][:1]:
            point["rows"] = lcm["before"] = _rows(0.20, 0.25)        # another base model
        results.append({**lcm, "model": "b2fast:toy-lcm"})
    table = tc.curves_table(results)
    assert "| base model (b2fast:toy) | before | 0 | 3 | 0.310 [0.285, 0.335] |" in table
    assert "| base model (b2fast:toy-lcm) | before | 0 | 3 | 0.200 [0.200, 0.200] |" in table
    assert "they start from different models" in table
    assert "they start from different models" not in tc.curves_table(_results())
    summary = tc.summarise(results)
    assert "| base model (b2fast:toy) | 3 |" in summary and "| base model (b2fast:toy-lcm) | 3 |" in summary
    assert "| base model | 3 |" in tc.summarise(_results())                    # one model: one plain row


def test_summary_of_runs_evaluated_on_the_test_split_only():
    """``--eval.splits [test]``: the train-split cells are "-", not an error."""
    results = [r for r in _results() if r["method"] == "B2-DiffuRL"]
    for run in results:
        for key in ("before", "after"):
            run[key] = [row for row in run[key] if row["split"] == "test"]
    summary = tc.summarise(results)
    row = next(line for line in summary.splitlines() if line.startswith("| B2-DiffuRL (lr"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[4] == cells[5] == "-" and cells[3].startswith("0.8")   # train cells empty, test score ~0.82
    results = [r for r in _results() if r["lr"] == 0.01]
    for run in results:
        for point in run["eval_curve"]:
            point["rows"] = [row for row in point["rows"] if row["split"] == "test"]
    stage3 = next(line for line in tc.curves_table(results).splitlines() if line.startswith("| 3 | 40 | 3 |"))
    assert stage3.endswith("| B2-DiffuRL ahead | - | - |")             # the paired train cells too


def test_any_subset_of_methods_works():
    results = [r for r in _three_methods() if r["method"] != "B2-DiffuRL"]
    chosen, runs = tc.chosen_runs(results, 3)
    assert chosen == {"DDPO": 0.01, "D3PO": 0.03} and sorted(runs) == ["D3PO", "DDPO"]
    summary = tc.summarise(results)
    assert "| DDPO (lr 0.01) | 3 |" in summary and "| D3PO (lr 0.03) | 3 |" in summary
    assert "B2-DiffuRL" not in summary
    table = tc.curves_table(results)  # without the reference: the curves, no paired differences
    assert "| D3PO (lr 0.03) | 3 | 40 | 3 |" in table and "Paired difference" not in table
    # the reference and one other: one paired table
    results = [r for r in _three_methods() if r["method"] != "DDPO"]
    assert tc.curves_table(results).count("Paired difference") == 1


def test_one_seed_has_no_interval():
    results = [r for r in _results() if r["seed"] == 0]
    table = tc.curves_table(results)
    assert "n/a (fewer than 2 seeds)" in table and "within noise" not in table


def test_figure_and_table_files_are_written(tmp_path):
    table = tc.write_curves(_results(), tmp_path)
    png = tmp_path / "curves.png"
    assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "curves.md").read_text() == table + "\n"


def test_figure_has_one_band_per_method(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    figures = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig: (figures.append(fig), close(fig)))
    tc.write_curves(_three_methods(), tmp_path)
    png = tmp_path / "curves.png"
    assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for ax in figures[0].axes:
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        assert labels == ["B2-DiffuRL (lr 0.01, 3 seeds)", "DDPO (lr 0.01, 3 seeds)", "D3PO (lr 0.03, 3 seeds)"]
        assert len({line.get_color() for line in ax.lines}) == 3
        assert len(ax.collections) == 3  # the shaded bands


def test_methods_overrides_reach_the_config(tmp_path):
    objectives = {"B2-DiffuRL": "ppo", "DDPO": "ppo", "D3PO": "d3po", "DRO": "dro",
                  "DRO-unpaired": "dro_unpaired", "Diffusion-DPO": "diffusion_dpo", "B2-DiffuRL-LCM": "ppo",
                  "B2-DiffuRL-null": "ppo"}
    assert list(tc.METHODS) == list(objectives) and tc.DEFAULT_METHODS == ["B2-DiffuRL", "DDPO"]
    for method, objective in objectives.items():
        cfg = tc.validate(tc.make_config(method, 1, tmp_path, ["--train.epochs", "1"], lr=0.02))
        assert cfg.train.objective == objective and cfg.train.epochs == 1 and cfg.train.lr == 0.02
        assert cfg.selection.kind == ("ddpo" if method == "DDPO" else "b2")
        assert cfg.out == str(tmp_path / f"{method}-lr0.02-seed1")
    lcm = tc.validate(tc.make_config("B2-DiffuRL-LCM", 0, tmp_path, []))
    assert (lcm.model.path, lcm.sampling.scheduler, lcm.sampling.num_steps) == ("b2fast:toy-lcm", "lcm", 4)
    assert lcm.schedule.max_interval == 4 and lcm.sampling.batches_per_stage == 4   # the same images per stage
    # its own lr (chosen on training reward) without --lrs; a sweep's lr or an override still wins
    assert lcm.train.lr == tc.METHOD_LRS["B2-DiffuRL-LCM"] != tc.make_config("B2-DiffuRL", 0, tmp_path, []).train.lr
    assert tc.make_config("B2-DiffuRL-LCM", 0, tmp_path, ["--train.lr", "0.5"]).train.lr == 0.5
    # --policy lcm: every method on the toy LCM, its own objective and selection kept
    for method in tc.METHODS:
        cfg = tc.validate(tc.make_config(method, 0, tmp_path, [], policy="lcm"))
        assert (cfg.model.path, cfg.sampling.scheduler, cfg.sampling.num_steps) == ("b2fast:toy-lcm", "lcm", 4)
        assert cfg.train.objective == objectives[method] and cfg.schedule.max_interval == 4
    ddpo = tc.make_config("DDPO", 0, tmp_path, [], policy="lcm")
    assert (ddpo.schedule.kind, ddpo.sampling.branches) == ("constant", 1)   # DDPO's whole chain: 4 steps
    assert tc.make_config("B2-DiffuRL-null", 0, tmp_path, []).selection.null_control == "shuffle"
    assert tc.make_config("B2-DiffuRL", 0, tmp_path, []).selection.null_control != "shuffle"
    # the method's own overrides come last: D3PO stays D3PO
    assert tc.make_config("D3PO", 0, tmp_path, ["--train.objective", "dro"]).train.objective == "d3po"


def test_methods_rejects_an_unknown_name(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        tc.main(["--methods", "B2-DiffuRL", "PPO2", "--out", str(tmp_path)])
    assert exit_.value.code == 2
    assert "argument --methods: invalid choice: 'PPO2'" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_an_invalid_method_config_is_a_one_line_error(tmp_path, capsys):
    # pair objectives need B² branch groups: stopped before any model loads
    with pytest.raises(SystemExit) as exit_:
        tc.main(["--methods", "D3PO", "--selection.kind", "ddpo", "--out", str(tmp_path)])
    assert exit_.value.code == 2 and "error: train.objective: got 'd3po'" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_table_only_reads_an_older_results_json(tmp_path, capsys):
    # an older version: no lr, no queries, no eval_curve; the two original method names
    old = [{k: v for k, v in r.items() if k not in ("eval_curve", "queries", "lr")}
           for r in _results() if r["lr"] == 0.01]
    (tmp_path / "results.json").write_text(json.dumps(old))
    tc.main(["--table-only", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "| B2-DiffuRL (lr ?) | 3 |" in out and "| DDPO (lr ?) | 3 |" in out and "No alignment curves" in out
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_results_without_curves_still_give_a_table(tmp_path):
    old = [{k: v for k, v in r.items() if k not in ("eval_curve", "queries")} for r in _results()]
    assert "No alignment curves" in tc.write_curves(old, tmp_path)
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_default_eval_stages_are_the_middle_and_the_last():
    assert tc.default_eval_stages(10) == [4, 9]
    assert tc.default_eval_stages(2) == [0, 1] and tc.default_eval_stages(1) == [0]


def _script(*args: str, timeout: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], check=False, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)


def test_an_eval_stage_out_of_range_is_a_one_line_error(tmp_path):
    done = _script("--eval-stages", "0", "2", "--schedule.num_stages", "2", "--out", str(tmp_path), timeout=120)
    assert done.returncode == 2
    assert "error: --eval-stages: got 2, expected a stage index in 0..1" in done.stderr
    assert not any(tmp_path.iterdir())  # nothing ran


TINY_RUN = ("--schedule.num_stages", "2", "--sampling.batches_per_stage", "1", "--sampling.prompts_per_batch", "2",
            "--sampling.num_steps", "4", "--schedule.min_interval", "2", "--schedule.max_interval", "4",
            "--eval.images_per_prompt", "1", "--eval.prompts_per_set", "1")


def test_end_to_end_tiny_comparison(tmp_path):
    started = time.perf_counter()
    done = _script("--seeds", "0", "1", "--methods", "B2-DiffuRL", "DDPO", "--eval-stages", "0", "1",
                   *TINY_RUN, "--out", str(tmp_path), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    print(f"end-to-end run: {time.perf_counter() - started:.1f} s")
    results = json.loads((tmp_path / "results.json").read_text())
    assert sorted((r["method"], r["seed"]) for r in results) == [("B2-DiffuRL", 0), ("B2-DiffuRL", 1),
                                                                 ("DDPO", 0), ("DDPO", 1)]
    for run in results:
        per_stage = 8 if run["method"] == "B2-DiffuRL" else 2  # 2 prompts x 4 branches | x 1 sample
        assert run["queries"] == [per_stage, 2 * per_stage] and len(run["stage_rewards"]) == 2
        curve = run["eval_curve"]
        assert [(p["stage"], p["queries"]) for p in curve] == [("before", 0), (0, per_stage), (1, 2 * per_stage)]
        assert curve[0]["rows"] == run["before"] and curve[-1]["rows"] == run["after"]  # reused, not redone
        for point in curve:
            assert sorted((r["prompt_set"], r["split"]) for r in point["rows"]) == \
                sorted((s, split) for s in SETS for split in ("train", "test"))
        # the stage-0 checkpoint was kept and evaluated on its own
        assert (tmp_path / f"{run['method']}-seed{run['seed']}" / "checkpoints" / "stage-000000").is_dir()
    md = (tmp_path / "curves.md").read_text()
    assert "| B2-DiffuRL (lr 0.01) | 0 | 8 | 2 |" in md and "| DDPO (lr 0.01) | 1 | 4 | 2 |" in md
    assert "| 1 | 16 / 4 | 2 |" in md and md in done.stdout
    assert (tmp_path / "curves.png").stat().st_size > 1000
    # --table-only writes both again from results.json
    (tmp_path / "curves.md").unlink()
    (tmp_path / "curves.png").unlink()
    again = _script("--table-only", "--out", str(tmp_path), timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (tmp_path / "curves.md").read_text() == md and (tmp_path / "curves.png").stat().st_size > 1000


def test_end_to_end_objective_on_the_same_branches(tmp_path):
    started = time.perf_counter()
    done = _script("--seeds", "0", "--methods", "B2-DiffuRL", "D3PO", "--eval-stages", "1",
                   *TINY_RUN, "--out", str(tmp_path), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    print(f"end-to-end run: {time.perf_counter() - started:.1f} s")
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["method"] for r in results] == ["B2-DiffuRL", "D3PO"]
    assert results[0]["queries"] == results[1]["queries"] == [8, 16]  # the same B² sampling
    config = (tmp_path / "D3PO-seed0" / "config.yaml").read_text()
    assert "objective: d3po" in config
    md = (tmp_path / "curves.md").read_text()
    assert "Paired difference B2-DiffuRL − D3PO" in md and "| 1 | 16 | 1 |" in md


def test_the_default_run_is_the_measured_lcm_setting(tmp_path):
    """README's five-seed measurement of the no-argument run is a toy_compare.py command: every field that
    shapes training in the config it builds must equal default.yaml's (so the README's numbers are the
    preset's)."""
    import shlex

    from b2fast.config import iter_fields, load_yaml

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("### The default run"):]
    start = section.index("run as `python benchmarks/toy_compare.py") + len("run as `")
    command = shlex.split(section[start:section.index("`", start)])
    args, overrides = tc.build_parser().parse_known_args(command[2:])
    assert args.policy == "lcm" and "B2-DiffuRL" in args.methods and len(args.lrs) == 1
    assert args.seeds == [0, 1, 2, 3, 4]
    measured = tc.make_config("B2-DiffuRL", 0, tmp_path, overrides, lr=args.lrs[0], policy="lcm")
    shipped = {name: value for name, value, _ in iter_fields(load_yaml("default"))}
    differ = [name for name, value, _ in iter_fields(measured)
              if value != shipped[name] and not name.startswith(("log.", "out", "checkpoint_every", "keep_checkpoints"))]
    assert differ == []
