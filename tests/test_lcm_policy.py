"""``sampling.scheduler: lcm``: a latent consistency model as the policy. A tiny random LCM (the
tiny SD model with a guidance embedding and diffusers' LCMScheduler) checks that w enters as
the UNet's guidance embedding (no CFG batch), that plain models are refused, and that a B²
stage samples and trains on it with the on-policy ratio 1 and the deterministic last step
left out; ``rlcm`` (RLCM's code) trains a noisy last step and shows its mean."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import LCMScheduler
from diffusers.pipelines import LatentConsistencyModelPipeline

from b2fast.config import ModelConfig, apply_overrides, load_yaml
from b2fast.core.policy import ModelLoadError, Policy, guidance_embedding
from b2fast.core.sampling import sample_branches
from b2fast.core.update import _pair_log_probs, trained_positions
from b2fast.run.trainer import Trainer
from b2fast.testing.lcm import copy_as_lcm
from b2fast.testing.tiny_sd import SD_SCHEDULER
from b2fast.config import presets_dir

COND_DIM = 32


@pytest.mark.parametrize("dim", [32, 33])
def test_guidance_embedding_is_lcm_pipelines_w_embedding(dim):
    w = torch.tensor([0.0, 1.5, 7.0])
    ours = guidance_embedding(w, dim)
    theirs = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)
    torch.testing.assert_close(ours, theirs)


def _lcm_scheduler(folder: Path) -> None:
    shutil.rmtree(folder / "scheduler")
    LCMScheduler(**SD_SCHEDULER).save_pretrained(folder / "scheduler")


@pytest.fixture(scope="module")
def tiny_lcm(tiny_sd_path, tmp_path_factory) -> str:
    """The tiny SD model with a (random) guidance embedding and an LCMScheduler config."""
    folder = copy_as_lcm(tiny_sd_path, tmp_path_factory.mktemp("tiny-lcm") / "model", COND_DIM)
    assert json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == "LCMScheduler"
    return str(folder)


def _policy(path: str, num_steps: int = 4, scheduler: str = "lcm") -> Policy:
    torch.manual_seed(0)
    return Policy(ModelConfig(path=path, dtype="float32"), torch.device("cpu"), num_steps, 1.0, scheduler)


def test_an_lcm_policy_takes_lcm_timesteps_and_w_as_its_guidance_embedding(tiny_lcm):
    policy = _policy(tiny_lcm)
    reference = LCMScheduler(**SD_SCHEDULER)
    reference.set_timesteps(4)
    assert policy.steps.timesteps.tolist() == reference.timesteps.tolist()
    g = torch.Generator().manual_seed(1)
    x = torch.randn((3, *policy.latent_shape), generator=g)
    step = torch.tensor([0, 1, 2])
    cond = policy.embed(["a cat", "a dog", "a cat"])
    eps_u, eps = policy.predict_eps(x, step, cond, 3.0, use_cfg=True)
    assert eps_u is None                                    # one pass: no unconditional half
    w = guidance_embedding(torch.full((3,), 2.0), COND_DIM)
    direct = policy.unet(x, policy.steps.timesteps[step], encoder_hidden_states=cond, timestep_cond=w).sample
    torch.testing.assert_close(eps, direct)
    _, other = policy.predict_eps(x, step, cond, 1.5, use_cfg=True)
    assert (other - eps).abs().max() > 1e-4                  # the scale reaches the UNet


def test_plain_models_are_refused_and_an_lcm_lora_style_folder_is_accepted(tiny_sd_path, tmp_path):
    with pytest.raises(ModelLoadError, match="latent consistency model"):
        _policy(tiny_sd_path)
    folder = tmp_path / "sd-lcm-lora"                        # SD weights (fused LoRA) + LCMScheduler
    shutil.copytree(tiny_sd_path, folder)
    _lcm_scheduler(folder)
    policy = _policy(str(folder))
    assert policy.guidance_dim is None and policy.steps.table[-1, 4] == 0  # last step σ = 0
    assert json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == "LCMScheduler"


def test_b2_branches_on_an_lcm_are_on_policy_and_skip_the_deterministic_last_step(tiny_lcm):
    from b2fast.config import SamplingConfig, TrainConfig

    policy = _policy(tiny_lcm)
    cfg = SamplingConfig(num_steps=4, scheduler="lcm", branches=3, guidance_scale=4.0)
    batch = sample_branches(policy, ["a cat", "a dog"], torch.tensor([0, 1]), 3, cfg, torch.Generator().manual_seed(0))
    assert batch.latents.shape[:2] == (6, 3) and batch.images.shape[0] == 6
    assert torch.equal(batch.log_probs[:, -1], torch.zeros(6))   # the last step returns d: log p 0
    rows = torch.arange(6).repeat(2)
    j = torch.tensor([0] * 6 + [1] * 6)
    with torch.no_grad():
        again = _pair_log_probs(policy, batch, rows, j, TrainConfig(), cfg)
    torch.testing.assert_close(again, batch.log_probs[rows, j], rtol=0, atol=1e-5)   # ratio 1
    assert trained_positions(policy, batch, TrainConfig()).tolist() == [True, True, False]


@pytest.mark.parametrize("scheduler, trained", [("lcm", [2, 3]), ("rlcm", [3, 4])])
def test_a_training_stage_runs_on_an_lcm(tiny_lcm, tmp_path, scheduler, trained):
    cfg = load_yaml(presets_dir() / "tiny_sd_jpeg.yaml")
    apply_overrides(cfg, ["--out", str(tmp_path / "run"), "--device", "cpu", "--model.path", tiny_lcm,
                          "--sampling.scheduler", scheduler, "--sampling.num_steps", "4", "--schedule.min_interval", "3",
                          "--schedule.max_interval", "4", "--schedule.num_stages", "2",
                          "--sampling.batches_per_stage", "1", "--sampling.prompts_per_batch", "4",
                          "--eval.enabled", "false", "--log.progress", "false", "--log.grid_every", "0"])
    records = Trainer(cfg).run()
    assert [r["interval_len"] for r in records] == [3, 4]
    assert [r["trained_steps"] for r in records] == trained      # lcm: every step but the deterministic last
    assert all(r["n_images"] == 16 and r["loss"] is not None for r in records)


def test_rlcm_trains_its_noisy_last_step_and_decodes_that_steps_mean(tiny_lcm):
    """``sampling.scheduler: rlcm``: RLCM's timesteps and its noisy last action, scored (log p ≠ 0,
    ratio 1) and trained, while the image is the action's mean d, not the noisy latent."""
    from b2fast import ops
    from b2fast.config import SamplingConfig, TrainConfig
    from b2fast.ops.reference.ddim import SIGMA

    policy = _policy(tiny_lcm, scheduler="rlcm")
    assert policy.steps.timesteps.tolist() == [999, 759, 519, 279] and policy.steps.noisy_last
    cfg = SamplingConfig(num_steps=4, scheduler="rlcm", branches=2, guidance_scale=4.0)
    batch = sample_branches(policy, ["a cat", "a dog"], torch.tensor([0, 1]), 2, cfg, torch.Generator().manual_seed(0))
    assert bool((batch.log_probs[:, -1] != 0).all())
    rows, j = torch.arange(4).repeat(2), torch.tensor([0] * 4 + [1] * 4)
    with torch.no_grad():
        again = _pair_log_probs(policy, batch, rows, j, TrainConfig(), cfg)
    torch.testing.assert_close(again, batch.log_probs[rows, j], rtol=0, atol=1e-5)   # ratio 1
    assert trained_positions(policy, batch, TrainConfig()).tolist() == [True, True]
    # the image: the last step's mean d = μ/√(1−σ²), μ the step with zero noise from the same x_t
    last = torch.full((4,), 3)
    x_t = batch.x_t(torch.arange(4), torch.full((4,), 1))
    with torch.no_grad():
        eps_u, eps_c = policy.predict_eps(x_t, last, policy.embed(batch.prompts), 4.0, use_cfg=True)
        mean, _ = ops.ddim_step_with_logprob(eps_u, eps_c, 4.0, x_t, torch.zeros_like(x_t), policy.steps.table,
                                             last, torch.float32, None, "mean")
    sigma = float(policy.steps.table[-1, SIGMA])
    torch.testing.assert_close(batch.final_latents, mean / (1 - sigma ** 2) ** 0.5, rtol=1e-4, atol=1e-5)
    assert (batch.final_latents - batch.latents[:, -1]).abs().max() > 0.1             # not the noisy action
    torch.testing.assert_close(batch.images, policy.decode(batch.final_latents))


def test_step_table_image_latents_undo_the_noise_of_a_noisy_last_step():
    from b2fast.core.schedule import build_lcm_table

    steps = build_lcm_table(LCMScheduler(**SD_SCHEDULER), 4, rlcm_compat=True)
    sigma = float(steps.table[-1, 4])
    d, z = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    x = (1 - sigma ** 2) ** 0.5 * d + sigma * z
    torch.testing.assert_close(steps.image_latents(x, z), d, rtol=1e-5, atol=1e-5)
    plain = build_lcm_table(LCMScheduler(**SD_SCHEDULER), 4)
    assert plain.image_latents(x, z) is x                                                # diffusers: x is d


def test_rlcm_generate_matches_a_one_branch_full_interval_sample(tiny_lcm):
    """Plain sampling (evaluation) shows the same d as the sampler, from the same noise."""
    from b2fast.config import SamplingConfig
    from b2fast.core.sampling import generate

    policy = _policy(tiny_lcm, scheduler="rlcm")
    cfg = SamplingConfig(num_steps=4, scheduler="rlcm", branches=1, guidance_scale=4.0)
    images = generate(policy, ["a cat", "a dog"], cfg, torch.Generator().manual_seed(3))
    batch = sample_branches(policy, ["a cat", "a dog"], torch.tensor([0, 1]), 4, cfg, torch.Generator().manual_seed(3))
    torch.testing.assert_close(images, batch.images)


def test_rlcm_is_refused_for_fk_steering():
    from b2fast.config import Config, ConfigError, validate

    cfg = Config()
    apply_overrides(cfg, ["--sampling.scheduler", "rlcm", "--steer.kind", "fk"])
    with pytest.raises(ConfigError, match="sampling.scheduler"):
        validate(cfg, training=False)
