"""DDPO as a selection mode: per-prompt stat tracking with the batch fallback, every sample
kept, the toy_ddpo preset end to end, and its tracker state across a resume."""
import json
import math
import statistics

import pytest
import torch

from b2fast.config import ConfigError, apply_overrides, load_yaml, validate
from b2fast.core.selection import (PromptStatTracker, RewardHistory, load_tracker_state, make_tracker,
                                   normalize_and_select, select_all)
from b2fast.run.trainer import Trainer
from b2fast.train import main

TINY = ["--sampling.batches_per_stage", "1", "--sampling.prompts_per_batch", "2", "--sampling.num_steps", "4",
        "--schedule.min_interval", "4", "--schedule.max_interval", "4", "--schedule.num_stages", "2",
        "--eval.enabled", "false", "--device", "cpu", "--log.progress", "false", "--log.grid_every", "0",
        "--train.micro_batch", "8"]


def _adv(r, values):
    return (r - statistics.fmean(values)) / (statistics.pstdev(values) + 1e-6)


def test_advantages_by_hand_own_stats_or_the_batch_and_buffer_truncation():
    tracker = PromptStatTracker(buffer_size=4, min_count=3)
    # stage 1: 'a' has 3 rewards (>= min_count): its own stats; 'b' has 1: the batch's
    rewards = [1.0, 2.0, 3.0, 10.0]
    adv = tracker.update(["a", "a", "a", "b"], torch.tensor(rewards))
    expected = [_adv(r, [1, 2, 3]) for r in rewards[:3]] + [_adv(10.0, rewards)]
    assert torch.allclose(adv, torch.tensor(expected), atol=1e-6)
    # stage 2: 'a' buffer [1, 2, 3, 5, 7] keeps its newest 4; 'b' (2 rewards) uses this batch's
    # finite rewards; a NaN reward gets NaN and stays out of every statistic
    adv = tracker.update(["a", "a", "b", "c"], torch.tensor([5.0, 7.0, 0.0, math.nan]))
    assert tracker.rewards("a") == [2.0, 3.0, 5.0, 7.0]
    assert tracker.rewards("b") == [10.0, 0.0] and tracker.rewards("c") == []
    expected = [_adv(5.0, [2, 3, 5, 7]), _adv(7.0, [2, 3, 5, 7]), _adv(0.0, [5, 7, 0])]
    assert torch.allclose(adv[:3], torch.tensor(expected), atol=1e-6) and math.isnan(adv[3])
    assert tracker.stages_seen == 2


def test_every_sample_is_kept_with_its_advantage():
    z = torch.tensor([0.5, -1.0, math.nan, 0.0, 2.0])
    sel = select_all(z)
    assert sel.indices.tolist() == [0, 1, 3, 4]
    assert torch.equal(sel.advantages, z[[0, 1, 3, 4]])
    assert sel.positive.tolist() == [True, False, False, True]
    assert (sel.n_positive, sel.n_negative, len(sel)) == (2, 2, 4)


def test_kind_routes_to_the_tracker_and_b2_is_unchanged():
    cfg = load_yaml("toy_ddpo")
    tracker = make_tracker(cfg.selection)
    assert isinstance(tracker, PromptStatTracker) and (tracker.buffer_size, tracker.min_count) == (32, 16)
    prompts, rewards, groups = ["p", "q", "p", "q"], torch.tensor([0.1, 0.9, 0.4, 0.2]), torch.arange(4)
    z, sel = normalize_and_select(tracker, cfg.selection, prompts, rewards, groups)
    assert len(sel) == 4  # every sample, with branches 1 and no thresholds
    b2 = load_yaml("default").selection
    history = make_tracker(b2)
    assert isinstance(history, RewardHistory)
    z2, sel2 = normalize_and_select(history, b2, prompts, rewards, torch.tensor([0, 0, 1, 1]))
    assert len(sel2) <= 4 and sel2.n_positive + sel2.n_negative == len(sel2)


def test_state_dict_round_trip_and_a_smaller_buffer():
    tracker = PromptStatTracker(buffer_size=3, min_count=2)
    tracker.update(["a", "a", "a", "b"], torch.tensor([1.0, 2.0, 3.0, 4.0]))
    state = json.loads(json.dumps(tracker.state_dict()))
    again = PromptStatTracker()
    again.load_state_dict(state)
    assert again.state_dict() == tracker.state_dict()
    again.load_state_dict(state, buffer_size=2)
    assert again.rewards("a") == [2.0, 3.0]


def test_validation_names_the_field():
    for args, field in [(["--selection.kind", "grpo"], "selection.kind"),
                        (["--selection.buffer_size", "0"], "selection.buffer_size"),
                        (["--selection.min_count", "0"], "selection.min_count"),
                        (["--selection.min_count", "33"], "selection.min_count")]:
        with pytest.raises(ConfigError, match=rf"^{field}: "):
            validate(apply_overrides(load_yaml("toy_ddpo"), args))
    cfg = validate(load_yaml("toy_ddpo"))
    assert (cfg.sampling.branches, cfg.schedule.kind, cfg.schedule.min_interval, cfg.schedule.max_interval,
            cfg.train.clip_range, cfg.train.adv_clip) == (1, "constant", 20, 20, 1e-4, 5.0)


def test_toy_ddpo_preset_runs_two_stages_through_the_cli(tmp_path):
    out = tmp_path / "ddpo"
    assert main(["--config", "toy_ddpo", *TINY, "--out", str(out)]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in records] == [0, 1]
    assert all(r["interval_len"] == 4 and r["n_images"] == 2 and r["n_selected"] == 2 for r in records)
    assert "selection:\n  history_stages: 8\n  pos_threshold: 0.5\n  neg_threshold: -0.5\n  kind: ddpo" \
        in (out / "config.yaml").read_text()
    assert (out / "checkpoints" / "latest").read_text().strip() == "stage-000001"


def _lora(trainer):
    return {k: v.clone() for k, v in trainer.policy.lora_state_dict().items()}


def test_resume_round_trips_the_ddpo_tracker(tmp_path):
    extra = [*TINY, "--schedule.num_stages", "3", "--selection.buffer_size", "3", "--selection.min_count", "2",
             "--sampling.prompts_per_batch", "3", "--prompts.source", "toy_attribute"]

    def cfg(out):
        return apply_overrides(load_yaml("toy_ddpo"), [*extra, "--out", str(out)])

    full = Trainer(cfg(tmp_path / "full"))
    full.run()
    cut = Trainer(cfg(tmp_path / "cut"))
    for stage in range(2):
        cut.run_stage(stage)
    stored = cut.history.state_dict()
    resumed = Trainer(cfg(tmp_path / "cut"), resume=str(tmp_path / "cut"))
    assert resumed.start_stage == 2 and resumed.history.state_dict() == stored
    resumed.run()
    assert resumed.history.state_dict() == full.history.state_dict()
    assert any(len(resumed.history.rewards(p)) == 3 for p in resumed.prompts)  # buffers truncated
    a, b = _lora(full), _lora(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="selection.kind: the checkpoint was trained with 'ddpo'"):
        Trainer(apply_overrides(cfg(tmp_path / "cut"), ["--selection.kind", "b2"]), resume=str(tmp_path / "cut"))


def test_b2_history_state_loads_as_before():
    history = RewardHistory(2)
    history.add_stage(["a"], torch.tensor([1.0]))
    cfg = load_yaml("toy_ddim").selection
    fresh = make_tracker(cfg)
    assert load_tracker_state(fresh, history.state_dict(), cfg) is not None  # H 2 -> 8: a note
    assert fresh.rewards("a") == [1.0]
