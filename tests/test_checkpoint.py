"""Folder and file replacement survive a kill at any step: a reader always finds a complete folder."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from b2fast.run.folders import resolve_lora
from b2fast.run.checkpoint import STATE_NAME, TrainerState, find_checkpoint, save_checkpoint, save_lora_folder
from b2fast.utils import LORA_WEIGHTS_NAME, atomic_write_text

# Writes a LoRA folder or a checkpoint tagged `new` over the existing one, and dies (os._exit,
# no cleanup, like a SIGKILL) just before or just after the rename that puts the new folder in place.
KILLED_WRITER = textwrap.dedent('''
    import os, sys
    from pathlib import Path
    from b2fast.run.checkpoint import TrainerState, save_checkpoint, save_lora_folder

    kind, root, when = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    target = root / "lora" if kind == "lora" else root / "checkpoints" / "stage-000003"
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst) == target and Path(src).parent == target.parent and when == "before":
            os._exit(9)
        real_replace(src, dst)
        if Path(dst) == target and when == "after":
            os._exit(9)

    os.replace = os.rename = replace

    class Policy:
        def save_lora(self, folder):
            (Path(folder) / "pytorch_lora_weights.safetensors").write_text("new")
            (Path(folder) / "part2").write_text("new")

    if kind == "lora":
        save_lora_folder(Policy(), target)
    else:
        save_checkpoint(root, Policy(), TrainerState(3, {}, {}, {}, {"tag": "new"}), keep=5)
''')


class TaggedPolicy:
    """Writes two files, so a half-written folder would show."""

    def __init__(self, tag):
        self.tag = tag

    def save_lora(self, folder):
        (Path(folder) / LORA_WEIGHTS_NAME).write_text(self.tag)
        (Path(folder) / "part2").write_text(self.tag)


def _tag(folder: Path) -> str:
    tags = {(folder / LORA_WEIGHTS_NAME).read_text(), (folder / "part2").read_text()}
    assert len(tags) == 1, f"{folder} mixes versions"
    return tags.pop()


def _state(stage, tag):
    return TrainerState(stage=stage, optimizer={}, history={}, rng={}, config={"tag": tag})


def _kill_writer(kind, root, when):
    done = subprocess.run([sys.executable, "-c", KILLED_WRITER, kind, str(root), when], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 9, done.stderr[-2000:]


@pytest.mark.parametrize("when, expected", [("before", "old"), ("after", "new")])
def test_lora_folder_killed_mid_replacement_still_reads_complete(tmp_path, when, expected):
    lora = tmp_path / "lora"
    save_lora_folder(TaggedPolicy("old"), lora)
    (tmp_path / "config.yaml").write_text("seed: 0\n")
    _kill_writer("lora", tmp_path, when)
    assert _tag(resolve_lora(str(tmp_path))) == expected  # what `python -m b2fast.eval --lora RUN` loads
    assert _tag(resolve_lora(str(lora))) == expected
    save_lora_folder(TaggedPolicy("third"), lora)  # the next write cleans up after the killed one
    assert _tag(lora) == "third"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "lora"]


@pytest.mark.parametrize("when, expected", [("before", "old"), ("after", "new")])
def test_checkpoint_killed_mid_replacement_still_resumes_from_a_complete_one(tmp_path, when, expected):
    save_checkpoint(tmp_path, TaggedPolicy("old"), _state(3, "old"), keep=5)
    _kill_writer("checkpoint", tmp_path, when)
    for reader in (tmp_path, tmp_path / "checkpoints" / "stage-000003"):  # run folder, checkpoint folder
        ckpt = find_checkpoint(reader)
        assert torch.load(ckpt / STATE_NAME, weights_only=False)["config"]["tag"] == expected
        assert _tag(ckpt) == expected
    save_checkpoint(tmp_path, TaggedPolicy("later"), _state(4, "later"), keep=5)
    ckpt_dir = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["latest", "stage-000003", "stage-000004"]
    assert torch.load(ckpt_dir / "stage-000003" / STATE_NAME, weights_only=False)["config"]["tag"] == expected


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names open files through /proc")
def test_files_and_folders_are_fsynced_around_their_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.realpath(src), os.path.realpath(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    tmp_path = Path(os.path.realpath(tmp_path))
    atomic_write_text(tmp_path / "a.txt", "x")
    (_, tmp, dst), = [e for e in events if e[0] == "replace"]
    assert dst == str(tmp_path / "a.txt")
    at = events.index(("replace", tmp, dst))
    assert ("fsync", tmp) in events[:at] and ("fsync", str(tmp_path)) in events[at + 1:]

    events.clear()
    save_lora_folder(TaggedPolicy("x"), tmp_path / "lora")
    (_, tmp, dst), = [e for e in events if e[0] == "replace"]
    at = events.index(("replace", tmp, dst))
    before = {e[1] for e in events[:at] if e[0] == "fsync"}
    assert {tmp, f"{tmp}/{LORA_WEIGHTS_NAME}", f"{tmp}/part2"} <= before
    assert ("fsync", str(tmp_path)) in events[at + 1:]
