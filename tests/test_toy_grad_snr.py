"""benchmarks/toy_grad_snr.py: the consistency estimator on gradients with a known signal share,
and the recorded stage gradient against the step ``policy_update`` really takes."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from bench_util import load_benchmark

from b2fast.config import apply_overrides, load_yaml
from b2fast.core.selection import normalize_and_select
from b2fast.core.update import policy_update
from b2fast.run.trainer import Trainer, stage_generator
from b2fast.config import presets_dir

snr = load_benchmark("toy_grad_snr")
TINY = ["--sampling.num_steps", "4", "--schedule.min_interval", "2", "--schedule.max_interval", "4",
        "--sampling.prompts_per_batch", "2", "--sampling.batches_per_stage", "2", "--prompts.source", "toy_attribute"]


@pytest.mark.parametrize("signal_norm", [0.0, 1.0, 3.0])
def test_consistency_recovers_the_signal_share_of_synthetic_gradients(signal_norm):
    torch.manual_seed(0)
    P, M, sigma = 400, 60, 0.1                       # noise E‖n‖² = P σ² = 4
    g = torch.randn(P)
    g = g / g.norm() * signal_norm
    grads = g + sigma * torch.randn(M, P)
    truth = signal_norm ** 2 / (signal_norm ** 2 + P * sigma ** 2)
    r = snr.consistency(grads)
    assert 0 < r["se"] < 0.05
    assert abs(r["consistency"] - truth) < 4 * r["se"] + 0.01, (r, truth)
    if signal_norm == 3.0:                            # SNR = 3 / 2
        assert r["snr"] == pytest.approx(1.5, rel=0.15)
        assert r["stages_per_unit_snr"] == pytest.approx(1 / r["snr"] ** 2)


def test_identical_gradients_are_all_signal_and_opposite_ones_none():
    g = torch.randn(3, 50)
    same = snr.consistency(g[:1].repeat(4, 1))
    assert same["consistency"] == pytest.approx(1.0) and same["snr"] == math.inf
    flip = snr.consistency(torch.cat([g[:1], -g[:1], g[:1], -g[:1]]))
    assert flip["consistency"] < 0 and flip["snr"] == 0.0 and flip["stages_per_unit_snr"] == math.inf


def test_stage_gradient_is_the_step_policy_update_takes_and_moves_nothing(tmp_path):
    cfg = load_yaml(presets_dir() / "toy_ddim.yaml")
    apply_overrides(cfg, ["--out", str(tmp_path / "run"), "--eval.enabled", "false", "--log.progress", "false",
                          "--train.weight_decay", "0", "--reward.name", "toy_colour_fill", *TINY])
    trainer = Trainer(cfg)
    batch, table = trainer.sample_stage(0, 2)
    _, selection = normalize_and_select(trainer.history, cfg.selection, table.prompts, table.rewards, table.group_ids)
    assert len(selection) > 0
    params = trainer.policy.lora_parameters()
    start = [p.detach().clone() for p in params]
    grad = snr.stage_gradient(trainer, batch, selection, 0)
    assert all(torch.equal(p, s) for p, s in zip(params, start))       # recorded, not applied
    assert grad.shape == (sum(p.numel() for p in params),) and grad.norm() > 0
    # one plain SGD step (lr 1) over every kept unit moves the weights by exactly −gradient
    sgd = torch.optim.SGD(params, lr=1.0)
    tcfg = dataclasses.replace(cfg.train, optimizer="adamw", max_grad_norm=0.0, epochs=1, trajectories_per_step=len(batch))
    policy_update(trainer.policy, sgd, batch, selection, tcfg, cfg.sampling, stage_generator(cfg.seed, 0, "shuffle"))
    moved = torch.cat([(p.detach() - s).flatten() for p, s in zip(params, start)])
    torch.testing.assert_close(moved, -grad, rtol=1e-4, atol=1e-8)


def test_main_appends_a_row_and_prints_the_table(tmp_path, capsys):
    out = tmp_path / "snr"
    snr.main(["--stages", "3", "--name", "tiny", "--out", str(out), *TINY])
    row = json.loads((out / "grad_snr.jsonl").read_text().splitlines()[0])
    assert row["name"] == "tiny" and row["stages"] == 3 and row["interval"] == 2
    assert row["images_per_stage"] == 16 and "--sampling.num_steps 4" in row["overrides"]
    assert set(row["signal"]) == {"consistency", "se", "snr", "stages_per_unit_snr"}
    assert "| tiny | 3 × 16 |" in capsys.readouterr().out
    assert not (out / "scratch").exists()
    with pytest.raises(SystemExit):
        snr.main(["--table-only", "--out", str(tmp_path / "none")])
    with pytest.raises(SystemExit):
        snr.main(["--stages", "2", "--out", str(out)])
