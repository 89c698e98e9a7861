"""Grids a person can read: toy images enlarged by nearest neighbour, each prompt written beside
its row, before and after side by side; in the trainer's outputs too."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from b2fast.run.outputs import (BACKGROUND, BLOCK_GAP, GAP, grid_scale, save_comparison_grid, save_grid,
                                save_prompt_grid)

PROMPTS = ["a red circle left of a blue square", "a green triangle", "a cyan square above a magenta circle"]


def _images(n, side, seed):
    """Random images whose values are exact k/255, so the PNG holds them without rounding."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, side, side), generator=g).float() / 255


def _as_uint8(images):
    return (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _tile(picture, x, y, size):
    return picture[y:y + size, x:x + size]


def _is_nearest_neighbour_copy(tile, source, scale):
    """Each scale×scale block of ``tile`` is one colour, the source pixel's."""
    h, w, _ = source.shape
    blocks = tile.reshape(h, scale, w, scale, 3)
    return bool((blocks == source[:, None, :, None, :]).all())


def test_scale_enlarges_small_images_and_keeps_large_ones():
    assert [grid_scale(s) for s in (32, 64, 100, 128, 512)] == [4, 2, 1, 1, 1]


def test_before_after_grid_layout_pixels_and_text(tmp_path):
    """3 prompts × 4 images of 32 px, scale 4 → 128-px tiles. By hand: label column 2·128 = 256,
    then GAP, two blocks of 4·128 + 3·GAP = 524 px, BLOCK_GAP = 16 between them, GAP margin:
    width 256 + 4 + 524 + 16 + 524 + 4 = 1328. Font 128 // 8 = 16 px, line 24 px, header
    24 + GAP = 28; rows of 128 + GAP: height 28 + 4 + 3·132 = 428."""
    assert (GAP, BLOCK_GAP) == (4, 16)   # the numbers below are written for these
    before, after = _images(12, 32, 0), _images(12, 32, 1)
    path = tmp_path / "before_after.png"
    save_comparison_grid(path, {"before": before, "after": after}, PROMPTS, 4)
    picture = np.asarray(Image.open(path).convert("RGB"))
    assert picture.shape == (428, 1328, 3)
    for name, images, x0 in (("before", before, 260), ("after", after, 260 + 524 + 16)):
        pixels = _as_uint8(images)
        for r in range(3):
            for j in range(4):
                tile = _tile(picture, x0 + j * 132, 32 + r * 132, 128)
                assert _is_nearest_neighbour_copy(tile, pixels[4 * r + j], 4), (name, r, j)
    # the halves differ: the after half does not hold the before images
    assert not _is_nearest_neighbour_copy(_tile(picture, 800, 32, 128), _as_uint8(before)[0], 4)
    background = np.array(BACKGROUND, dtype=np.uint8)
    for r in range(3):   # each prompt's text: dark pixels in the label column beside its row
        label = picture[32 + r * 132:32 + r * 132 + 128, :256]
        ink = (label.astype(int).sum(axis=2) < 200).sum()
        assert ink > 50, (r, ink)
    assert (picture[32 + 2 * 132 + 100:32 + 2 * 132 + 128, :256] == background).all()  # text stays in its row
    for x0 in (260, 800):   # the headers "before" and "after" above their blocks
        assert (picture[:28, x0:x0 + 524] != background).any(axis=2).sum() > 50
    assert (picture[:28, :256] == background).all()        # no header over the label column


def test_prompt_grid_of_larger_images_and_an_unlabelled_stage_grid(tmp_path):
    images = _images(4, 64, 2)   # scale 2: 128-px tiles; label column 256, no header
    save_prompt_grid(tmp_path / "g.png", images, PROMPTS[:2], 2)
    picture = np.asarray(Image.open(tmp_path / "g.png").convert("RGB"))
    assert picture.shape == (4 + 2 * 132, 256 + 4 + 2 * 128 + 4 + 4, 3)
    assert _is_nearest_neighbour_copy(_tile(picture, 260 + 132, 4 + 132, 128), _as_uint8(images)[3], 2)
    big = _images(2, 160, 3)     # larger than 128 px: stays 1×
    save_grid(tmp_path / "s.png", big)
    picture = np.asarray(Image.open(tmp_path / "s.png").convert("RGB"))
    assert picture.shape == (4 + 164, 4 + 2 * 164, 3)      # no labels: no label column
    assert (picture[4:164, 4:164] == _as_uint8(big)[0]).all()


def test_stage_grid_gives_each_prompt_group_its_labelled_row(tmp_path):
    images = _images(7, 32, 4)
    prompts = [PROMPTS[0]] * 4 + [PROMPTS[1]] * 3          # two groups: 4 and 3 branches
    save_grid(tmp_path / "stage.png", images, prompts)
    picture = np.asarray(Image.open(tmp_path / "stage.png").convert("RGB"))
    assert picture.shape == (4 + 2 * 132, 256 + 4 + 4 * 128 + 3 * 4 + 4, 3)
    assert _is_nearest_neighbour_copy(_tile(picture, 260, 4 + 132, 128), _as_uint8(images)[4], 4)
    assert (picture[4 + 132:4 + 260, 260 + 3 * 132:260 + 3 * 132 + 128] == np.array(BACKGROUND)).all()  # 3 only


@pytest.mark.usefixtures("one_thread")  # restored afterwards: later tests keep their thread count
@pytest.mark.parametrize("resume", [False, True])
def test_trainer_writes_before_after_grid_and_intervals(tmp_path, capsys, resume):
    """One short stage on the toy model: images/before_after.png holds the evaluation's first
    prompt of each (set, split), before | after; eval.json has the paired differences. Resumed
    for a second stage, the evaluation before training is read back, its images included."""
    from b2fast.config import apply_overrides, load_yaml
    from b2fast.run.trainer import Trainer
    from b2fast.config import presets_dir

    overrides = ["--out", str(tmp_path), "--device", "cpu", "--prompts.source", "toy_attribute",
                 "--schedule.num_stages", "1", "--schedule.min_interval", "2", "--schedule.max_interval", "2",
                 "--sampling.num_steps", "4", "--sampling.batches_per_stage", "1", "--sampling.prompts_per_batch", "2",
                 "--sampling.branches", "2", "--eval.prompt_sets", "[toy_attribute]", "--eval.prompts_per_set", "2",
                 "--eval.images_per_prompt", "2", "--log.progress", "false", "--log.grid_every", "1"]
    Trainer(apply_overrides(load_yaml(presets_dir() / "toy_ddim.yaml"), overrides)).run()
    if resume:
        (tmp_path / "images" / "before_after.png").unlink()
        overrides[overrides.index("--schedule.num_stages") + 1] = "2"
        Trainer(apply_overrides(load_yaml(presets_dir() / "toy_ddim.yaml"), overrides), resume=str(tmp_path)).run()
    result = json.loads((tmp_path / "eval.json").read_text())
    assert [(d["split"], d["metric"]) for d in result["differences"]] == [
        ("train", "toy_align"), ("train", "toy_align_success"), ("test", "toy_align"), ("test", "toy_align_success")]
    printed = capsys.readouterr().out
    assert "after - before, paired by prompt" in printed
    picture = np.asarray(Image.open(tmp_path / "images" / "before_after.png").convert("RGB"))
    # 2 rows (train, test) of 2 images per side: 28 + 4 + 2·132 high, 256 + 4 + 2·260 + 16 + 4 wide
    assert picture.shape == (28 + 4 + 2 * 132, 256 + 4 + 2 * (2 * 128 + 4) + 16 + 4, 3)
    stage = np.asarray(Image.open(tmp_path / "images" / "stage-000000.png").convert("RGB"))
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    prompts = [s["prompt"] for s in samples if s["stage"] == 0]
    runs = 1 + sum(a != b for a, b in zip(prompts, prompts[1:]))   # a row per run of one prompt's branches
    assert len(prompts) == 4 and stage.shape[0] == 4 + runs * 132
