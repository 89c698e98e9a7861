"""The shipped toy LCM (``b2fast:toy-lcm``): it loads as an LCM policy, its 4-step alignment
matches its model card, and it is within 0.1 toy_align of its 20-step DDIM teacher."""
import json
from argparse import Namespace

import numpy as np
import pytest
import torch

from b2fast.config import ModelConfig
from b2fast.core.policy import Policy, resolve_model_path
from b2fast.toy.model import pretrained_path
from b2fast.toy.pretrain import measure_alignment

TEACHER, FOUR_STEPS = "teacher, DDIM 20 steps", "LCM, 4 steps"


@pytest.fixture(scope="module")
def card():
    return json.loads((pretrained_path("pretrained_lcm") / "alignment.json").read_text())


def _mean_score(rows: list[dict]) -> float:
    return float(np.mean([r["score"] for r in rows]))


def test_shipped_lcm_loads_as_an_lcm_policy_with_its_guidance_embedding():
    assert resolve_model_path("b2fast:toy-lcm") == str(pretrained_path("pretrained_lcm"))
    policy = Policy(ModelConfig(path="b2fast:toy-lcm", dtype="float32"), torch.device("cpu"), 4, 1.0, "lcm")
    assert policy.guidance_dim == 64 and policy.vae is None
    assert policy.steps.timesteps.tolist() == [999, 759, 499, 259]


def test_the_cards_teacher_rows_are_the_shipped_teachers_own_card(card):
    teacher = json.loads((pretrained_path() / "alignment.json").read_text())["alignment"]
    ours = card["alignment"][TEACHER]
    assert [(r["prompt_set"], r["split"], r["n_images"]) for r in ours] == [
        (r["prompt_set"], r["split"], r["n_images"]) for r in teacher]
    for row, ref in zip(ours, teacher):   # the same measurement; float rounding across CPUs may flip an image
        assert abs(row["score"] - ref["score"]) <= 2 / row["n_images"] + 1e-9, (row, ref)


def test_four_steps_match_the_card_and_score_within_0_1_of_the_teacher(card):
    args = Namespace(eval_images=4, eval_prompts=12, guidance_scale=5.0, seed=0)   # the card's settings
    rows = measure_alignment(pretrained_path("pretrained_lcm"), torch.device("cpu"), args, "lcm", 4)
    expected = {(r["prompt_set"], r["split"]): r for r in card["alignment"][FOUR_STEPS]}
    for row in rows:
        ref = expected[(row["prompt_set"], row["split"])]
        assert row["n_images"] == ref["n_images"]
        assert abs(row["score"] - ref["score"]) <= 2 / row["n_images"] + 1e-9   # float rounding may flip an image
    assert _mean_score(rows) >= _mean_score(card["alignment"][TEACHER]) - 0.1, (_mean_score(rows), card)


def _last_stage_rewards(tmp_path, *extra: str) -> float:
    """Mean stage reward of the last 3 of 10 stages of B² on the toy LCM at its measured lr."""
    from b2fast.config import apply_overrides, load_yaml
    from b2fast.run.trainer import Trainer
    from b2fast.train import preset_path

    cfg = load_yaml(preset_path("toy_ddim.yaml"))
    apply_overrides(cfg, ["--out", str(tmp_path), "--device", "cpu", "--model.path", "b2fast:toy-lcm",
                          "--sampling.scheduler", "lcm", "--sampling.num_steps", "4", "--schedule.min_interval", "2",
                          "--schedule.max_interval", "4", "--train.lr", "3e-3", "--eval.enabled", "false",
                          "--log.progress", "false", "--log.grid_every", "0", *extra])
    records = Trainer(cfg).run()
    return float(np.mean([r["reward_mean"] for r in records[-3:]]))


@pytest.fixture(scope="module")
def null_reward(tmp_path_factory):
    """B²-DiffuRL's null control (advantages shuffled) on the toy LCM, seed 0, at its lr."""
    return _last_stage_rewards(tmp_path_factory.mktemp("null"), "--selection.null_control", "shuffle")


def test_short_b2_run_on_the_lcm_keeps_training_reward_above_its_null_control(tmp_path, null_reward):
    """README, "Latent consistency models": over 5 seeds the last stages' reward of this run
    minus its null's (advantages shuffled) is +0.034 [+0.004, +0.064], every seed positive;
    this is seed 0 (+0.061 when measured)."""
    signal = _last_stage_rewards(tmp_path / "signal")
    assert signal > null_reward, (signal, null_reward)


# objective -> its lr, chosen on seed 0's training reward (README, "The paper's comparison")
OBJECTIVE_LRS = {"d3po": "1e-3", "dro": "1e-3", "dro_unpaired": "1e-3", "diffusion_dpo": "1e-2"}


@pytest.mark.parametrize("objective", list(OBJECTIVE_LRS))
def test_each_objective_keeps_training_reward_above_the_null_control(tmp_path, null_reward, objective):
    """README, "The paper's comparison on the toy world": over 5 seeds each objective's
    last-stage reward minus B²-DiffuRL's null is +0.024 to +0.041 (D3PO's and DRO's intervals
    exclude 0); this is seed 0, where they measured +0.031 (d3po), +0.034 (dro), +0.024
    (dro_unpaired) and +0.040 (diffusion_dpo)."""
    reward = _last_stage_rewards(tmp_path, "--train.objective", objective, "--train.lr", OBJECTIVE_LRS[objective])
    assert reward > null_reward, (objective, reward, null_reward)
