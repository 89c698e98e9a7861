"""Checkpoints: LoRA weights (diffusers format) + optimizer, reward history, RNG and stage.

A checkpoint is a folder ``checkpoints/stage-NNNNNN`` written under a temporary name and
renamed into place (b2fast.utils.atomic_write_folder), then named in ``checkpoints/latest``
(also written atomically), so a kill at any moment leaves either the previous complete
checkpoint or the new one, never half of one.
"""
from __future__ import annotations

import os
import random
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from b2fast.core.policy import LoraMismatchError
from b2fast.utils import atomic_write_folder, atomic_write_text, one_line, readable_folder

STATE_NAME = "trainer_state.pt"
LATEST = "latest"


class CheckpointError(ValueError):
    """A checkpoint is missing or unreadable; the message names the path."""


@dataclass
class TrainerState:
    stage: int              # index of the last completed stage
    optimizer: dict
    history: dict
    rng: dict
    config: dict
    micro_batch: int | None = None  # train.micro_batch = 0 as resolved; None when set explicitly


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_lora_folder(policy, folder: str | os.PathLike) -> Path:
    """Write the LoRA weights alone into ``folder`` (replacing it whole, atomically)."""
    return atomic_write_folder(Path(folder), policy.save_lora)


def save_checkpoint(root: str | os.PathLike, policy, state: TrainerState, keep: int) -> Path:
    """Write ``root/checkpoints/stage-NNNNNN`` atomically and prune to the ``keep`` newest."""
    ckpt_dir = Path(root) / "checkpoints"
    name = f"stage-{state.stage:06d}"

    def fill(tmp: Path) -> None:
        policy.save_lora(tmp)
        torch.save(state.__dict__, tmp / STATE_NAME)

    final = atomic_write_folder(ckpt_dir / name, fill)
    atomic_write_text(ckpt_dir / LATEST, name + "\n")
    older = sorted(p for p in ckpt_dir.glob("stage-*") if p.name != name)  # never the one just written
    for old in older[:max(len(older) - (keep - 1), 0)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def adopt_checkpoint(ckpt: Path) -> list[str]:
    """Make ``ckpt`` its run's newest checkpoint: ``latest`` names it and the later stages (a
    continuation the resume abandons, as it drops their metrics) are removed; returns their names."""
    later = sorted(p.name for p in ckpt.parent.glob("stage-*") if p.name > ckpt.name)
    atomic_write_text(ckpt.parent / LATEST, ckpt.name + "\n")
    for name in later:
        shutil.rmtree(ckpt.parent / name, ignore_errors=True)
    return later


def find_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint folder, or a run folder whose ``checkpoints/latest`` names one (either may be
    the complete previous version of a folder whose replacement a kill interrupted)."""
    path = Path(path)
    if (readable_folder(path) / STATE_NAME).is_file():
        return readable_folder(path)
    latest = path / "checkpoints" / LATEST
    if latest.is_file():
        ckpt = readable_folder(path / "checkpoints" / latest.read_text().strip())
        if (ckpt / STATE_NAME).is_file():
            return ckpt
        raise CheckpointError(f"--resume: {latest} names {ckpt.name!r}, which is missing or incomplete")
    if (path / "config.yaml").is_file() or (path / "metrics.jsonl").is_file():
        saved = (f", e.g. python -m b2fast.train --config {shlex.quote(str(path / 'config.yaml'))} --out "
                 f"{shlex.quote(str(path))} (its saved config)") if (path / "config.yaml").is_file() else ""
        raise CheckpointError(f"--resume: the run in {str(path)!r} was stopped before its first checkpoint; start "
                              f"it again with the command that started it, without --resume{saved}")
    raise CheckpointError(f"--resume: {str(path)!r} is neither a checkpoint folder nor a run folder "
                          "with checkpoints/latest")


def load_checkpoint(path: str | os.PathLike, policy) -> tuple[Path, TrainerState]:
    """Read a checkpoint into ``policy`` (LoRA weights); return its folder and trainer state."""
    ckpt = find_checkpoint(path)
    try:
        state = TrainerState(**torch.load(ckpt / STATE_NAME, map_location="cpu", weights_only=False))
        policy.load_lora(ckpt)
    except LoraMismatchError:
        model = state.config.get("model", {})
        raise CheckpointError(f"--resume: the LoRA in {str(ckpt)!r} does not fit this model's adapter; the run "
                              f"used model.lora_rank={model.get('lora_rank')} and model.lora_targets="
                              f"{model.get('lora_targets')}: resume with the same") from None
    except Exception as exc:  # any unreadable file is the same problem to the user
        raise CheckpointError(f"--resume: checkpoint {str(ckpt)!r} is corrupt or incomplete "
                              f"({one_line(exc)}); resume from an earlier checkpoint folder") from None
    return ckpt, state
