"""The pair and denoising objectives inside the update (docs/algorithm.md, "Objectives"): the
denoising error M_θ by hand and against diffusers' forward noising, the base model's terms
with the adapters off against an untouched copy, trunk cancellation of D3PO, the DRO gradient
as ∇M(w) − ∇M(l), pairs from the selection, and a full update per objective."""
import copy

import pytest
import torch

from b2fast.config import SamplingConfig, TrainConfig
from b2fast.core.objectives import get_objective
from b2fast.core.selection import Selection, null_control, pair_stats, select
from b2fast.core.update import StageUnits, _reference_terms, _unit_terms, make_optimizer, policy_update

PROMPTS = ["a red cube", "a blue ball"]


@pytest.fixture
def batch(tiny_policy):
    """Two groups of two branches over a 3-step window, LoRA moved off zero (so LoRA on ≠ off)."""
    from b2fast.core.sampling import sample_branches
    torch.manual_seed(1)
    for p in tiny_policy.lora_parameters():
        p.data.normal_(0, 0.3)
    scfg = SamplingConfig(num_steps=6, branches=2, prompts_per_batch=2)
    return sample_branches(tiny_policy, PROMPTS, torch.arange(2), 3, scfg, torch.Generator().manual_seed(3)), scfg


def _pairs_selection(pairs):
    pairs = torch.tensor(pairs)
    indices = pairs.flatten().sort().values
    return Selection(indices=indices, advantages=torch.where(torch.isin(indices, pairs[:, 0]), 1.0, -1.0),
                     positive=torch.isin(indices, pairs[:, 0]), n_positive=len(pairs), n_negative=len(pairs),
                     pairs=pairs)


def test_denoising_error_is_the_mse_of_the_conditional_prediction(tiny_policy):
    from diffusers import DDIMScheduler
    x0 = torch.randn(3, 4, 8, 8)
    noise = torch.randn_like(x0)
    step = torch.tensor([0, 4, 9])
    cond = tiny_policy.embed(["a", "b c", "d"])
    got = tiny_policy.denoising_error(x0, step, noise, cond)
    t = tiny_policy.steps.timesteps[step]
    x_t = DDIMScheduler.from_config(tiny_policy.scheduler.config).add_noise(x0, noise, t)  # diffusers' q(x_t | x0)
    eps = tiny_policy.unet(x_t, t, encoder_hidden_states=cond).sample
    torch.testing.assert_close(got, ((eps - noise) ** 2).mean(dim=(1, 2, 3)), rtol=1e-5, atol=1e-6)
    assert got.shape == (3,) and (got > 0).all()


def test_reference_terms_with_adapters_off_equal_an_untouched_copy(tiny_policy, batch):
    """The base model is the UNet with LoRA disabled: same numbers as a copy whose LoRA was never
    trained (peft starts B at 0), bit for bit, for log-probs and denoising errors alike."""
    batch, scfg = batch
    tcfg = TrainConfig(micro_batch=10)   # one UNet call for all 5 units, as below (batch shape changes rounding)
    fresh = copy.deepcopy(tiny_policy)
    for name, p in fresh.unet.named_parameters():
        if "lora_B" in name:
            p.data.zero_()
    units = StageUnits(torch.tensor([[0, 1], [3, 2]]), torch.ones(2), torch.randn(2, 3, 2, 4, 8, 8))
    needs = frozenset({"ref_log_prob", "ref_error"})
    mine = torch.tensor([[True, True, True], [True, False, True]])
    _reference_terms(tiny_policy, batch, units, mine, needs, tcfg, scfg)
    items, positions = torch.nonzero(mine, as_tuple=True)
    with torch.no_grad():
        base = _unit_terms(fresh, batch, units, items, positions, frozenset({"log_prob", "error"}), tcfg, scfg)
        lora = _unit_terms(tiny_policy, batch, units, items, positions, frozenset({"log_prob"}), tcfg, scfg)
    assert torch.equal(units.reference["ref_log_prob"][items, positions], base["log_prob"])
    assert torch.equal(units.reference["ref_error"][items, positions], base["error"])
    assert not torch.allclose(lora["log_prob"], base["log_prob"])         # LoRA on really differs
    assert units.reference["ref_log_prob"][1, 1].isnan().all()             # units not asked stay NaN


def test_d3po_trunk_steps_cancel_so_the_chain_gradient_is_the_windows(tiny_policy, batch):
    """Both members of a pair share the trunk: same state, same action, so each trunk step gives
    log 2 and no gradient; the chain's gradient is the window's."""
    batch, scfg = batch
    tcfg = TrainConfig(micro_batch=8, d3po_beta=5.0)
    d3po = get_objective("d3po")
    units = StageUnits(torch.tensor([[0, 1]]), torch.ones(1))
    L = batch.interval_len
    _reference_terms(tiny_policy, batch, units, torch.ones(1, L, dtype=torch.bool), d3po.needs(tcfg), tcfg, scfg)

    def grads(with_trunk: bool):
        items, positions = torch.zeros(L, dtype=torch.long), torch.arange(L)
        terms = _unit_terms(tiny_policy, batch, units, items, positions, d3po.needs(tcfg), tcfg, scfg)
        loss, _ = d3po.loss(terms, units.values[items], tcfg)
        total = loss.sum()
        if with_trunk:  # the winner's own steps as a shared trunk: both members identical
            trunk = StageUnits(torch.tensor([[0, 0]]), torch.ones(1), reference={
                "ref_log_prob": units.reference["ref_log_prob"][:, :, :1].expand(1, L, 2).contiguous()})
            t_terms = _unit_terms(tiny_policy, batch, trunk, items, positions, d3po.needs(tcfg), tcfg, scfg)
            t_loss, _ = d3po.loss(t_terms, trunk.values[items], tcfg)
            torch.testing.assert_close(t_loss, torch.full_like(t_loss, 0.6931471805599453))
            total = total + t_loss.sum()
        params = tiny_policy.lora_parameters()
        return torch.autograd.grad(total, params)

    window, chain = grads(False), grads(True)
    assert any(g.abs().max() > 0 for g in window)
    for a, b in zip(window, chain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)   # equal to fp32 rounding


def test_dro_gradient_is_grad_m_winner_minus_grad_m_loser(tiny_policy, batch):
    batch, scfg = batch
    tcfg = TrainConfig(micro_batch=8, loser_guard=0.0)
    dro = get_objective("dro")
    assert dro.needs(tcfg) == {"error"}
    units = StageUnits(torch.tensor([[2, 3]]), torch.ones(1), torch.randn(1, 3, 2, 4, 8, 8))
    items, positions = torch.tensor([0]), torch.tensor([1])
    params = tiny_policy.lora_parameters()
    loss, _ = dro.loss(_unit_terms(tiny_policy, batch, units, items, positions, dro.needs(tcfg), tcfg, scfg),
                       units.values[items], tcfg)
    got = torch.autograd.grad(loss.sum(), params)
    step = batch.step_indices[1:2]
    cond = tiny_policy.embed([batch.prompts[2]])
    m_w = tiny_policy.denoising_error(batch.final_latents[2:3], step, units.noise[0, 1, 0:1], cond)
    m_l = tiny_policy.denoising_error(batch.final_latents[3:4], step, units.noise[0, 1, 1:2], cond)
    g_w, g_l = torch.autograd.grad(m_w.sum(), params), torch.autograd.grad(m_l.sum(), params)
    for g, a, b in zip(got, g_w, g_l):
        torch.testing.assert_close(g, a - b, rtol=1e-4, atol=1e-6)   # one batched call vs two
    torch.testing.assert_close(loss.detach(), (m_w - m_l).detach())


def test_pairs_follow_the_thresholds_or_always_mode():
    # group 0: z spread both ways (pair); group 1: best passes, worst does not (pair only in 'always');
    # group 2: all equal (never a pair)
    z = torch.tensor([1.0, -1.0, 0.6, 0.2, 0.0, 0.0])
    groups = torch.tensor([0, 0, 1, 1, 2, 2])
    assert select(z, groups).pairs.tolist() == [[0, 1]]
    assert select(z, groups, pair_mode="always").pairs.tolist() == [[0, 1], [2, 3]]
    with pytest.raises(ValueError, match="selection.pair_mode"):
        select(z, groups, pair_mode="sometimes")
    sel = select(z, groups, pair_mode="always")
    assert pair_stats(sel, torch.tensor([0.9, 0.1, 0.5, 0.4, 0.3, 0.3])) == {
        "n_pairs": 2, "pair_reward_margin": pytest.approx((0.8 + 0.1) / 2)}
    assert null_control(sel, "zero").pairs.shape == (0, 2)
    swapped = null_control(sel, "shuffle", torch.Generator().manual_seed(0)).pairs
    assert sorted(map(sorted, swapped.tolist())) == [[0, 1], [2, 3]]  # same pairs, orientation random


def test_null_shuffle_swaps_about_half_of_many_pairs():
    pairs = torch.stack([torch.arange(0, 400, 2), torch.arange(1, 400, 2)], dim=1)
    sel = _pairs_selection(pairs.tolist())
    swapped = null_control(sel, "shuffle", torch.Generator().manual_seed(0)).pairs
    fraction = (swapped[:, 0] > swapped[:, 1]).float().mean().item()
    assert 0.4 < fraction < 0.6


@pytest.mark.parametrize("objective", ["d3po", "dro", "dro_unpaired", "diffusion_dpo"])
def test_update_runs_each_objective_and_reports_its_statistics(tiny_policy, batch, objective):
    batch, scfg = batch
    tcfg = TrainConfig(objective=objective, micro_batch=3, trajectories_per_step=1, epochs=2, lr=1e-3)
    before = [p.detach().clone() for p in tiny_policy.lora_parameters()]
    selection = _pairs_selection([[0, 1], [3, 2]])
    stats = policy_update(tiny_policy, make_optimizer(tiny_policy.lora_parameters(), tcfg), batch, selection,
                          tcfg, scfg, torch.Generator().manual_seed(0))
    n_items = 4 if objective == "dro_unpaired" else 2          # kept trajectories, or pairs
    assert len(get_objective(objective).items(selection, tcfg)) == n_items
    assert stats["optimizer_steps"] == 2 * n_items             # one item per step, two epochs
    for name in get_objective(objective).stats:
        assert stats[name] is not None and stats[name] == stats[name], name   # reported, not NaN
    assert any(not torch.equal(b, p) for b, p in zip(before, tiny_policy.lora_parameters()))


@pytest.mark.parametrize("objective", ["ppo", "d3po", "dro", "dro_unpaired", "diffusion_dpo"])
def test_a_small_step_of_each_objective_lowers_its_own_loss_on_the_same_data(tiny_policy, batch, objective):
    """The update descends: one short normalised-gradient step on a stage's items lowers that
    stage's loss (the second update reports the loss at the moved weights, same data and noise).
    A gradient with the wrong sign raises it; one that is zero or never reaches the LoRA leaves it."""
    batch, scfg = batch
    tcfg = TrainConfig(objective=objective, optimizer="nsgd", lr=1e-3, momentum=0.0, micro_batch=3,
                       trajectories_per_step=64, epochs=1, clip_range=1.0)
    selection = _pairs_selection([[0, 1], [3, 2]])
    optimizer = make_optimizer(tiny_policy.lora_parameters(), tcfg)
    losses = [policy_update(tiny_policy, optimizer, batch, selection, tcfg, scfg, torch.Generator().manual_seed(0))
              ["loss"] for _ in range(2)]
    assert losses[1] < losses[0], (objective, losses)


@pytest.mark.parametrize("epochs", [1, 3])
def test_d3po_reference_costs_one_no_grad_forward_per_kept_window_step_per_stage(tiny_policy, batch, epochs):
    """The cost bound of the goal, counted rather than timed: beyond PPO's update, D3PO runs the
    UNet without gradients on exactly (kept pair members × window steps) trajectories' rows (CFG's
    two halves each), once per stage whatever the number of epochs; PPO runs none."""
    batch, scfg = batch
    selection = _pairs_selection([[0, 1], [3, 2]])
    rows = {}

    def count(module, args):
        key = "grad" if torch.is_grad_enabled() else "no_grad"
        rows[key] = rows.get(key, 0) + args[0].shape[0]

    handle = tiny_policy.unet.register_forward_pre_hook(count)
    try:
        seen = {}
        for objective in ("ppo", "d3po"):
            rows.clear()
            tcfg = TrainConfig(objective=objective, micro_batch=4, trajectories_per_step=2, epochs=epochs, lr=1e-3)
            policy_update(tiny_policy, make_optimizer(tiny_policy.lora_parameters(), tcfg), batch, selection,
                          tcfg, scfg, torch.Generator().manual_seed(0))
            seen[objective] = dict(rows)
    finally:
        handle.remove()
    cfg_rows = 2 if scfg.guidance_scale != 1.0 else 1
    kept_members, window = 4, batch.interval_len
    assert seen["ppo"].get("no_grad", 0) == 0
    assert seen["d3po"]["no_grad"] == kept_members * window * cfg_rows
    assert seen["d3po"]["grad"] == seen["ppo"]["grad"] == epochs * kept_members * window * cfg_rows
