"""Objectives: the PPO-clip loss and advantage weights on hand numbers (docs/algorithm.md,
"Policy update"), and the registry that ``train.objective`` names and the update goes through."""
import math

import pytest
import torch

from b2fast.config import SamplingConfig, TrainConfig
from b2fast.core.objectives import (OBJECTIVES, Items, Objective, advantage_weights, get_objective,
                                    ppo_clip_loss, register_objective)
from b2fast.core.selection import Selection

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
    ppo = get_objective("ppo")
    z, lp, old = torch.tensor([-7.0, 0.3, 2.0]), torch.tensor([0.1, -0.2, 0.0]), torch.zeros(3)
    tcfg = TrainConfig(adv_clip=5.0, pos_weight=2.0, neg_weight=0.5, clip_range=0.2)
    selection = Selection(indices=torch.tensor([4, 1, 9]), advantages=z, positive=z > 0, n_positive=2, n_negative=1)
    items = ppo.items(selection, tcfg)
    assert items.rows.tolist() == [[4], [1], [9]]
    torch.testing.assert_close(items.values, advantage_weights(z, 5.0, 2.0, 0.5))
    assert ppo.needs(tcfg) == {"log_prob", "old_log_prob"}
    loss, stats = ppo.loss({"log_prob": lp[:, None], "old_log_prob": old[:, None]}, items.values, tcfg)
    torch.testing.assert_close(loss, ppo_clip_loss(lp, old, advantage_weights(z, 5.0, 2.0, 0.5), 0.2)[0])
    assert set(ppo.stats) <= set(stats)
    available = r"\['d3po', 'diffusion_dpo', 'dro', 'dro_unpaired', 'ppo'\]"
    with pytest.raises(ValueError, match=rf"train.objective: unknown objective 'nope'; available: {available}"):
        get_objective("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_objective(Objective("ppo", ppo.items, ppo.needs, ppo.loss))
    with pytest.raises(ValueError, match="clip_range"):
        ppo_clip_loss(torch.zeros(2), torch.zeros(2), torch.zeros(2), 0.0)
    with pytest.raises(ValueError, match="advantages"):
        ppo_clip_loss(torch.zeros(2), torch.zeros(2), torch.zeros(3), EPS)


def test_the_update_goes_through_the_configured_objective(tiny_policy, monkeypatch):
    """A registered objective plugs in by name alone: ``policy_update`` calls its advantages and
    loss, averages the statistics it declares, and the LoRA moves along its gradient."""
    from b2fast.core.sampling import sample_branches
    from b2fast.core.selection import Selection
    from b2fast.core.update import make_optimizer, policy_update

    scfg = SamplingConfig(num_steps=6, branches=2, prompts_per_batch=2)
    batch = sample_branches(tiny_policy, ["a red cube", "a blue ball"], torch.arange(2), 3, scfg,
                            torch.Generator().manual_seed(3))
    calls = {"items": 0, "loss": 0}

    def items(selection, tcfg):
        calls["items"] += 1
        # not what PPO would give (z clamped and weighted)
        return Items(selection.indices[:, None], torch.full_like(selection.advantages, 7.0))

    def loss(terms, values, tcfg):
        calls["loss"] += 1
        assert torch.all(values == 7.0) and set(terms) == {"log_prob"} and terms["log_prob"].shape[1] == 1
        return -terms["log_prob"][:, 0], {"marker": torch.tensor(3.0)}   # plain log-likelihood ascent

    monkeypatch.setitem(OBJECTIVES, "likelihood", Objective("likelihood", items, lambda tcfg: frozenset({"log_prob"}),
                                                            loss, ("marker",)))
    selection = Selection(indices=torch.tensor([0, 3]), advantages=torch.tensor([1.0, -1.0]),
                          positive=torch.tensor([True, False]), n_positive=1, n_negative=1)
    tcfg = TrainConfig(objective="likelihood", micro_batch=2, trajectories_per_step=2, epochs=1, lr=1e-2)
    before = [p.detach().clone() for p in tiny_policy.lora_parameters()]
    optimizer = make_optimizer(tiny_policy.lora_parameters(), tcfg)
    stats = policy_update(tiny_policy, optimizer, batch, selection, tcfg, scfg,
                          torch.Generator().manual_seed(0))
    assert calls["items"] == 1 and calls["loss"] == batch.interval_len  # 2 trajectories · L pairs / 2
    assert stats["marker"] == pytest.approx(3.0) and stats["clipfrac"] is None
    assert stats["optimizer_steps"] == 1
    assert any(not torch.equal(b, p) for b, p in zip(before, tiny_policy.lora_parameters()))

