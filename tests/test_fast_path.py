"""The speed options change kernels, never results: fast path vs reference path on a tiny model."""
import dataclasses

import pytest
import torch

from b2fast.config import ModelConfig, SamplingConfig
from b2fast.core.policy import ModelLoadError, Policy
from b2fast.rewards import score_images
from b2fast.core.sampling import sample_branches
from b2fast.run.scoring import StageScorer


def _policy(path, **options):
    torch.manual_seed(0)  # same LoRA init for every variant
    policy = Policy(ModelConfig(path=path, dtype="float32", **options), torch.device("cpu"), num_steps=6, eta=1.0)
    with torch.no_grad():  # non-zero LoRA B, so the adapter takes part in every comparison
        for name, p in policy.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(len(name)))
    return policy


def _inputs(policy):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, *policy.latent_shape, generator=gen)
    return x, torch.tensor([0, 2, 5]), policy.embed(["a red cube", "a blue ball", ""])


def _sample(policy):
    cfg = SamplingConfig(num_steps=6, branches=3, prompts_per_batch=2)
    return sample_branches(policy, ["a red cube", "a blue ball"], torch.arange(2), 3, cfg,
                           torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def reference(tiny_sd_path):
    return _policy(tiny_sd_path, attention="sdpa")


def test_channels_last_gives_the_same_trajectories_and_log_probs(tiny_sd_path, reference):
    fast = _policy(tiny_sd_path, channels_last=True)
    assert fast.memory_format is torch.channels_last
    a, b = _sample(reference), _sample(fast)  # other conv kernels: equal up to fp32 rounding over 6 steps
    torch.testing.assert_close(b.latents, a.latents, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(b.log_probs, a.log_probs, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(b.images, a.images, rtol=1e-3, atol=1e-4)


def test_attention_choice_and_a_clear_error_for_unusable_xformers(tiny_sd_path, reference):
    assert reference.attention == "sdpa"
    assert _policy(tiny_sd_path).attention == "sdpa"  # auto on a CPU
    with pytest.raises(ModelLoadError, match=r"^model.attention: xformers is not usable here \(.*\); use 'sdpa'"):
        _policy(tiny_sd_path, attention="xformers")


def test_gradient_checkpointing_recomputes_blocks_and_gives_the_same_gradients(tiny_sd_path):
    """With checkpointing on, the backward runs the checkpointed units of the UNet's down, mid and
    up blocks (resnets, transformer blocks) forward a second time; off, it runs none of them; the
    gradients are the same either way. Counted by forward pre-hooks: recomputation stops once the
    saved activations are rebuilt, before a forward hook would fire."""
    grads, recomputed = [], []
    for checkpointing in (False, True):
        policy = _policy(tiny_sd_path)
        if checkpointing:
            policy.enable_gradient_checkpointing()
        units = {name: m for name, m in policy.unet.named_modules()
                 if name.split(".")[0] in ("down_blocks", "mid_block", "up_blocks")
                 and type(m).__name__ in ("ResnetBlock2D", "BasicTransformerBlock")}
        calls = {"forward": [], "backward": []}
        phase = "forward"
        for name, module in units.items():
            module.register_forward_pre_hook(lambda m, args, name=name, calls=calls: calls[phase].append(name))
        x, step, cond = _inputs(policy)
        eps_u, eps_c = policy.predict_eps(x, step, cond, 5.0)
        phase = "backward"
        (eps_c - eps_u).square().sum().backward()
        assert sorted(calls["forward"]) == sorted(units)  # each unit once in the forward
        recomputed.append(calls["backward"])
        grads.append([p.grad.clone() for p in policy.lora_parameters()])
    assert recomputed[0] == [] and recomputed[1], recomputed  # off: nothing; on: recomputation
    assert len(recomputed[1]) == len(set(recomputed[1]))  # at most once each
    for block in ("down_blocks", "mid_block", "up_blocks"):
        assert any(name.startswith(block) for name in recomputed[1]), (block, recomputed[1])
    # everything in the up blocks lies downstream of LoRA weights, so all of it is recomputed
    assert {n for n in units if n.startswith("up_blocks")} <= set(recomputed[1])
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_compiled_unet_matches_eager_and_reuses_its_disk_cache(tiny_sd_path, reference, tmp_path, monkeypatch):
    """torch.compile (inductor, CPU here) gives eager's ε and images; the compiled graphs are cached on disk,
    so compiling again (as a new run would) is a cache hit, not a second compilation."""
    from torch._dynamo.utils import counters

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "elsewhere"))
    cache = tmp_path / "cache"
    compiled = _policy(tiny_sd_path, attention="sdpa", compile=True, compile_cache_dir=str(cache))
    x, step, cond = _inputs(reference)
    with torch.no_grad():
        expected = reference.predict_eps(x, step, cond, 5.0)
        got = compiled.predict_eps(x, step, cond, 5.0)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(compiled.decode(x), reference.decode(x), rtol=1e-4, atol=1e-5)
        assert any(cache.rglob("*")), "nothing written to model.compile_cache_dir"
        torch._dynamo.reset()  # forget the in-memory compilation, as a new process would
        counters.clear()
        again = _policy(tiny_sd_path, attention="sdpa", compile=True, compile_cache_dir=str(cache))
        torch.testing.assert_close(again.predict_eps(x, step, cond, 5.0), expected, rtol=1e-4, atol=1e-5)
    assert counters["inductor"]["fxgraph_cache_hit"] >= 1 and counters["inductor"]["fxgraph_cache_miss"] == 0
    torch._dynamo.reset()


class _CountingReward:
    """Mean brightness; records the thread of each call."""
    last_captions = None

    def __init__(self):
        self.threads = set()

    def __call__(self, images, prompts):
        import threading
        self.threads.add(threading.current_thread().name)
        self.last_captions = [f"{p}!" for p in prompts]
        return images.mean(dim=(1, 2, 3))


@pytest.mark.parametrize("overlap", [False, True])
def test_stage_scorer_decodes_and_scores_every_batch_in_order(reference, overlap):
    reward = _CountingReward()
    scorer = StageScorer(reference, reward, overlap=overlap)
    batches = []
    for seed in (3, 4):
        cfg = SamplingConfig(num_steps=6, branches=3, prompts_per_batch=2)
        batches.append(sample_branches(reference, [f"p{seed}", "q"], torch.arange(2), 3, cfg,
                                       torch.Generator().manual_seed(seed)))
        scorer.submit(dataclasses.replace(batches[-1], images=None))
    images, rewards, captions = scorer.finish()
    expected = torch.cat([b.images for b in batches])
    torch.testing.assert_close(images, expected, rtol=0, atol=0)
    torch.testing.assert_close(rewards, score_images(_CountingReward(), expected, ["x"] * 12), rtol=0, atol=0)
    assert captions == [f"{p}!" for b in batches for p in b.prompts]
    assert any(t.startswith("b2fast-score") for t in reward.threads) == overlap


def test_a_failing_reward_in_the_worker_raises_in_the_caller(reference):
    def broken(images, prompts):
        raise RuntimeError("reward model exploded")

    scorer = StageScorer(reference, broken, overlap=True)
    scorer.submit(_sample(reference))
    failed = r"reward '.*broken' failed on \d+ images: RuntimeError: reward model exploded"
    with pytest.raises(ValueError, match=failed):
        scorer.finish()


def test_cuda_graphs_are_ignored_on_a_cpu(reference):
    cfg = SamplingConfig(num_steps=6, branches=3, prompts_per_batch=2, cuda_graphs=True)
    graphed = sample_branches(reference, ["a red cube", "a blue ball"], torch.arange(2), 3, cfg,
                              torch.Generator().manual_seed(3))
    torch.testing.assert_close(graphed.latents, _sample(reference).latents, rtol=0, atol=0)
    assert not reference._captured


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_cuda_graph_replay_equals_eager_and_sees_in_place_lora_updates(tiny_sd_path):
    torch.manual_seed(0)
    policy = Policy(ModelConfig(path=tiny_sd_path, dtype="float32"), torch.device("cuda"), num_steps=6, eta=1.0)
    lora_b = [p for n, p in policy.unet.named_parameters() if "lora_B" in n]
    with torch.no_grad():
        for p in lora_b:
            p.normal_(0, 0.02)
    eager_cfg = SamplingConfig(num_steps=6, branches=3, prompts_per_batch=2)
    graphed_cfg = dataclasses.replace(eager_cfg, cuda_graphs=True)

    def sample(cfg):
        return sample_branches(policy, ["a red cube", "a blue ball"], torch.arange(2), 3, cfg,
                               torch.Generator("cuda").manual_seed(3))

    for round_ in range(2):  # the second round after an in-place LoRA update, without recapturing
        eager, graphed = sample(eager_cfg), sample(graphed_cfg)
        for field in ("fork_latents", "latents", "log_probs", "images"):
            torch.testing.assert_close(getattr(graphed, field), getattr(eager, field), rtol=1e-6, atol=1e-6)
        (captured,) = policy._captured.values()
        assert len(captured.graphs) == 2  # trunk (P) and branches (P·K): one graph per batch shape
        if round_ == 0:
            before = eager.latents
            with torch.no_grad():
                for p in lora_b:
                    p.mul_(3)  # as optimizer.step() does: same storage, new values
    assert not torch.allclose(eager.latents, before)  # the update changed the samples


def test_micro_batch_from_free_memory():
    from b2fast.core.update import MAX_MICRO_BATCH, micro_batch_for_memory

    gib = 2 ** 30
    assert micro_batch_for_memory(10 * gib, 1 * gib) == 8            # 80% of 10 GiB at 1 GiB per pair
    assert micro_batch_for_memory(10 * gib, 1) == MAX_MICRO_BATCH    # capped
    assert micro_batch_for_memory(1 * gib, 4 * gib) == 1             # never below one pair


def test_automatic_micro_batch_is_resolved_once_per_run(tiny_sd_path, tmp_path):
    from b2fast.config import Config, ConfigError, apply_overrides, validate
    from b2fast.run.trainer import Trainer
    from b2fast.core.update import AUTO_MICRO_BATCH_CPU

    cfg = apply_overrides(Config(), ["--model.path", tiny_sd_path, "--reward.name", "jpeg_compressibility",
                                     "--device", "cpu", "--train.micro_batch", "0", "--out", str(tmp_path)])
    trainer = Trainer(cfg)
    assert trainer._train_config(None).micro_batch == AUTO_MICRO_BATCH_CPU
    assert trainer.cfg.train.micro_batch == 0  # the config (and so config.yaml) keeps "automatic"
    cfg.train.micro_batch = -1
    with pytest.raises(ConfigError, match="train.micro_batch: got -1"):
        validate(cfg)


def test_lora_updates_keep_parameter_storage(tiny_sd_path):
    """What keeps captured CUDA graphs valid across stages: the optimizer step and a LoRA load
    write into the parameters' existing storage, never new tensors."""
    from b2fast.config import TrainConfig
    from b2fast.core.update import make_optimizer

    policy = _policy(tiny_sd_path)
    params = policy.lora_parameters()
    pointers = [p.data_ptr() for p in params]
    before = [p.detach().clone() for p in params]
    optimizer = make_optimizer(params, TrainConfig(lr=1e-2))
    x, step, cond = _inputs(policy)
    eps_u, eps_c = policy.predict_eps(x, step, cond, 5.0)
    (eps_c - eps_u).square().sum().backward()
    optimizer.step()
    assert any(not torch.equal(p, b) for p, b in zip(params, before))
    policy.load_lora_state_dict({k: v * 0.5 for k, v in policy.lora_state_dict().items()})
    assert [p.data_ptr() for p in policy.lora_parameters()] == pointers
