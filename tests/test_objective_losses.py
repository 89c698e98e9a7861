"""The pair and denoising objectives (d3po, dro, dro_unpaired, diffusion_dpo) against closed forms
computed by hand in float64, and the registry entries that wire them to the update's terms."""
import math

import pytest
import torch

from b2fast.config import TrainConfig
from b2fast.core.objectives import get_objective
from b2fast.core.objectives.d3po import d3po_loss
from b2fast.core.objectives.denoising import diffusion_dpo_loss, dro_loss, dro_unpaired_loss, guard_losers
from b2fast.core.selection import Selection

LOG2 = math.log(2.0)


def _t(*xs, grad=False):
    return torch.tensor(xs, dtype=torch.float64, requires_grad=grad)


def _sig(x):  # σ in float64
    return 1.0 / (1.0 + math.exp(-x))


# -- d3po ------------------------------------------------------------------------------------------
def _d3po_grads(rw, rl, beta=0.1, clip=0.1, ref_w=(-1.0,), ref_l=(-2.0,)):
    """Log-ratios rw, rl placed on top of ref log-probs; returns (loss, stats, grad_w, grad_l)."""
    ref_w, ref_l = _t(*ref_w), _t(*ref_l)
    lw = (ref_w + _t(*rw)).detach().requires_grad_()
    ll = (ref_l + _t(*rl)).detach().requires_grad_()
    loss, stats = d3po_loss(lw, ll, ref_w, ref_l, beta, clip)
    loss.sum().backward()
    return loss, stats, lw.grad, ll.grad


def test_d3po_inside_band_matches_closed_form():
    """Inside [1−ε, 1+ε] the clamp is the identity: L = −log σ(β(rw − rl)), dL/dℓw = −β σ(−z)."""
    rw, rl, beta = [0.05, -0.03, 0.0], [-0.04, 0.06, 0.02], 0.7
    loss, _, gw, gl = _d3po_grads(rw, rl, beta, ref_w=(-1.0, 0.5, 2.0), ref_l=(-2.0, 1.5, -0.3))
    for i in range(3):
        z = beta * (rw[i] - rl[i])
        assert loss[i].item() == pytest.approx(-math.log(_sig(z)), rel=1e-9)
        assert gw[i].item() == pytest.approx(-beta * (1 - _sig(z)), rel=1e-9)
        assert gl[i].item() == pytest.approx(beta * (1 - _sig(z)), rel=1e-9)


@pytest.mark.parametrize("ratio", [1.25, 0.8])
@pytest.mark.parametrize("winner_out", [True, False])
def test_d3po_ratio_outside_band_gets_no_gradient(ratio, winner_out):
    """A member whose ratio is already above 1+ε or below 1−ε is clamped: its gradient is exactly 0,
    the other member's still follows the closed form with the clamped bound in the logit."""
    beta, r_in, r_out = 0.5, 0.02, math.log(ratio)
    bound = math.log(1.1) if ratio > 1 else math.log(0.9)
    rw, rl = ([r_out], [r_in]) if winner_out else ([r_in], [r_out])
    loss, _, gw, gl = _d3po_grads(rw, rl, beta)
    z = beta * (bound - r_in) * (1 if winner_out else -1)
    g_out, g_in, sign_in = (gw, gl, 1) if winner_out else (gl, gw, -1)
    assert g_out.item() == 0.0
    assert g_in.item() == pytest.approx(sign_in * beta * (1 - _sig(z)), rel=1e-6)
    assert loss.item() == pytest.approx(-math.log(_sig(z)), rel=1e-6)


def test_d3po_tie_is_log2():
    """Equal log-ratios give logit 0: loss log 2; inside the band the gradient is ∓β/2, outside on the
    same side both are clamped to the same bound and neither member moves."""
    loss, _, gw, gl = _d3po_grads([0.03], [0.03], beta=0.4)
    assert loss.item() == pytest.approx(LOG2, rel=1e-12)
    assert gw.item() == pytest.approx(-0.2, rel=1e-12) and gl.item() == pytest.approx(0.2, rel=1e-12)
    for r in (0.5, -0.5):
        loss, _, gw, gl = _d3po_grads([r], [r], beta=0.4)
        assert loss.item() == pytest.approx(LOG2, rel=1e-12)
        assert gw.item() == 0.0 and gl.item() == 0.0
    # both outside but on opposite sides: clamped to different bounds, still no gradient
    loss, _, gw, gl = _d3po_grads([0.5], [-0.5], beta=0.4)
    assert loss.item() == pytest.approx(-math.log(_sig(0.4 * (math.log(1.1) - math.log(0.9)))), rel=1e-6)
    assert gw.item() == 0.0 and gl.item() == 0.0


def test_d3po_tiny_beta_vanishes():
    """β → 0 flattens the loss to log 2 and the gradient to 0, whatever the ratios."""
    loss, _, gw, gl = _d3po_grads([0.08, -0.05], [-0.09, 0.07], beta=1e-8, ref_w=(0.0, 1.0), ref_l=(0.0, 1.0))
    torch.testing.assert_close(loss, torch.full((2,), LOG2, dtype=torch.float64), rtol=0, atol=1e-8)
    assert gw.abs().max().item() < 1e-8 and gl.abs().max().item() < 1e-8


def test_d3po_reference_gets_no_gradient():
    """The reference is the frozen base model: no gradient may reach it."""
    ref_w, ref_l = _t(-1.0, 0.3, grad=True), _t(-2.0, 0.1, grad=True)
    lw, ll = _t(-0.98, 0.31, grad=True), _t(-2.01, 0.12, grad=True)
    loss, _ = d3po_loss(lw, ll, ref_w, ref_l, 0.3, 0.1)
    loss.sum().backward()
    assert ref_w.grad is None and ref_l.grad is None
    assert lw.grad.abs().min().item() > 0


def test_d3po_stats_on_hand_numbers():
    """accuracy = mean(clamped rw > clamped rl); clipfrac over all 2n ratios; logit = mean β(cw − cl)."""
    beta = 0.5
    rw = [0.05, -0.02, 0.3, 0.5]       # the third and fourth are clamped to log 1.1
    rl = [0.01, 0.04, -0.5, 0.5]       # the third and fourth are clamped
    _, stats, _, _ = _d3po_grads(rw, rl, beta, ref_w=(0.0,) * 4, ref_l=(0.0,) * 4)
    c = lambda r: min(max(r, math.log(0.9)), math.log(1.1))  # noqa: E731
    logits = [beta * (c(a) - c(b)) for a, b in zip(rw, rl)]
    assert stats["accuracy"].item() == pytest.approx(2 / 4)   # pair 4 is a tie: not counted as correct
    assert stats["clipfrac"].item() == pytest.approx(4 / 8)
    assert stats["logit"].item() == pytest.approx(sum(logits) / 4, rel=1e-6)
    assert all(not v.requires_grad for v in stats.values())


@pytest.mark.parametrize("kwargs, shorter", [(dict(beta=0.0), False), (dict(beta=-1.0), False),
                                             (dict(clip=0.0), False), (dict(clip=1.0), False),
                                             (dict(clip=1.5), False), ({}, True)])
def test_d3po_rejects_bad_arguments(kwargs, shorter):
    """β ≤ 0, ε outside (0, 1) or a reference of another shape is an error, not a silent broadcast."""
    x = _t(0.1, 0.2)
    with pytest.raises(ValueError):
        d3po_loss(x, x, x, _t(0.1) if shorter else x, **kwargs)


# -- DRO and its guard -----------------------------------------------------------------------------
def test_dro_loss_value_gradient_and_stats():
    """L = Mw − Ml: gradient +1 on the winner, −1 on the loser."""
    ew, el = _t(0.3, 0.7, grad=True), _t(0.5, 0.2, grad=True)
    loss, stats = dro_loss(ew, el)
    torch.testing.assert_close(loss.detach(), _t(-0.2, 0.5), rtol=0, atol=1e-15)
    loss.sum().backward()
    torch.testing.assert_close(ew.grad, _t(1.0, 1.0))
    torch.testing.assert_close(el.grad, _t(-1.0, -1.0))
    assert (stats["error_winner"].item(), stats["error_loser"].item()) == pytest.approx((0.5, 0.35))
    with pytest.raises(ValueError):
        dro_loss(_t(0.1, 0.2), _t(0.1))


def test_guard_losers_stops_only_past_margin():
    """A loser 20% worse than the reference is stopped at margin 0.1; one 5% worse still trains."""
    ref = _t(0.5, 0.4)
    el = (ref * _t(1.2, 1.05)).detach().requires_grad_()
    guarded, stop = guard_losers(el, ref, 0.1)
    assert stop.tolist() == [True, False]
    torch.testing.assert_close(guarded.detach(), el.detach())   # the value is unchanged
    guarded.sum().backward()
    assert el.grad.tolist() == [0.0, 1.0]
    # margin 0: the guard is off
    el.grad = None
    guarded, stop = guard_losers(el, ref, 0.0)
    assert not stop.any()
    guarded.sum().backward()
    assert el.grad.tolist() == [1.0, 1.0]


def test_dro_unpaired_loss():
    """L = s·M with gradient s; the stats average the positives and the negatives separately."""
    e = _t(0.3, 0.6, 0.9, grad=True)
    s = _t(1.0, -1.0, 1.0)
    loss, stats = dro_unpaired_loss(e, s)
    torch.testing.assert_close(loss.detach(), _t(0.3, -0.6, 0.9))
    loss.sum().backward()
    torch.testing.assert_close(e.grad, s)
    assert stats["error_winner"].nanmean().item() == pytest.approx(0.6)   # the positives' 0.3 and 0.9
    assert stats["error_loser"].nanmean().item() == pytest.approx(0.6)
    assert stats["error_winner"].isnan().tolist() == [False, True, False] and stats["error_loser"].isnan().sum() == 2
    with pytest.raises(ValueError):
        dro_unpaired_loss(e, _t(1.0, -1.0))


# -- Diffusion-DPO ---------------------------------------------------------------------------------
def test_diffusion_dpo_closed_form():
    """x = −(β/2)((Mw−Ml) − (Rw−Rl)); L = −log σ(x); dL/dMw = (β/2)σ(−x), dL/dMl = −(β/2)σ(−x)."""
    mw, ml, rw, rl, beta = [0.3, 0.8], [0.5, 0.4], [0.4, 0.6], [0.45, 0.5], 3.0
    ew, el = _t(*mw, grad=True), _t(*ml, grad=True)
    loss, stats = diffusion_dpo_loss(ew, el, _t(*rw), _t(*rl), beta)
    loss.sum().backward()
    xs = [-(beta / 2) * ((mw[i] - ml[i]) - (rw[i] - rl[i])) for i in range(2)]
    for i, x in enumerate(xs):
        assert loss[i].item() == pytest.approx(-math.log(_sig(x)), rel=1e-9)
        assert ew.grad[i].item() == pytest.approx(beta / 2 * _sig(-x), rel=1e-9)
        assert el.grad[i].item() == pytest.approx(-beta / 2 * _sig(-x), rel=1e-9)
    assert xs[0] > 0 > xs[1]
    assert stats["accuracy"].item() == pytest.approx(0.5)
    assert stats["logit"].item() == pytest.approx(sum(xs) / 2, rel=1e-9)


def test_diffusion_dpo_limits_and_errors():
    """Policy = reference gives log 2; β → 0 gives no gradient; no gradient reaches the reference."""
    rw, rl = _t(0.4, 0.7, grad=True), _t(0.3, 0.9, grad=True)
    loss, _ = diffusion_dpo_loss(rw.detach(), rl.detach(), rw, rl, 50.0)
    torch.testing.assert_close(loss, torch.full((2,), LOG2, dtype=torch.float64))
    ew, el = _t(0.1, 0.9, grad=True), _t(0.8, 0.2, grad=True)
    loss, _ = diffusion_dpo_loss(ew, el, rw, rl, 1e-8)
    loss.sum().backward()
    assert ew.grad.abs().max().item() < 1e-8 and el.grad.abs().max().item() < 1e-8
    assert rw.grad is None and rl.grad is None
    for bad in [(ew, el, rw, rl, 0.0), (ew, el, rw, _t(0.1), 1.0)]:
        with pytest.raises(ValueError):
            diffusion_dpo_loss(*bad)


# -- registry --------------------------------------------------------------------------------------
def _selection():
    return Selection(indices=torch.tensor([1, 3, 4, 6]), advantages=torch.tensor([0.8, -0.7, 0.0, 1.2]),
                     positive=torch.tensor([True, False, False, True]), n_positive=2, n_negative=2,
                     pairs=torch.tensor([[1, 3], [6, 4]], dtype=torch.int64))


def test_pair_and_signed_items():
    """Pair objectives train on the (winner, loser) rows with value 1; dro_unpaired on each kept
    row with the advantage's sign."""
    sel, tcfg = _selection(), TrainConfig()
    for name in ("d3po", "dro", "diffusion_dpo"):
        items = get_objective(name).items(sel, tcfg)
        assert items.rows.tolist() == [[1, 3], [6, 4]] and items.values.tolist() == [1.0, 1.0]
    items = get_objective("dro_unpaired").items(sel, tcfg)
    assert items.rows.tolist() == [[1], [3], [4], [6]] and items.values.tolist() == [1.0, -1.0, 0.0, 1.0]


def test_registry_dro_guard_and_needs():
    """Column 0 is the winner, column 1 the loser; "guarded" is the fraction of stopped losers."""
    obj = get_objective("dro")
    error = _t(0.3, 0.5, 0.2, 0.6, 0.4, 0.42).reshape(3, 2).detach().requires_grad_()
    ref = _t(0.3, 0.4, 0.2, 0.5, 0.4, 0.4).reshape(3, 2)     # loser ratios 1.25, 1.2, 1.05
    tcfg = TrainConfig(loser_guard=0.1)
    assert obj.needs(tcfg) == {"error", "ref_error"}
    assert obj.needs(TrainConfig(loser_guard=0)) == {"error"}
    loss, stats = obj.loss({"error": error, "ref_error": ref}, torch.ones(3), tcfg)
    torch.testing.assert_close(loss.detach(), _t(-0.2, -0.4, -0.02))
    assert stats["guarded"].item() == pytest.approx(2 / 3)
    loss.sum().backward()
    assert error.grad.tolist() == [[1.0, 0.0], [1.0, 0.0], [1.0, -1.0]]
    # guard off: no ref_error term is read, every loser trains
    error.grad = None
    loss, stats = obj.loss({"error": error}, torch.ones(3), TrainConfig(loser_guard=0))
    loss.sum().backward()
    assert error.grad[:, 1].tolist() == [-1.0, -1.0, -1.0] and stats["guarded"].item() == 0.0


def test_registry_dro_unpaired_per_unit_stats():
    """Per-unit stats hold NaN for units of the other sign, so the metrics' NaN-mean is per side;
    only negatives can be guarded."""
    obj = get_objective("dro_unpaired")
    error = _t(0.3, 0.6, 0.9, 0.5).reshape(4, 1).detach().requires_grad_()
    ref = _t(0.1, 0.4, 0.5, 0.5).reshape(4, 1)   # units 0-2 exceed 1.1·ref; unit 0 is a positive
    values = torch.tensor([1.0, -1.0, -1.0, 0.0], dtype=torch.float64)
    loss, stats = obj.loss({"error": error, "ref_error": ref}, values, TrainConfig(loser_guard=0.1))
    torch.testing.assert_close(loss.detach(), _t(0.3, -0.6, -0.9, 0.0))
    loss.sum().backward()
    assert error.grad[:, 0].tolist() == [1.0, 0.0, 0.0, 0.0]   # negatives 1, 2 stopped; sign 0 gives 0
    nan = float("nan")
    torch.testing.assert_close(stats["error_winner"], _t(0.3, nan, nan, nan), equal_nan=True)
    torch.testing.assert_close(stats["error_loser"], _t(nan, 0.6, 0.9, nan), equal_nan=True)
    torch.testing.assert_close(stats["guarded"].double(), _t(nan, 1.0, 1.0, nan), equal_nan=True)


def test_registry_d3po_and_dpo_columns():
    """The registry passes column 0 as winner and the config's β, ε to the loss."""
    lp = _t(0.05, -0.03, 0.0, 0.02).reshape(2, 2)
    ref = torch.zeros(2, 2, dtype=torch.float64)
    loss, _ = get_objective("d3po").loss({"log_prob": lp, "ref_log_prob": ref}, torch.ones(2),
                                         TrainConfig(d3po_beta=0.7))
    expected = [-math.log(_sig(0.7 * (0.05 + 0.03))), -math.log(_sig(0.7 * (0.0 - 0.02)))]
    torch.testing.assert_close(loss, _t(*expected))
    e, r = _t(0.3, 0.5, 0.8, 0.4).reshape(2, 2), _t(0.4, 0.45, 0.6, 0.5).reshape(2, 2)
    loss, _ = get_objective("diffusion_dpo").loss({"error": e, "ref_error": r}, torch.ones(2),
                                                  TrainConfig(dpo_beta=3.0))
    xs = [-1.5 * ((0.3 - 0.5) - (0.4 - 0.45)), -1.5 * ((0.8 - 0.4) - (0.6 - 0.5))]
    torch.testing.assert_close(loss, _t(*[-math.log(_sig(x)) for x in xs]))
    assert get_objective("d3po").needs(TrainConfig()) == {"log_prob", "ref_log_prob"}
    assert get_objective("diffusion_dpo").needs(TrainConfig()) == {"error", "ref_error"}
