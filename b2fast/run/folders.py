"""The folders a run of ``b2fast.train`` leaves, as the other commands read them: which folder
holds the LoRA weights of a LoRA, checkpoint or run folder, and the settings of the run that wrote
it. Standard library and YAML only, so the commands' ``--help`` stays fast."""
from __future__ import annotations

from pathlib import Path

import yaml

from b2fast.utils import LORA_WEIGHTS_NAME, ArgumentError, first_line, readable_folder


def resolve_lora(path: str) -> Path:
    """The folder holding the LoRA weights file, for a LoRA, checkpoint or run folder (each may be
    the complete previous version of a folder whose replacement a kill interrupted)."""
    folder = Path(path).expanduser()
    if folder.is_file() and folder.name == LORA_WEIGHTS_NAME:
        folder = folder.parent
    folder = readable_folder(folder)
    if not folder.is_dir():
        raise ArgumentError(f"--lora: no such folder {path!r}")
    latest = folder / "checkpoints" / "latest"
    candidates = [folder, folder / "lora"]
    if latest.is_file():
        candidates.append(folder / "checkpoints" / latest.read_text().strip())
    for candidate in map(readable_folder, candidates):
        if (candidate / LORA_WEIGHTS_NAME).is_file():
            return candidate
    raise ArgumentError(f"--lora: {path!r} holds no {LORA_WEIGHTS_NAME}, lora/ or checkpoints/latest; give a "
                        "LoRA folder, a checkpoint folder or a run folder of b2fast.train")


def run_config(lora: Path) -> dict:
    """The config tree of the run that wrote ``lora`` (run/lora, run/checkpoints/stage-N), or {}."""
    for folder in (lora, lora.parent, lora.parent.parent):
        config = folder / "config.yaml"
        if config.is_file():
            try:
                tree = yaml.safe_load(config.read_text(encoding="utf-8"))
                problem = None if isinstance(tree, dict) else "empty" if tree is None else "not a mapping"
            except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
                problem = first_line(exc)
            if problem:  # the run's model, LoRA shape and reward come from it: never guess them
                raise ArgumentError(f"--lora: cannot read the run's settings from {config} ({problem}); repair "
                                    "the file, or remove it and give --model and --reward")
            return tree
    return {}
