"""Branch sampler: trunk shared, branches independent, one UNet call per step, on-policy ratio."""
import pytest
import torch

from b2fast import ops
from b2fast.config import SamplingConfig
from b2fast.core.sampling import TrajectoryBatch, sample_branches


def _sample(policy, prompts=("a cat", "a dog"), interval=4, branches=3, seed=0, **kw):
    cfg = SamplingConfig(branches=branches, **kw)
    gen = torch.Generator().manual_seed(seed)
    return sample_branches(policy, list(prompts), torch.arange(len(prompts)), interval, cfg, gen)


def test_shapes_and_only_interval_steps_are_stored(tiny_policy):
    batch = _sample(tiny_policy, interval=4, branches=3)
    C, H, W = tiny_policy.latent_shape
    S = tiny_policy.steps.num_steps
    assert batch.fork_latents.shape == (2, C, H, W)
    assert batch.latents.shape == (6, 4, C, H, W) and batch.log_probs.shape == (6, 4)
    assert batch.step_indices.tolist() == list(range(S - 4, S))
    assert batch.group_ids.tolist() == [0, 0, 0, 1, 1, 1]
    assert batch.prompts == ["a cat"] * 3 + ["a dog"] * 3
    assert batch.images.shape[:2] == (6, 3) and batch.images.dtype == torch.float32
    assert 0 <= batch.images.min() and batch.images.max() <= 1
    assert batch.log_probs.dtype == torch.float32 and torch.isfinite(batch.log_probs).all()


def test_trunk_is_shared_and_branches_diverge(tiny_policy):
    batch = _sample(tiny_policy, interval=3, branches=4)
    rows = torch.arange(8)
    before = batch.x_t(rows, torch.zeros(8, dtype=torch.long))
    assert torch.equal(before[0], before[3]) and torch.equal(before[4], before[7])  # same trunk
    assert not torch.equal(before[0], before[4])                                   # other prompt
    after = batch.latents[:, 0]
    assert not torch.equal(after[0], after[1])                                     # own noise


def test_one_unet_call_per_step_at_full_branch_batch(tiny_policy):
    sizes = []
    hook = tiny_policy.unet.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
    try:
        _sample(tiny_policy, prompts=("a", "b", "c"), interval=4, branches=5)
    finally:
        hook.remove()
    S = tiny_policy.steps.num_steps
    assert sizes == [2 * 3] * (S - 4) + [2 * 3 * 5] * 4  # CFG doubles the batch


def test_same_seed_same_trajectories(tiny_policy):
    a, b = _sample(tiny_policy, seed=7), _sample(tiny_policy, seed=7)
    assert torch.equal(a.latents, b.latents) and torch.equal(a.log_probs, b.log_probs)


def _recomputed_log_probs(policy, batch, cfg, grad=False):
    """Re-evaluate log p of every stored step with the same weights, in mixed-step micro-batches
    (``grad``: as training does, with autograd on)."""
    n, L = batch.log_probs.shape
    rows = torch.arange(n).repeat_interleave(L)
    j = torch.arange(L).repeat(n)
    perm = torch.randperm(rows.numel(), generator=torch.Generator().manual_seed(0))
    rows, j = rows[perm], j[perm]
    out = torch.empty(n, L)
    with torch.set_grad_enabled(grad):
        for s in range(0, rows.numel(), 5):
            r, jj = rows[s:s + 5], j[s:s + 5]
            step = batch.step_indices[jj]
            cond = policy.embed([batch.prompts[i] for i in r.tolist()])
            eps_u, eps_c = policy.predict_eps(batch.x_t(r, jj), step, cond, cfg.guidance_scale)
            out[r, jj] = ops.ddim_logprob(eps_u, eps_c, cfg.guidance_scale, batch.x_t(r, jj),
                                          batch.x_prev(r, jj), policy.steps.table, step).detach()
    return out


@pytest.mark.parametrize("cache_dtype", ["float32", "float16"])
def test_on_policy_ratio_is_one(tiny_policy, cache_dtype):
    cfg = SamplingConfig(branches=3, cache_dtype=cache_dtype)
    batch = sample_branches(tiny_policy, ["a cat", "a dog"], torch.arange(2), 5, cfg,
                            torch.Generator().manual_seed(1))
    assert batch.latents.dtype == getattr(torch, cache_dtype)
    ratio = torch.exp(_recomputed_log_probs(tiny_policy, batch, cfg) - batch.log_probs)
    assert (ratio - 1).abs().max().item() < 1e-5


def test_on_policy_ratio_is_one_on_the_fast_path(tiny_sd_path):
    """Channels-last sampling, then the training path's re-evaluation with autograd on and
    gradient checkpointing: still ratio = 1."""
    from b2fast.config import ModelConfig
    from b2fast.core.policy import Policy

    torch.manual_seed(0)
    policy = Policy(ModelConfig(path=tiny_sd_path, dtype="float32", channels_last=True), torch.device("cpu"),
                    num_steps=10, eta=1.0)
    policy.enable_gradient_checkpointing()
    cfg = SamplingConfig(branches=3, cache_dtype="float16")
    batch = sample_branches(policy, ["a cat", "a dog"], torch.arange(2), 5, cfg, torch.Generator().manual_seed(1))
    ratio = torch.exp(_recomputed_log_probs(policy, batch, cfg, grad=True) - batch.log_probs)
    assert (ratio - 1).abs().max().item() < 1e-5


def test_cat_renumbers_groups(tiny_policy):
    a, b = _sample(tiny_policy, seed=1), _sample(tiny_policy, seed=2)
    both = TrajectoryBatch.cat([a, b])
    assert len(both) == len(a) + len(b)
    assert both.group_ids.tolist() == a.group_ids.tolist() + (b.group_ids + 2).tolist()
    rows = torch.tensor([len(a)])
    assert torch.equal(both.x_t(rows, torch.tensor([0]))[0], b.fork_latents[0])
