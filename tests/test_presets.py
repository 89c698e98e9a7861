"""The shipped Stable Diffusion presets train as written: fp16 base weights, their cache dtype, micro-batch
(automatic in sd15_24gb), gradient checkpointing and UNet batch — the settings a first GPU run uses, and
that the other tests (fp32 tiny presets) never combine. On the tiny random SD model on a CPU, with only the
model, the reward (the CLIP weights cannot be downloaded here), the device and the sizes made small.
"""
from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from b2fast.config import differences, load_yaml, to_dict
from b2fast.train import main

SMALL = {"device": "cpu", "model.path": "b2fast:tiny-sd", "reward.name": "jpeg_compressibility", "reward.options": "{}",
         "sampling.num_steps": "6", "sampling.batches_per_stage": "2", "sampling.prompts_per_batch": "2",
         "schedule.num_stages": "2", "schedule.min_interval": "4", "schedule.max_interval": "6",
         "log.progress": "false"}


@pytest.mark.parametrize("preset", ["sd15_clipscore", "sd15_24gb"])
def test_a_shipped_sd_preset_trains_as_written_on_the_tiny_model(preset, tmp_path):
    out = tmp_path / preset
    argv = ["--config", preset, "--out", str(out)] + [a for key, value in SMALL.items() for a in (f"--{key}", value)]
    assert main(argv) == 0
    shipped, ran = to_dict(load_yaml(preset)), yaml.safe_load((out / "config.yaml").read_text())
    changed = {line.split(":")[0].removeprefix("reward.options.") for line in differences(shipped, ran)}
    assert changed <= set(SMALL) | {"out", "model_name", "pretrained"}  # the rest as shipped, dtype and fast paths too
    assert ran["model"]["dtype"] == "float16"
    stages = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [s["stage"] for s in stages] == [0, 1]
    assert all(s["optimizer_steps"] >= 1 and s["n_selected"] > 0 for s in stages)
    lora = load_file(out / "lora" / "pytorch_lora_weights.safetensors")
    assert lora and all(torch.isfinite(w).all() for w in lora.values())
    assert any(".lora.up." in name and w.abs().max() > 0 for name, w in lora.items())  # trained: up starts at 0
