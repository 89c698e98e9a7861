"""``train.optimizer: nsgd`` (unit-norm gradient steps) and ``train.max_step_gain`` (near-
deterministic DDIM steps left untrained): hand checks against the DDIM mean and the update."""
import math

import pytest
import torch

from b2fast.config import Config, ConfigError, SamplingConfig, TrainConfig, validate
from b2fast.core.schedule import build_step_table, step_gains, trained_steps
from b2fast.ops.reference.ddim import SIGMA, ddim_mean


def _cosine_scheduler():
    from diffusers import DDIMScheduler
    return DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")


def test_step_gain_is_the_slope_of_the_ddim_mean_over_sigma():
    """Finite difference of the DDIM mean in ε (x̂₀ unclipped), divided by σ, on fresh inputs."""
    steps = build_step_table(_cosine_scheduler(), 20, 1.0)
    gains = step_gains(steps.table)
    table = steps.table.double()
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    eps = torch.randn_like(x)
    for i in (0, 7, 18, 19):
        idx = torch.tensor([i])
        mean = lambda e: ddim_mean(e, x, table, idx, None)
        h = 1e-3
        slope = (mean(eps + h) - mean(eps - h)) / (2 * h)          # ∂μ/∂ε, the same for every element
        expected = slope.abs().mean().item() / table[i, SIGMA].item()
        assert gains[i].item() == pytest.approx(expected, rel=1e-6)


def test_the_step_to_t_1_is_the_only_outlier_on_the_toy_schedule():
    table = build_step_table(_cosine_scheduler(), 20, 1.0).table
    gains = step_gains(table)
    mask = trained_steps(table, 4.0)
    assert mask.tolist() == [i != 18 for i in range(20)]            # t = 51 → 1, gain ≈ 10× the median
    assert gains[18] > 8 * gains.median()
    assert trained_steps(table, 0.0).all()
    assert trained_steps(table, 100.0).all()


def test_eta_zero_steps_have_infinite_gain_and_are_untrained():
    table = build_step_table(_cosine_scheduler(), 10, 1.0).table.clone()
    table[3, SIGMA] = 0.0                                            # a deterministic step (σ = 0)
    assert math.isinf(step_gains(table)[3].item())
    assert not trained_steps(table, 4.0)[3]


@pytest.mark.parametrize("field, value", [("optimizer", "adam"), ("momentum", 1.0), ("max_step_gain", 0.5)])
def test_validation_names_the_field(field, value):
    cfg = Config()
    setattr(cfg.train, field, value)
    with pytest.raises(ConfigError, match=f"train.{field}"):
        validate(cfg)


def _update(policy, tcfg, scfg, batch):
    from b2fast.core.selection import Selection
    from b2fast.core.update import make_optimizer, policy_update

    selection = Selection(indices=torch.tensor([0, 3]), advantages=torch.tensor([1.0, -1.0]),
                          positive=torch.tensor([True, False]), n_positive=1, n_negative=1)
    before = [p.detach().clone() for p in policy.lora_parameters()]
    optimizer = make_optimizer(policy.lora_parameters(), tcfg)
    stats = policy_update(policy, optimizer, batch, selection, tcfg, scfg, torch.Generator().manual_seed(0))
    moved = torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(policy.lora_parameters(), before)))
    for p, b in zip(policy.lora_parameters(), before):
        p.data.copy_(b)
    return stats, moved.item()


@pytest.fixture
def branch_batch(tiny_policy):
    from b2fast.core.sampling import sample_branches
    scfg = SamplingConfig(num_steps=6, branches=2, prompts_per_batch=2)
    # make the LoRA non-trivial, so its A matrices get gradients too
    for p in tiny_policy.lora_parameters():
        p.data.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    batch = sample_branches(tiny_policy, ["a red cube", "a blue ball"], torch.arange(2), 4, scfg,
                            torch.Generator().manual_seed(3))
    return scfg, batch


@pytest.mark.parametrize("lr", [0.3, 2.0])
def test_an_nsgd_step_moves_the_lora_weights_exactly_lr(tiny_policy, branch_batch, lr):
    scfg, batch = branch_batch
    tcfg = TrainConfig(optimizer="nsgd", lr=lr, weight_decay=0.0, micro_batch=3, trajectories_per_step=2, epochs=1)
    stats, moved = _update(tiny_policy, tcfg, scfg, batch)
    assert stats["optimizer_steps"] == 1
    assert moved == pytest.approx(lr, rel=1e-5)
    adamw = TrainConfig(lr=lr, weight_decay=0.0, micro_batch=3, trajectories_per_step=2, epochs=1)
    assert _update(tiny_policy, adamw, scfg, batch)[1] != pytest.approx(lr, rel=1e-2)  # AdamW: sign-like step


def test_untrained_steps_contribute_no_pairs_and_no_gradient(tiny_policy, branch_batch, monkeypatch):
    """With a gain limit that leaves out interval position 1, the update sees 2 trajectories × 3
    positions, and its step equals that of an objective that gives position 1 zero weight."""
    import b2fast.core.update as update

    scfg, batch = branch_batch
    mask = torch.tensor([True, False, True, True])
    monkeypatch.setattr(update, "trained_positions", lambda policy, b, tcfg: mask)
    tcfg = TrainConfig(lr=1e-2, micro_batch=3, trajectories_per_step=2, epochs=1, max_step_gain=4.0)
    seen = []
    real = update._pair_log_probs

    def spy(policy, b, rows, j, *args):
        seen.extend(j.tolist())
        return real(policy, b, rows, j, *args)
    monkeypatch.setattr(update, "_pair_log_probs", spy)
    _update(tiny_policy, tcfg, scfg, batch)
    assert sorted(seen) == [0, 0, 2, 2, 3, 3]


def test_a_step_with_no_trained_position_is_not_taken(tiny_policy, branch_batch, monkeypatch):
    """No unit to train: no optimizer step (under torchrun zero gradients would let AdamW's
    momentum and weight decay move the weights, unlike one process)."""
    import b2fast.core.update as update

    scfg, batch = branch_batch
    monkeypatch.setattr(update, "trained_positions", lambda policy, b, tcfg: torch.zeros(4, dtype=torch.bool))
    stats, moved = _update(tiny_policy, TrainConfig(lr=1e-2, weight_decay=0.1, micro_batch=3,
                                                    trajectories_per_step=2, epochs=1, max_step_gain=4.0), scfg, batch)
    assert stats["optimizer_steps"] == 0 and moved == 0.0



def test_target_kl_ends_the_update_before_a_step_past_it(tiny_policy, branch_batch):
    """The first step is on-policy (approx-KL 0) and always taken; once the weights moved, the next
    step's approx-KL exceeds a tiny target and the stage's update ends there, without that step."""
    scfg, batch = branch_batch
    common = dict(lr=0.3, weight_decay=0.0, micro_batch=3, trajectories_per_step=1, epochs=2)
    free, free_moved = _update(tiny_policy, TrainConfig(**common), scfg, batch)
    assert free["optimizer_steps"] == 4 and free["kl_stopped"] is False and free["approx_kl"] > 0
    loose, loose_moved = _update(tiny_policy, TrainConfig(target_kl=1e9, **common), scfg, batch)
    assert loose["optimizer_steps"] == 4 and loose["kl_stopped"] is False and loose_moved == free_moved
    tight, tight_moved = _update(tiny_policy, TrainConfig(target_kl=1e-12, **common), scfg, batch)
    assert tight["optimizer_steps"] == 1 and tight["kl_stopped"] is True
    assert 0 < tight_moved < free_moved and tight_moved == pytest.approx(
        _first_step_length(tiny_policy, TrainConfig(**common), scfg, batch), rel=1e-6)


def _first_step_length(policy, tcfg, scfg, batch):
    """How far the first optimizer step of an update moves the LoRA weights (every later step is
    skipped)."""
    import b2fast.core.update as update
    calls, original = [], update._optimizer_step

    def once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            original(*args, **kwargs)
    update._optimizer_step = once
    try:
        return _update(policy, tcfg, scfg, batch)[1]
    finally:
        update._optimizer_step = original


@pytest.mark.parametrize("objective, value, match", [("ppo", -1e-3, ">= 0"), ("d3po", 1e-3, "only ppo")])
def test_target_kl_validation(objective, value, match):
    cfg = Config()
    cfg.train.objective, cfg.train.target_kl = objective, value
    with pytest.raises(ConfigError, match=f"train.target_kl.*{match}"):
        validate(cfg)


def test_the_stage_line_says_when_target_kl_stopped_the_update():
    from b2fast.run.trainer import _summary_line
    row = dict(stage=3, interval_len=4, reward_mean=0.5, reward_std=0.1, n_selected=10, loss=-0.1,
               approx_kl=2e-3, clipfrac=0.2, seconds=1.0, seconds_sampling=0.5)
    assert "kl 0.002 (stopped)  clip" in _summary_line({**row, "kl_stopped": True})
    assert "(stopped)" not in _summary_line({**row, "kl_stopped": False})
