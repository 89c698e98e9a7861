"""pytest-benchmark entries for the hot paths of a stage, b2fast against the research scripts' way.

    pytest benchmarks/ --benchmark-only                   # tiny random model, any machine
    pytest benchmarks/ --benchmark-only --benchmark-group-by=group

Each group pairs the b2fast path with the baseline of ``python -m b2fast.bench`` (the same
functions: b2fast.bench.sample.baseline_sample, b2fast.bench.train.baseline_update) on the tiny
test model, in float32 on the CPU (or the GPU when one is visible): a branch-sampling batch,
VAE decoding of its images, and one optimizer step of the LoRA update. The tiny model makes
these regression timings of the Python and kernel-launch overhead, not of the UNet's matmuls;
full-size figures come from ``python -m b2fast.bench sample|train|stage``. Not part of the test
suite (``testpaths`` is ``tests``).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from b2fast.bench import sd as bench_sd
from b2fast.bench.cli import QUICK_CONFIG
from b2fast.bench.sample import baseline_sample
from b2fast.bench.train import baseline_update, synthetic_trajectories
from b2fast.config import Config, apply_overrides
from b2fast.core.sampling import sample_branches
from b2fast.core.update import make_optimizer, policy_update

INTERVAL = 4


@pytest.fixture(scope="module")
def cfg() -> Config:
    """The settings of ``python -m b2fast.bench ... --quick``."""
    return apply_overrides(Config(), QUICK_CONFIG)


@pytest.fixture(scope="module")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    from b2fast.testing.tiny_sd import save_tiny_sd

    return str(save_tiny_sd(tmp_path_factory.mktemp("tiny-sd")))


@pytest.fixture(scope="module")
def loaded(cfg, folder, device) -> dict:
    """Both policies, loaded as ``python -m b2fast.bench`` loads them, and the prompts."""
    return {"b2fast": bench_sd.load_policy(cfg, folder, device, baseline=False),
            "baseline": bench_sd.load_policy(cfg, folder, device, baseline=True),
            "prompts": bench_sd.prompts_of(cfg, cfg.sampling.prompts_per_batch)}


@pytest.mark.benchmark(group="sample")
@pytest.mark.parametrize("method", ["b2fast", "baseline"])
def test_sample_batch(benchmark, loaded, cfg, device, method):
    policy, prompts, s = loaded[method], loaded["prompts"], cfg.sampling
    gen = torch.Generator(device).manual_seed(0)
    if method == "b2fast":
        batch = benchmark(sample_branches, policy, prompts, torch.arange(len(prompts)), INTERVAL, s, gen)
        latents, log_probs, images = batch.latents, batch.log_probs, batch.images
    else:
        branches = benchmark(baseline_sample, policy, prompts, INTERVAL, s, gen)
        latents, log_probs, images = (torch.cat(part) for part in zip(*branches))
    # the same work on either path (their noise streams differ, so not the same numbers)
    n = len(prompts) * s.branches
    assert latents.shape == (n, INTERVAL, *policy.latent_shape) and log_probs.shape == (n, INTERVAL)
    assert images.shape[0] == n and torch.isfinite(log_probs).all() and torch.isfinite(images).all()


@pytest.mark.benchmark(group="decode")
@pytest.mark.parametrize("method", ["b2fast", "baseline"])
def test_decode(benchmark, loaded, cfg, device, method):
    policy, s = loaded[method], cfg.sampling
    latents = torch.randn((s.prompts_per_batch * s.branches, *policy.latent_shape), device=device)
    if method == "b2fast":
        images = benchmark(policy.decode, latents)
    else:
        images = torch.cat(benchmark(lambda: [policy.decode(c) for c in latents.split(s.prompts_per_batch)]))
    one_by_one = torch.cat([policy.decode(x[None]) for x in latents])  # the same images, whatever the batch
    torch.testing.assert_close(images, one_by_one, atol=1e-5, rtol=1e-5)


@pytest.mark.benchmark(group="train")
@pytest.mark.parametrize("method", ["b2fast", "baseline"])
def test_training_step(benchmark, loaded, cfg, device, method):
    policy = loaded[method]
    batch, selection = synthetic_trajectories(loaded["b2fast"], cfg, INTERVAL, 4,
                                              torch.Generator(device).manual_seed(0))
    optimizer = make_optimizer(policy.lora_parameters(), cfg.train)
    tcfg, gen = dataclasses.replace(cfg.train, epochs=1), torch.Generator().manual_seed(0)
    if method == "b2fast":
        benchmark(policy_update, policy, optimizer, batch, selection, tcfg, cfg.sampling, gen, bench_sd.SILENT)
    else:
        benchmark(baseline_update, policy, optimizer, batch, selection, tcfg, cfg.sampling, gen)
