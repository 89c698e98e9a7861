"""b2fast.run.folders: which folder holds a run's LoRA, and the run's settings as ``eval`` and
``sample`` read them (the weights' content does not matter here: no model is loaded)."""
from __future__ import annotations

import pytest

from b2fast.eval.cli import main, prepare
from b2fast.run.folders import resolve_lora

WEIGHTS = "pytorch_lora_weights.safetensors"


def _run_with_lora(tmp_path, config: str | None = None):
    run = tmp_path / "run"
    (run / "lora").mkdir(parents=True)
    (run / "lora" / WEIGHTS).write_bytes(b"")
    if config is not None:
        (run / "config.yaml").write_text(config)
    return run


def test_resolve_lora_accepts_run_and_checkpoint_folders(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    ckpt = run / "checkpoints" / "stage-000001"
    ckpt.mkdir()
    (ckpt / WEIGHTS).write_bytes(b"")
    (run / "checkpoints" / "latest").write_text("stage-000001\n")
    assert resolve_lora(str(run)) == ckpt                 # no lora/ yet: the latest checkpoint
    (run / "lora").mkdir()
    (run / "lora" / WEIGHTS).write_bytes(b"")
    assert resolve_lora(str(run)) == run / "lora"         # a finished run: its final LoRA
    assert resolve_lora(str(ckpt)) == ckpt


def test_the_sampler_defaults_to_the_runs_unless_another_model_is_named(tmp_path):
    run = _run_with_lora(tmp_path, "model:\n  path: b2fast:toy-lcm\nsampling:\n  scheduler: lcm\n  num_steps: 4\n"
                                   "  guidance_scale: 3.5\n")
    args = prepare(["--lora", str(run)])[0]
    assert (args.scheduler, args.num_steps, args.guidance_scale, args.eta) == ("lcm", 4, 3.5, 1.0)
    args = prepare(["--lora", str(run), "--num-steps", "8"])[0]          # a flag given wins
    assert (args.scheduler, args.num_steps) == ("lcm", 8)
    args = prepare(["--lora", str(run), "--model", "b2fast:toy"])[0]    # another model: DDIM's defaults
    assert (args.scheduler, args.num_steps, args.guidance_scale) == ("ddim", 20, 5.0)
    args = prepare([])[0]
    assert (args.scheduler, args.num_steps, args.guidance_scale, args.eta) == ("ddim", 20, 5.0, 1.0)


@pytest.mark.parametrize("content", ["model: [unclosed\n", "- a list\n", ""])
def test_unreadable_run_config_is_an_error_not_a_silent_default(tmp_path, capsys, content):
    run = _run_with_lora(tmp_path, content)
    assert main(["--lora", str(run), "--device", "cpu"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"error: --lora: cannot read the run's settings from {run / 'config.yaml'} (")
    assert "repair the file, or remove it and give --model and --reward" in line
