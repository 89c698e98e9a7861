"""``python -m b2fast.sample`` on the toy world and the tiny SD model: files, grids, records, fixed
seeds, FK steering, a trained run's LoRA; one-line errors; the trainer refuses steering."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from b2fast.sample import main

FAST = ["--sampling.num_steps", "4", "--device", "cpu", "--no-progress"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    assert len(lines) == 1, lines
    return lines[0]


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def _records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


def test_help_exits_zero_and_documents_steering(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "--steer.particles" in text and "100-step chain" in text and "p<i>_s<seed>.png" in text


def test_runs_as_a_module():
    done = subprocess.run([sys.executable, "-m", "b2fast.sample", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "python -m b2fast.sample" in done.stdout


@pytest.mark.parametrize("extra, fragment", [
    ([], "no prompts"),
    (["--prompt", "x", "--images-per-prompt", "0"], "--images-per-prompt"),
    (["--prompt", "x", "--images-per-prompt", "two"], "--images-per-prompt"),
    (["--prompt", "x", "--keep", "some"], "--keep"),
    (["--prompt", "x", "--split", "dev"], "--split"),
    (["--prompt", "x", "--bogus", "1"], "bogus"),
    (["--prompt", "x", "--steer", "fk", "--steer.potential", "sum"], "steer.potential"),
    (["--prompt", "x", "--steer", "fk", "--sampling.eta", "0"], "sampling.eta"),
    (["--prompts", "no_such_set"], "--prompts"),
    (["--prompts", "toy_spatil"], "'toy_spatil' (did you mean 'toy_spatial'?) is neither a built-in prompt set"),
    (["--prompts", "a red circle"], "nor an existing file; a prompt text goes in --prompt"),
    (["--prompt", "x", "--lora", "/no/such/run"], "--lora"),
    (["--prompt", "x", "--model", "/no/such/model"], "model.path"),
])
def test_bad_input_gives_one_line_error(extra, fragment, capsys, tmp_path):
    assert main([*extra, "--out", str(tmp_path / "out"), *FAST]) == 2
    assert fragment in _error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_training_refuses_steering_in_one_line(capsys):
    from b2fast.train import main as train

    assert train(["--steer.kind", "fk", "--out", "/nonexistent/never-written"]) == 2
    line = _error_line(capsys)
    assert line.startswith("error: steer.kind:") and "PPO ratios and z-scores" in line


def test_plain_sampling_writes_images_grids_and_records(tmp_path):
    out = tmp_path / "s"
    assert main(["--prompt", "a red circle", "--prompts", "toy_attribute", "--split", "test", "--max-prompts", "1",
                 "--images-per-prompt", "2", "--seed", "5", "--out", str(out), *FAST]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["grid_p000.png", "grid_p001.png", "p000_s5.png", "p000_s6.png", "p001_s5.png", "p001_s6.png",
                     "sample.json", "samples.jsonl"]
    assert Image.open(out / "p000_s5.png").size == (32, 32)
    assert Image.open(out / "grid_p000.png").size[0] > 2 * 128  # label column + two enlarged images
    records = _records(out)
    assert [(r["file"], r["prompt_index"], r["seed"]) for r in records] == [
        ("p000_s5.png", 0, 5), ("p000_s6.png", 0, 6), ("p001_s5.png", 1, 5), ("p001_s6.png", 1, 6)]
    assert records[0]["prompt"] == "a red circle"
    settings = json.loads((out / "sample.json").read_text())
    assert settings["model"] == "b2fast:toy" and settings["sampling"]["num_steps"] == 4  # toy_ddim's model
    assert settings["sampling"]["scheduler"] == "ddim" and settings["steer"]["kind"] == "none"


def test_an_images_seed_fixes_it_whatever_shares_its_batch(tmp_path):
    args = ["--prompt", "a red circle", "--prompt", "a blue square", "--images-per-prompt", "3", *FAST]
    assert main([*args, "--batch", "1", "--out", str(tmp_path / "one")]) == 0
    assert main([*args, "--batch", "16", "--out", str(tmp_path / "all")]) == 0
    for name in ("p000_s0.png", "p000_s2.png", "p001_s1.png"):
        assert np.abs(_pixels(tmp_path / "one" / name) - _pixels(tmp_path / "all" / name)).max() <= 1
    assert np.abs(_pixels(tmp_path / "all" / "p000_s0.png") - _pixels(tmp_path / "all" / "p000_s1.png")).max() > 50


def test_fk_keeps_every_particle_or_the_best_one(tmp_path):
    args = ["--prompt", "a red circle left of a green square", "--prompt", "a blue triangle", "--images-per-prompt", "2",
            "--steer", "fk", "--steer.particles", "3", *FAST]
    assert main([*args, "--keep", "all", "--out", str(tmp_path / "all")]) == 0
    assert main([*args, "--keep", "best", "--out", str(tmp_path / "best")]) == 0
    every = _records(tmp_path / "all")
    assert len(every) == 2 * 2 * 3 and every[0]["file"] == "p000_s0_k0.png"
    assert {"reward", "log_weight", "ancestor", "resamplings", "particle"} <= set(every[0])
    assert (tmp_path / "all" / "grid_p001.png").is_file() and (tmp_path / "all" / "p001_s1_k2.png").is_file()
    for best in _records(tmp_path / "best"):  # the same seeds give the same particles: best = the max of all
        group = [r for r in every if (r["prompt_index"], r["seed"]) == (best["prompt_index"], best["seed"])]
        assert best["reward"] == max(r["reward"] for r in group)
        chosen = next(r for r in group if r["particle"] == best["particle"])
        assert np.array_equal(_pixels(tmp_path / "best" / best["file"]), _pixels(tmp_path / "all" / chosen["file"]))


def test_lora_run_folder_gives_its_settings_and_weights(tmp_path):
    from b2fast.config import ModelConfig, dump_yaml, load_yaml
    from b2fast.core.policy import Policy
    from b2fast.config import presets_dir

    run = tmp_path / "run"
    cfg = load_yaml(presets_dir() / "toy_ddim.yaml")
    cfg.sampling.num_steps, cfg.model.lora_rank = 3, 2
    run.mkdir()
    (run / "config.yaml").write_text(dump_yaml(cfg))
    torch.manual_seed(0)
    policy = Policy(ModelConfig(path="b2fast:toy", dtype="float32", lora_rank=2), torch.device("cpu"), 3, 1.0)
    with torch.no_grad():
        for p in policy.lora_parameters():
            p.add_(0.5 * torch.randn_like(p))
    policy.save_lora(run / "lora")
    common = ["--prompt", "a red circle", "--images-per-prompt", "1", "--device", "cpu", "--no-progress"]
    assert main([*common, "--lora", str(run), "--out", str(tmp_path / "trained")]) == 0
    assert main([*common, "--config", str(run / "config.yaml"), "--out", str(tmp_path / "base")]) == 0
    settings = json.loads((tmp_path / "trained" / "sample.json").read_text())
    assert settings["sampling"]["num_steps"] == 3 and settings["lora"] == str(run / "lora")
    trained, base = _pixels(tmp_path / "trained" / "p000_s0.png"), _pixels(tmp_path / "base" / "p000_s0.png")
    assert np.abs(trained - base).max() > 10


def test_fk_on_a_diffusers_sd_folder(tiny_sd_path, tmp_path):
    out = tmp_path / "sd"
    assert main(["--model", tiny_sd_path, "--prompt", "a red square", "--images-per-prompt", "2", "--reward",
                 "jpeg_compressibility", "--steer", "fk", "--steer.particles", "2", "--out", str(out), *FAST]) == 0
    records = _records(out)
    assert [r["file"] for r in records] == ["p000_s0.png", "p000_s1.png"]
    assert all(isinstance(r["reward"], float) for r in records)
    assert Image.open(out / "p000_s0.png").size == (16, 16)
