"""``python -m b2fast.toy.distill_lcm``: the consistency boundary condition, the teacher's
trajectories against diffusers' DDIM, and a two-step distillation that writes a folder the LCM
policy loads and samples."""
from __future__ import annotations

import json

import pytest
import torch

from b2fast.config import ModelConfig, SamplingConfig
from b2fast.core.policy import Policy
from b2fast.core.sampling import generate
from b2fast.toy import distill_lcm


def test_boundary_scalings_make_f_the_identity_at_t_0_and_the_prediction_at_the_top():
    c_skip, c_out = distill_lcm.boundary_scalings(torch.tensor([0, 999]))
    assert c_skip[0].item() == 1.0 and c_out[0].item() == 0.0       # f(x, 0) = x
    assert c_skip[1].item() < 1e-7 and c_out[1].item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_solved_trajectories_are_the_teachers_ddim_steps_and_their_interpolations(tmp_path, prediction_type):
    import shutil
    from argparse import Namespace

    from diffusers import DDIMScheduler

    from b2fast.core.policy import resolve_model_path
    from b2fast.toy.pretrain import set_prediction_type

    teacher = tmp_path / "teacher"   # the same weights read as a v-prediction model: the same math must follow
    shutil.copytree(resolve_model_path("b2fast:toy"), teacher)
    set_prediction_type(teacher, prediction_type)
    args = Namespace(seed=0, lr=1e-4, ema=0.9, batch_size=2)
    distiller = distill_lcm.Distiller(teacher, args, torch.device("cpu"))
    prompts, w = ["a red circle", "a blue square left of a green triangle"], torch.tensor([2.0, 5.0])
    data = distiller.solve(prompts, w, torch.Generator().manual_seed(3))
    noise = torch.randn((2, 3, 32, 32), generator=torch.Generator().manual_seed(3))
    assert data.points.shape == (2, 50, 3, 32, 32) and torch.equal(data.points[:, 49], noise.half())
    assert data.ends.abs().max() <= 1 and torch.equal(data.w, w)
    ddim = DDIMScheduler.from_pretrained(teacher / "scheduler")
    ddim.set_timesteps(25)                                              # 999, 959, …: 40 apart
    cond = distiller._embed(prompts)
    x = noise                                                           # not its fp16 copy: x̂0 = (x − …)/5e-5
    for index in (49, 47, 45):                                          # the first three UNet steps
        t = int(distill_lcm.grid_timestep(torch.tensor(index)))
        with torch.no_grad():  # one batch of both halves, as pipelines run CFG (at t = 999 x̂0 amplifies ε̂ 20,000×)
            eps_u, eps_c = distiller.teacher(torch.cat([x, x]), t, encoder_hidden_states=torch.cat(
                [distiller.uncond.expand(2, -1, -1), cond])).sample.chunk(2)
        guided = eps_c + w.view(-1, 1, 1, 1) * (eps_c - eps_u)
        a_t, b_t = ddim.alphas_cumprod[t].sqrt(), (1 - ddim.alphas_cumprod[t]).sqrt()
        eps = a_t * guided + b_t * x if prediction_type == "v_prediction" else guided
        out = ddim.step(guided, t, x, eta=0.0)
        x = out.prev_sample
        torch.testing.assert_close(data.points[:, index - 2].float(), x, atol=2e-2, rtol=0)  # fp16 storage
        ab = ddim.alphas_cumprod[t - 20]                                 # the point between: same x̂0, ε̂
        between = ab.sqrt() * out.pred_original_sample + (1 - ab).sqrt() * eps
        torch.testing.assert_close(data.points[:, index - 1].float(), between, atol=2e-2, rtol=0)


def test_one_step_lowers_the_regression_loss_on_the_same_batch():
    from argparse import Namespace
    from pathlib import Path

    from b2fast.core.policy import resolve_model_path

    teacher = Path(resolve_model_path("b2fast:toy"))
    distiller = distill_lcm.Distiller(teacher, Namespace(seed=0, lr=1e-4, ema=0.0, batch_size=8), torch.device("cpu"))
    data = distiller.solve(["a red circle"] * 4, torch.full((4,), 4.0), torch.Generator().manual_seed(0))
    first = distiller.step(data, torch.Generator().manual_seed(1))
    again = distiller.step(data, torch.Generator().manual_seed(1))     # same pairs, after one update
    assert again < first
    for e, p in zip(distiller.ema.parameters(), distiller.student.parameters()):
        assert torch.equal(e, p)                                        # EMA 0: the EMA is the student


def test_a_short_distillation_writes_an_lcm_folder_the_policy_samples(tmp_path, capsys):
    out = tmp_path / "toy-lcm"
    code = distill_lcm.main(["--steps", "2", "--batch-size", "2", "--trajectories", "3", "--eval-images", "0",
                             "--out", str(out),
                             "--device", "cpu"])
    assert code == 0
    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "LCMScheduler" and scheduler["clip_sample"] is False
    unet = json.loads((out / "unet" / "config.json").read_text())
    assert unet["time_cond_proj_dim"] == distill_lcm.GUIDANCE_DIM
    stats = json.loads((out / "alignment.json").read_text())["distillation"]
    assert stats["steps"] == 2 and stats["trajectories"] == 3 and stats["final_loss"] > 0
    assert "python -m b2fast.toy.distill_lcm --steps 2" in (out / "README.md").read_text()
    policy = Policy(ModelConfig(path=str(out), dtype="float32"), torch.device("cpu"), 2, 1.0, "lcm")
    images = generate(policy, ["a red circle", "a blue square"], SamplingConfig(num_steps=2, scheduler="lcm"),
                      torch.Generator().manual_seed(0))
    assert images.shape == (2, 3, 32, 32) and bool(images.isfinite().all())
    assert not list(tmp_path.glob(".toy-lcm.*"))                     # no temporary folder left behind
    from argparse import Namespace
    from b2fast.toy.pretrain import measure_alignment
    rows = measure_alignment(out, torch.device("cpu"), Namespace(eval_images=1, eval_prompts=1, guidance_scale=5.0,
                                                                 seed=0), "lcm", 2)
    assert len(rows) == 6 and all(r["n_images"] == 1 and 0 <= r["score"] <= 1 for r in rows)


@pytest.mark.parametrize("argv, message", [(["--steps", "0"], "--steps"), (["--ema", "1"], "--ema"),
                                           (["--w-min", "5", "--w-max", "2"], "--w-min"),
                                           (["--trajectories", "0"], "--trajectories"),
                                           (["--eval-images", "-1"], "--eval-images"),
                                           (["--eval-prompts", "0"], "--eval-prompts"),
                                           (["--device", "gpu"], "--device"),
                                           (["--teacher", "/no/such/folder"], "model.path")])
def test_bad_arguments_fail_in_one_line(argv, message, tmp_path, capsys):
    assert distill_lcm.main([*argv, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "x").exists()


def test_pretraining_shares_the_folder_writer_and_refuses_bad_options(tmp_path, capsys):
    from b2fast.toy import pretrain

    out = tmp_path / "toy"
    assert pretrain.main(["--steps", "2", "--batch-size", "2", "--eval-images", "0", "--out", str(out),
                          "--device", "cpu"]) == 0
    assert (out / "unet" / "config.json").is_file() and (out / "README.md").is_file()
    assert json.loads((out / "alignment.json").read_text())["training"]["steps"] == 2
    capsys.readouterr()
    for bad, flag in ((["--cfg-dropout", "1"], "--cfg-dropout"), (["--eval-images", "-1"], "--eval-images"),
                      (["--device", "cuda:7" if torch.cuda.is_available() else "cuda"], "--device")):
        assert pretrain.main([*bad, "--out", str(tmp_path / "y")]) == 2  # before any training
        err = capsys.readouterr().err
        assert err.startswith(f"error: {flag}") and err.count("\n") == 1 and not (tmp_path / "y").exists()


def test_pretraining_continues_from_init_weights_and_weights_templates(tmp_path, capsys):
    import numpy as np
    import torch
    from safetensors.torch import load_file

    from b2fast.toy import pretrain
    from b2fast.toy.grammar import parse

    first, second = tmp_path / "first", tmp_path / "second"
    common = ["--batch-size", "2", "--eval-images", "0", "--device", "cpu"]
    assert pretrain.main(["--steps", "3", "--out", str(first), *common]) == 0
    # a step at a vanishing learning rate, EMA = live weights: the continued model is its init
    assert pretrain.main(["--steps", "1", "--lr", "1e-12", "--ema", "0", "--init", str(first), "--out", str(second),
                          "--template-weights", "0", "0", "1", *common]) == 0
    before, after = (load_file(f / "unet" / "diffusion_pytorch_model.safetensors") for f in (first, second))
    assert before.keys() == after.keys()
    assert all(torch.allclose(before[k], after[k], atol=1e-6) for k in before)
    assert f"initial weights | {first}" in (second / "README.md").read_text()
    # --init keeps the model's prediction type unless told otherwise
    third = tmp_path / "third"
    assert pretrain.main(["--steps", "1", "--prediction-type", "v_prediction", "--init", str(first),
                          "--out", str(third), *common]) == 0
    assert pretrain.main(["--steps", "1", "--init", str(third), "--out", str(tmp_path / "fourth"), *common]) == 0
    for folder, kind in ((first, "epsilon"), (third, "v_prediction"), (tmp_path / "fourth", "v_prediction")):
        assert json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == kind
    # equal weights draw the same data stream as no weights (the shipped model's command reproduces)
    same = [pretrain.training_batch(np.random.default_rng(1), 16, 0.1, w)[1] for w in (None, (2.0, 2.0, 2.0))]
    assert same[0] == same[1]
    _, prompts = pretrain.training_batch(np.random.default_rng(0), 32, 0.0, (0.0, 0.0, 1.0))
    assert {parse(p).template for p in prompts} == {"spatial"}
    _, prompts = pretrain.training_batch(np.random.default_rng(0), 64, 0.0, (1.0, 0.0, 1.0))
    assert {parse(p).template for p in prompts} == {"attribute", "spatial"}
    capsys.readouterr()
    for bad, flag in ((["--init", str(tmp_path / "missing")], "--init"),
                      (["--template-weights", "0", "0", "0"], "--template-weights"),
                      (["--template-weights", "-1", "1", "1"], "--template-weights")):
        assert pretrain.main([*bad, "--out", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err
        assert flag in err and err.count("\n") == 1 and not (tmp_path / "bad").exists()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_pretraining_regresses_the_target_of_its_prediction_type(tmp_path, prediction_type):
    import argparse

    import torch

    from b2fast.toy import pretrain
    from b2fast.toy.model import build_toy_model

    folder = build_toy_model(tmp_path / "m", seed=0)
    pretrain.set_prediction_type(folder, prediction_type)
    trainer = pretrain.ToyTrainer(folder, argparse.Namespace(lr=1e-3, steps=10, warmup=1, ema=0.9),
                                  torch.device("cpu"))
    images = torch.rand(4, 3, 32, 32)
    x0 = images * 2 - 1

    class Oracle(torch.nn.Module):
        """Predicts the exact ε (or v) of x_t for the known x0: the regression target."""

        def __init__(self, kind):
            super().__init__()
            self.kind, self.bias = kind, torch.nn.Parameter(torch.zeros(()))

        def forward(self, x_t, t, encoder_hidden_states):
            ab = trainer.alphas[t].view(-1, 1, 1, 1)
            eps = (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()
            out = ab.sqrt() * eps - (1 - ab).sqrt() * x0 if self.kind == "v_prediction" else eps
            return argparse.Namespace(sample=out + self.bias)

    losses = {}
    for kind in ("epsilon", "v_prediction"):
        trainer.unet = Oracle(kind)
        trainer.optimizer = torch.optim.SGD(trainer.unet.parameters(), lr=0.0)
        trainer.schedule = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lambda step: 1.0)
        losses[kind] = trainer.step(images, ["a red circle"] * 4, torch.Generator().manual_seed(0))
    other = "epsilon" if prediction_type == "v_prediction" else "v_prediction"
    assert losses[prediction_type] < 1e-6 < losses[other]
