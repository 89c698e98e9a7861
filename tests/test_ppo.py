"""PPO-clip loss and advantage weights on hand numbers (docs/algorithm.md, "Policy update")."""
import math

import pytest
import torch

from b2fast.core.objectives import LOSSES, advantage_weights, get_loss, ppo_clip_loss

EPS = 0.1


def test_ratio_one_gives_minus_a():
    a = torch.tensor([2.0, -0.5, 0.0])
    logp = torch.tensor([-1.3, 0.2, 4.0])
    loss, stats = ppo_clip_loss(logp, logp.clone(), a, EPS)
    torch.testing.assert_close(loss, -a)
    assert stats["clipfrac"].item() == 0.0
    assert stats["approx_kl"].item() == 0.0
    assert stats["ratio_mean"].item() == 1.0


@pytest.mark.parametrize("advantage, ratio, clipped", [
    (2.0, 1.05, False),   # inside the range
    (-2.0, 0.95, False),
    (2.0, 1.3, True),     # A > 0 and r above 1+ε: clipped, no gradient
    (2.0, 0.7, False),    # A > 0 and r below 1−ε: the pessimistic term is the unclipped one
    (-2.0, 0.7, True),    # A < 0 and r below 1−ε: clipped
    (-2.0, 1.3, False),   # A < 0 and r above 1+ε: unclipped
])
def test_gradient_is_minus_a_r_or_zero(advantage, ratio, clipped):
    old = torch.tensor([-0.4], dtype=torch.float64)
    logp = (old + math.log(ratio)).requires_grad_()
    a = torch.tensor([advantage], dtype=torch.float64)
    loss, _ = ppo_clip_loss(logp, old, a, EPS)
    loss.sum().backward()
    expected_grad = 0.0 if clipped else -advantage * ratio
    assert logp.grad.item() == pytest.approx(expected_grad, abs=1e-12)
    r_clip = min(max(ratio, 1 - EPS), 1 + EPS)
    assert loss.item() == pytest.approx(max(-advantage * ratio, -advantage * r_clip), rel=1e-12)


def test_old_log_prob_and_advantages_get_no_gradient():
    logp = torch.zeros(2, requires_grad=True)
    old = torch.zeros(2, requires_grad=True)
    a = torch.ones(2, requires_grad=True)
    ppo_clip_loss(logp, old, a, EPS)[0].sum().backward()
    assert old.grad is None and a.grad is None


def test_clipfrac_and_approx_kl_on_hand_numbers():
    # log-ratios 0, 0.2, -0.05, -0.3: |r − 1| = 0, 0.221, 0.049, 0.259 -> 2 of 4 beyond ε
    log_ratio = torch.tensor([0.0, 0.2, -0.05, -0.3], dtype=torch.float64)
    old = torch.full((4,), -2.0, dtype=torch.float64)
    _, stats = ppo_clip_loss(old + log_ratio, old, torch.ones(4, dtype=torch.float64), EPS)
    assert stats["clipfrac"].item() == pytest.approx(0.5)
    # ½·mean(0 + 0.04 + 0.0025 + 0.09) = ½·0.1325/4
    assert stats["approx_kl"].item() == pytest.approx(0.5 * 0.1325 / 4)
    expected_mean = sum(math.exp(x) for x in [0.0, 0.2, -0.05, -0.3]) / 4
    assert stats["ratio_mean"].item() == pytest.approx(expected_mean)
    assert not any(v.requires_grad for v in stats.values())


def test_advantage_weights_clamp_and_asymmetric_betas():
    z = torch.tensor([-7.0, -1.0, 0.0, 0.5, 9.0])
    a = advantage_weights(z, adv_clip=5.0, pos_weight=2.0, neg_weight=0.5)
    torch.testing.assert_close(a, torch.tensor([-2.5, -0.5, 0.0, 1.0, 10.0]))


def test_registry_and_bad_arguments():
    assert LOSSES["ppo_clip"] is ppo_clip_loss and get_loss("ppo_clip") is ppo_clip_loss
    with pytest.raises(ValueError, match="ppo_clip"):
        get_loss("nope")
    with pytest.raises(ValueError, match="clip_range"):
        ppo_clip_loss(torch.zeros(2), torch.zeros(2), torch.zeros(2), 0.0)
    with pytest.raises(ValueError, match="advantages"):
        ppo_clip_loss(torch.zeros(2), torch.zeros(2), torch.zeros(3), EPS)
