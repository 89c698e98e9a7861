"""Reward normalisation and branch selection on hand-computed numbers.

Spec: docs/algorithm.md, "Reward normalisation and selection".
"""
import json
import math

import pytest
import torch

from b2fast.core.selection import RewardHistory, normalize, normalize_stage, select


def t(values):
    return torch.tensor(values, dtype=torch.float32)


# ---- z-scores -------------------------------------------------------------------------------

def test_z_scores_of_a_hand_table():
    # prompt a: [1, 2, 3] -> mean 2, unbiased std 1 -> z [-1, 0, 1]
    # prompt b: [10, 14]  -> mean 12, std sqrt(((-2)^2 + 2^2)/1) = 2*sqrt(2)
    history = RewardHistory(history_stages=8)
    z = normalize_stage(history, ["a", "b", "a", "a", "b"], t([1, 10, 2, 3, 14]))
    s = 2 * math.sqrt(2)
    torch.testing.assert_close(z, t([-1, -2 / s, 0, 1, 2 / s]))
    assert z.dtype == torch.float32
    assert history.stats("a") == pytest.approx((2.0, 1.0))


def test_normalize_does_not_modify_history():
    history = RewardHistory(0)
    history.add_stage(["a", "a"], t([0, 2]))
    z = normalize(t([0, 2]), ["a", "a"], history)
    torch.testing.assert_close(z, t([-1, 1]) / math.sqrt(2))
    assert len(history) == 1 and history.stages_seen == 1


def test_history_window_drops_stages_older_than_h():
    history = RewardHistory(history_stages=1)
    history.add_stage(["a"], t([100]))      # stage 0: outside the window at stage 2
    history.add_stage(["a"], t([0]))        # stage 1
    z = normalize_stage(history, ["a"], t([2]))  # stage 2 pools {0, 2}: mean 1, std sqrt(2)
    torch.testing.assert_close(z, t([1 / math.sqrt(2)]))
    assert history.rewards("a") == [0.0, 2.0]


def test_window_is_in_stages_not_appearances():
    history = RewardHistory(history_stages=1)
    history.add_stage(["a", "a"], t([100, 200]))
    history.add_stage(["b"], t([0]))         # a is absent, but the stage still counts
    z = normalize_stage(history, ["a", "a"], t([1, 3]))
    torch.testing.assert_close(z, t([-1, 1]) / math.sqrt(2))


def test_h_zero_uses_only_the_current_stage():
    history = RewardHistory(history_stages=0)
    normalize_stage(history, ["a", "a"], t([50, 60]))
    z = normalize_stage(history, ["a", "a", "a"], t([1, 2, 3]))
    torch.testing.assert_close(z, t([-1, 0, 1]))
    assert len(history) == 1 and history.window == 1


def test_prompts_are_keyed_separately():
    history = RewardHistory(8)
    normalize_stage(history, ["a", "a"], t([0, 0]))
    z = normalize_stage(history, ["b", "b", "b"], t([1, 2, 3]))
    torch.testing.assert_close(z, t([-1, 0, 1]))
    assert history.stats("a") == (0.0, 0.0)


def test_single_reward_has_std_zero_and_z_zero():
    history = RewardHistory(8)
    z = normalize_stage(history, ["a"], t([7]))
    assert history.stats("a") == (7.0, 0.0)
    torch.testing.assert_close(z, t([0]))


def test_nan_rewards_are_ignored_and_give_nan_z():
    history = RewardHistory(8)
    z = normalize_stage(history, ["a", "a", "a", "a"], t([1, float("nan"), 2, 3]))
    assert history.rewards("a") == [1.0, 2.0, 3.0]
    assert torch.isnan(z[1])
    torch.testing.assert_close(z[[0, 2, 3]], t([-1, 0, 1]))


def test_state_dict_json_round_trip_gives_identical_z():
    history = RewardHistory(2)
    for stage in range(4):
        normalize_stage(history, ["a", "b", "a"], t([stage, 2 * stage + 1, stage ** 2]))
    restored = RewardHistory(7)
    restored.load_state_dict(json.loads(json.dumps(history.state_dict())))
    assert restored.history_stages == 2 and restored.stages_seen == 4 and len(restored) == 3
    prompts, rewards = ["a", "b", "b"], t([0.3, 1.7, -2.0])
    torch.testing.assert_close(normalize_stage(restored, prompts, rewards),
                               normalize_stage(history, prompts, rewards), rtol=0, atol=0)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="history_stages"):
        RewardHistory(-1)
    with pytest.raises(ValueError, match="prompts"):
        RewardHistory(1).add_stage(["a"], t([1, 2]))
    with pytest.raises(ValueError, match="group_ids"):
        select(t([1, 2]), torch.tensor([0]))


# ---- selection ------------------------------------------------------------------------------

def test_select_best_and_worst_per_group():
    z = t([0.2, 1.5, -0.7, 0.0, 0.4, -0.2, 0.6, -2.0, 0.1])
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    sel = select(z, groups, 0.5, -0.5)
    # group 0: best 1 (1.5), worst 2 (-0.7); group 1: none; group 2: best 6, worst 7
    assert sel.indices.tolist() == [1, 2, 6, 7]
    assert sel.indices.dtype == torch.int64
    torch.testing.assert_close(sel.advantages, t([1.5, -0.7, 0.6, -2.0]))
    assert (sel.n_positive, sel.n_negative) == (2, 2)


def test_all_equal_scores_select_nothing():
    history = RewardHistory(8)
    z = normalize_stage(history, ["a"] * 5, t([0.3] * 5))
    torch.testing.assert_close(z, torch.zeros(5))
    sel = select(z, torch.zeros(5, dtype=torch.long))
    assert len(sel) == 0 and (sel.n_positive, sel.n_negative) == (0, 0)


def test_thresholds_positive_inclusive_negative_exclusive():
    z = t([0.5, 0.0, -0.5, 0.49, 0.0, -0.51])
    sel = select(z, torch.tensor([0, 0, 0, 1, 1, 1]), 0.5, -0.5)
    assert sel.indices.tolist() == [0, 5]
    assert (sel.n_positive, sel.n_negative) == (1, 1)


def test_ties_go_to_the_lowest_index():
    z = t([1.0, -1.0, 1.0, -1.0])
    sel = select(z, torch.tensor([3, 3, 3, 3]))
    assert sel.indices.tolist() == [0, 1]


def test_nan_excluded_before_choosing():
    z = t([float("nan"), 0.9, -0.8, float("nan"), float("nan")])
    sel = select(z, torch.tensor([0, 0, 0, 1, 1]))
    assert sel.indices.tolist() == [1, 2]
    assert not torch.isnan(sel.advantages).any()


def test_single_valid_branch_is_kept_at_most_once():
    z = t([float("nan"), 0.7, float("nan"), -0.9])
    sel = select(z, torch.tensor([0, 0, 1, 1]))
    assert sel.indices.tolist() == [1, 3]
    assert (sel.n_positive, sel.n_negative) == (1, 1)
    # overlapping thresholds: a sample that qualifies both ways is one positive
    sel = select(t([0.0]), torch.tensor([0]), pos_threshold=-1.0, neg_threshold=1.0)
    assert sel.indices.tolist() == [0] and (sel.n_positive, sel.n_negative) == (1, 0)


def test_arbitrary_group_labels_and_interleaved_order():
    z = t([1.0, -1.0, 2.0, -2.0])
    sel = select(z, torch.tensor([70, 5, 5, 70]))
    assert sel.indices.tolist() == [0, 1, 2, 3]
    torch.testing.assert_close(sel.advantages, z)


def _select_by_loop(z, groups, pos, neg):
    """Plain-Python statement of the rule, to check the vectorised select against."""
    kept = set()
    for g in set(groups):
        members = [i for i in range(len(z)) if groups[i] == g and not math.isnan(z[i])]
        if not members:
            continue
        best = min(members, key=lambda i: (-z[i], i))
        worst = min(members, key=lambda i: (z[i], i))
        if z[best] >= pos:
            kept.add(best)
        if z[worst] < neg:
            kept.add(worst)
    return sorted(kept)


@pytest.mark.parametrize("seed", range(5))
def test_select_matches_a_plain_loop(seed):
    gen = torch.Generator().manual_seed(seed)
    n = 997  # odd size, groups of up to a few hundred, rounded z so ties occur
    z = (torch.randn(n, generator=gen) * 4).round() / 4
    z[torch.rand(n, generator=gen) < 0.1] = float("nan")
    groups = torch.randint(0, 7, (n,), generator=gen) * 13
    sel = select(z, groups, 0.5, -0.5)
    assert sel.indices.tolist() == _select_by_loop(z.tolist(), groups.tolist(), 0.5, -0.5)
    assert sel.n_positive + sel.n_negative == len(sel)


def test_null_controls_decouple_advantages_from_rewards():
    from b2fast.core.selection import null_control

    z = torch.tensor([1.5, -0.7, 0.9, -2.0, 0.6, -0.8, 1.1, -1.3])
    kept = select(z, torch.arange(8) // 2)           # 4 groups of 2: best and worst of each
    assert null_control(kept, "off") is kept
    zero = null_control(kept, "zero")
    assert torch.equal(zero.indices, kept.indices) and torch.all(zero.advantages == 0)
    shuffled = null_control(kept, "shuffle", torch.Generator().manual_seed(0))
    again = null_control(kept, "shuffle", torch.Generator().manual_seed(0))
    assert torch.equal(shuffled.indices, kept.indices) and torch.equal(shuffled.advantages, again.advantages)
    assert sorted(shuffled.advantages.tolist()) == sorted(kept.advantages.tolist())
    assert not torch.equal(shuffled.advantages, kept.advantages)
    with pytest.raises(ValueError, match="null_control"):
        null_control(kept, "reverse")


def test_null_control_is_a_validated_config_field():
    from b2fast.config import Config, ConfigError, validate

    cfg = Config()
    cfg.selection.null_control = "reverse"
    with pytest.raises(ConfigError, match=r"selection.null_control: got 'reverse'"):
        validate(cfg)
