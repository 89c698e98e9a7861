"""Interval schedules and the DDIM step table against diffusers."""
import math
from collections import Counter

import pytest
import torch

from b2fast.core.schedule import build_step_table, constant_max, linear_plateaus, resolve_schedule, stage_lr
from b2fast.testing.tiny_sd import SD_SCHEDULER


def test_reference_schedule_equal_plateaus():
    lengths = [linear_plateaus(s, 100, 14, 20) for s in range(100)]
    assert lengths[0] == 14 and lengths[-1] == 20
    assert lengths == sorted(lengths)
    counts = Counter(lengths)
    assert sorted(counts) == list(range(14, 21))
    assert max(counts.values()) - min(counts.values()) <= 1  # 100 stages over 7 values: 14 or 15 each


def test_schedule_edge_cases():
    assert [linear_plateaus(s, 1, 5, 9) for s in range(1)] == [5]
    assert [linear_plateaus(s, 4, 3, 3) for s in range(4)] == [3, 3, 3, 3]
    assert constant_max(0, 10, 2, 7) == 7


def test_resolve_schedule_names_and_user_functions():
    assert resolve_schedule("linear") is linear_plateaus
    assert resolve_schedule("b2fast.core.schedule:constant_max") is constant_max
    with pytest.raises(ValueError, match="schedule.kind"):
        resolve_schedule("cosine")
    with pytest.raises(ValueError, match="schedule.kind"):
        resolve_schedule("no_such_module_xyz:fn")


def test_stage_lr_constant_and_cosine():
    assert [stage_lr(3e-3, "constant", s, 10) for s in range(10)] == [3e-3] * 10
    cosine = [stage_lr(2e-3, "cosine", s, 40) for s in range(40)]
    assert cosine[0] == 2e-3 and cosine[20] == pytest.approx(1e-3)
    assert all(a > b > 0 for a, b in zip(cosine, cosine[1:]))  # strictly falling, never zero
    assert cosine[-1] == pytest.approx(2e-3 * (1 - math.cos(math.pi / 40)) / 2)
    assert stage_lr(1e-3, "cosine", 0, 1) == 1e-3
    with pytest.raises(ValueError, match="train.lr_schedule"):
        stage_lr(1e-3, "step", 0, 10)


@pytest.mark.parametrize("kind", ["constant", "cosine"])
def test_stage_lr_warmup_rises_linearly_then_follows_the_schedule(kind):
    plain = [stage_lr(1e-2, kind, s, 40) for s in range(40)]
    warm = [stage_lr(1e-2, kind, s, 40, warmup_stages=3) for s in range(40)]
    assert warm[:3] == pytest.approx([plain[s] * (s + 1) / 4 for s in range(3)])
    assert warm[3:] == plain[3:]  # the schedule itself is not shifted
    assert all(a < b for a, b in zip(warm[:3], warm[1:4]))
    assert [stage_lr(1e-2, kind, s, 40, warmup_stages=0) for s in range(40)] == plain


@pytest.mark.parametrize("steps", [20, 50])
def test_step_table_matches_diffusers(steps):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(**SD_SCHEDULER)
    table = build_step_table(sched, steps, eta=1.0)
    stride = 1000 // steps
    assert table.timesteps[0].item() == 1000 - stride + 1 and table.timesteps[-1].item() == 1
    for i, t in enumerate(table.timesteps.tolist()):
        ref_var = sched._get_variance(t, t - stride)
        assert table.table[i, 4].item() == pytest.approx(ref_var.sqrt().item(), rel=2e-5)  # diffusers works in fp32


def test_step_table_rejects_sample_prediction():
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(**{**SD_SCHEDULER, "prediction_type": "sample"})
    with pytest.raises(ValueError, match="prediction_type"):
        build_step_table(sched, 10, 1.0)


def test_eta_zero_has_zero_sigma():
    from diffusers import DDIMScheduler

    table = build_step_table(DDIMScheduler(**SD_SCHEDULER), 10, eta=0.0).table
    assert torch.all(table[:, 4] == 0) and torch.all(table[:, 5] == 0)
