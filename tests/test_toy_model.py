"""The shipped toy model: loads through the normal policy path, matches its model card (a
regression check against the card's own measurement), and a short B²-DiffuRL run on it trains
and evaluates end to end."""
import json

import pytest
import torch
from safetensors.torch import load_file

from b2fast.config import ModelConfig, SamplingConfig, apply_overrides, load_yaml
from b2fast.eval.evaluator import evaluate_sets
from b2fast.core.policy import Policy, resolve_model_path
from b2fast.rewards import build_reward
from b2fast.toy.model import pretrained_path
from b2fast.config import presets_dir
from b2fast.run.trainer import Trainer


@pytest.fixture(scope="module")
def card():
    return json.loads((pretrained_path() / "alignment.json").read_text())


def test_shipped_model_loads_in_pixel_space():
    policy = Policy(ModelConfig(path="b2fast:toy", dtype="float32"), torch.device("cpu"), 20, 1.0)
    assert policy.vae is None and policy.latent_shape == (3, 32, 32)
    assert resolve_model_path("b2fast:toy") == str(pretrained_path())


def test_base_alignment_matches_the_model_card(card):
    """Recompute the card's attribute rows (same prompts, images and seed) and compare."""
    policy = Policy(ModelConfig(path="b2fast:toy", dtype="float32"), torch.device("cpu"), 20, 1.0)
    reward = build_reward("toy_align", {}, "cpu")
    rows = evaluate_sets(policy, ["toy_attribute"], ["train", "test"], reward, SamplingConfig(),
                         n_per_prompt=4, prompts_per_set=12, seed=0)
    expected = {(r["prompt_set"], r["split"]): r for r in card["alignment"]}
    for row in rows:
        ref = expected[(row.prompt_set, row.split)]
        assert row.n_images == ref["n_images"]
        # same seeds; only float rounding across CPUs may flip an image
        assert abs(row.success - ref["success"]) <= 2 / row.n_images + 1e-9
        assert abs(row.score - ref["score"]) <= 2 / row.n_images + 1e-9


def test_short_toy_ddim_run_trains_and_evaluates_before_and_after(tmp_path, capsys):
    """A smoke test of the toy DDIM run end to end (whether it learns is measured over seeds,
    README, "The 20-step DDIM toy run": at this budget it does not; the learning test is
    tests/test_toy_lcm_model.py): the LoRA is trained, the same images are evaluated before and
    after, and the tables come in that order."""
    cfg = load_yaml(presets_dir() / "toy_ddim.yaml")
    apply_overrides(cfg, ["--out", str(tmp_path), "--device", "cpu", "--prompts.source", "toy_attribute",
                          "--schedule.num_stages", "4", "--sampling.batches_per_stage", "2",
                          "--eval.prompt_sets", "[toy_attribute]", "--eval.splits", "[train]",
                          "--eval.prompts_per_set", "0", "--eval.images_per_prompt", "4",
                          "--log.progress", "false", "--log.grid_every", "0"])
    Trainer(cfg).run()
    printed = capsys.readouterr().out
    assert printed.index("alignment before training:") < printed.index("alignment before and after training")
    result = json.loads((tmp_path / "eval.json").read_text())
    before, after = result["before"][0], result["after"][0]
    same = ("prompt_set", "split", "n_prompts", "n_images")
    assert [before[k] for k in same] == [after[k] for k in same] and before["prompt_set"] == "toy_attribute"
    lora = load_file(tmp_path / "lora" / "pytorch_lora_weights.safetensors")
    assert any(float(v.abs().max()) > 0 for k, v in lora.items() if "lora.up" in k)  # up (B) starts at 0: trained
