"""Policy loading through the public diffusers path, LoRA, embeddings, errors."""
import pytest
import torch

from b2fast.config import ModelConfig
from b2fast.core.policy import ModelLoadError, Policy, resolve_model_path


def test_lora_is_trainable_fp32_and_starts_as_the_base_model(tiny_policy):
    params = tiny_policy.lora_parameters()
    assert params and all(p.dtype == torch.float32 for p in params)
    n_lora_modules = sum(1 for n, _ in tiny_policy.unet.named_modules() if n.endswith("to_q"))
    assert len(params) == 2 * 4 * n_lora_modules  # A and B for to_q/k/v/out.0
    frozen = [p for n, p in tiny_policy.unet.named_parameters() if "lora" not in n]
    assert not any(p.requires_grad for p in frozen)
    x = torch.randn(2, *tiny_policy.latent_shape)
    cond = tiny_policy.embed(["a cat", "a dog"])
    step = torch.tensor([0, 3])
    _, with_lora = tiny_policy.predict_eps(x, step, cond, 5.0, use_cfg=False)
    tiny_policy.unet.disable_adapters()
    _, base = tiny_policy.predict_eps(x, step, cond, 5.0, use_cfg=False)
    tiny_policy.unet.enable_adapters()
    torch.testing.assert_close(with_lora, base)  # gaussian init: lora_B = 0


def test_embeddings_are_cached_and_match_fresh_encoding(tiny_policy):
    first = tiny_policy.embed(["a red fox", "", "a red fox"])
    assert first.shape[0] == 3 and torch.equal(first[0], first[2])
    assert set(tiny_policy._embeddings) == {"a red fox", ""}
    again = tiny_policy.embed(["a red fox"])
    torch.testing.assert_close(again[0], first[0])


def test_cfg_batch_equals_separate_calls(tiny_policy):
    x = torch.randn(3, *tiny_policy.latent_shape)
    cond = tiny_policy.embed(["a", "b", "c"])
    step = torch.tensor([1, 1, 4])
    eps_u, eps_c = tiny_policy.predict_eps(x, step, cond, 5.0)
    _, only_c = tiny_policy.predict_eps(x, step, cond, 5.0, use_cfg=False)
    _, only_u = tiny_policy.predict_eps(x, step, tiny_policy.embed([""] * 3), 5.0, use_cfg=False)
    torch.testing.assert_close(eps_c, only_c, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(eps_u, only_u, rtol=1e-5, atol=1e-5)
    chunked = tiny_policy.predict_eps(x, step, cond, 5.0, max_batch=2)
    torch.testing.assert_close(chunked[1], eps_c, rtol=1e-5, atol=1e-5)


def test_saved_lora_loads_in_a_diffusers_pipeline(tiny_policy, tiny_sd_path, tmp_path):
    from diffusers import StableDiffusionPipeline

    with torch.no_grad():
        for p in tiny_policy.lora_parameters():
            p.add_(torch.randn_like(p) * 0.1)
    tiny_policy.save_lora(tmp_path)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path, safety_checker=None)
    pipe.load_lora_weights(str(tmp_path))
    ours = {n.replace(".default", ""): p for n, p in tiny_policy.unet.named_parameters() if p.requires_grad}
    theirs = {n.replace(".default_0", ""): p for n, p in pipe.unet.named_parameters() if "lora" in n}
    assert set(ours) == set(theirs)
    for name, value in ours.items():
        torch.testing.assert_close(theirs[name].float(), value.detach())


def test_lora_state_round_trip(tiny_policy):
    state = tiny_policy.lora_state_dict()
    perturbed = {k: v + 1 for k, v in state.items()}
    before = [p.data_ptr() for p in tiny_policy.lora_parameters()]
    tiny_policy.load_lora_state_dict(perturbed)
    assert [p.data_ptr() for p in tiny_policy.lora_parameters()] == before  # in place
    for k, v in tiny_policy.lora_state_dict().items():
        torch.testing.assert_close(v, perturbed[k])


@pytest.mark.parametrize("path, message", [
    ("./does-not-exist", "no such folder"),
    ("a/b/c", "no such folder"),
    ("b2fast:toyy", "unknown built-in model 'b2fast:toyy' .*; the built-ins are b2fast:toy, b2fast:toy-lcm and "),
])
def test_missing_model_paths_give_one_line_errors(path, message):
    with pytest.raises(ModelLoadError, match=message) as info:
        resolve_model_path(path)
    assert "\n" not in str(info.value) and "model.path" in str(info.value)


def test_folder_without_sd_layout(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(ModelLoadError, match="missing subfolder"):
        resolve_model_path(str(tmp_path))


def test_corrupt_component_gives_one_line_error(tiny_sd_path, tmp_path):
    import shutil
    broken = tmp_path / "broken"
    shutil.copytree(tiny_sd_path, broken)
    (broken / "unet" / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="unet") as info:
        Policy(ModelConfig(path=str(broken), dtype="float32"), torch.device("cpu"), 10, 1.0)
    assert "\n" not in str(info.value)


def test_bad_lora_targets(tiny_sd_path):
    with pytest.raises(ModelLoadError, match="lora_targets"):
        Policy(ModelConfig(path=tiny_sd_path, dtype="float32", lora_targets=["nonexistent_proj"]),
               torch.device("cpu"), 10, 1.0)


def test_v_prediction_model_steps_like_diffusers(tiny_sd_path, tmp_path):
    """SD 2.x 768-v style: the UNet predicts v; one DDIM step from our ε equals diffusers' step."""
    import json
    import shutil

    from diffusers import DDIMScheduler

    from b2fast.ops.reference.ddim import ddim_mean

    folder = tmp_path / "v-model"
    shutil.copytree(tiny_sd_path, folder)
    config_file = folder / "scheduler" / "scheduler_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "prediction_type": "v_prediction"}))
    policy = Policy(ModelConfig(path=str(folder), dtype="float32"), torch.device("cpu"), num_steps=10, eta=0.0)
    assert policy.v_prediction
    x = torch.randn(3, *policy.latent_shape, dtype=torch.float64).float()
    cond = policy.embed(["a cat", "a dog", "a fox"])
    step = torch.tensor([0, 4, 9])
    _, eps = policy.predict_eps(x, step, cond, 5.0, use_cfg=False)
    mean = ddim_mean(eps, x, policy.steps.table, step, policy.steps.clip_sample_range)

    scheduler = DDIMScheduler.from_pretrained(folder, subfolder="scheduler")
    scheduler.set_timesteps(10)
    for row, i in enumerate(step.tolist()):
        t = policy.steps.timesteps[i]
        v = policy.unet(x[row:row + 1], t, encoder_hidden_states=cond[row:row + 1]).sample
        expected = scheduler.step(v, t, x[row:row + 1], eta=0.0).prev_sample
        torch.testing.assert_close(mean[row:row + 1], expected, rtol=1e-5, atol=1e-5)
    # CFG halves convert alike: ε_u and ε_c each from their own v
    eps_u, eps_c = policy.predict_eps(x, step, cond, 5.0)
    torch.testing.assert_close(eps_c, eps, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(eps_u, eps_c)


@pytest.mark.parametrize("dtype, visible", [(None, True), ("bfloat16", False)])
def test_a_small_lora_update_reaches_the_forward_output(tiny_sd_path, dtype, visible):
    """peft adds the fp32 LoRA delta to the base layer's output and casts the sum back to the base
    dtype. A delta of 1e-3 of a projection's output survives that cast in the default base dtype
    (float16: half an ulp is at most 0.05%), so the UNet's output moves; in bfloat16 (half an ulp is
    0.2-0.4%) it is rounded away and the output is bit-for-bit the base model's. That is why
    float16 is the default (docs/algorithm.md, "Base-weight precision")."""
    from b2fast.config import ModelConfig

    dtype = dtype or ModelConfig().dtype
    policy = Policy(ModelConfig(path=tiny_sd_path, dtype=dtype), torch.device("cpu"), num_steps=10, eta=1.0)
    lora_layers = [m for m in policy.unet.modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
    for layer in lora_layers:
        torch.nn.init.zeros_(layer.lora_B["default"].weight)
    layer = next(m for m in lora_layers if m.base_layer.bias is None)
    weight, r = layer.base_layer.weight, layer.lora_A["default"].weight.shape[0]
    with torch.no_grad():  # delta = 1e-3 · (x Wᵀ) on the first r output channels, exactly
        layer.lora_A["default"].weight.copy_(weight[:r].float())
        layer.lora_B["default"].weight[:r].copy_(torch.eye(r) * 1e-3 / layer.scaling["default"])

    x = torch.randn(5, layer.base_layer.in_features, generator=torch.Generator().manual_seed(0)).to(weight.dtype)
    base_out = layer.base_layer(x)
    moved = layer(x)[:, :r] != base_out[:, :r]
    assert bool(moved.all()) if visible else not bool(moved.any())

    latents = torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(1))
    cond, step = policy.embed(["a red cube", "a blue ball"]), torch.tensor([3, 7])
    with torch.no_grad():
        _, tuned = policy.predict_eps(latents, step, cond, 5.0, use_cfg=False)
        with policy.base_weights():
            _, base = policy.predict_eps(latents, step, cond, 5.0, use_cfg=False)
    assert torch.equal(tuned, base) is not visible
