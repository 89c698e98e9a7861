"""What a run writes besides checkpoints: metrics.jsonl, sample grids, the reward curve, TensorBoard."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from b2fast.rewards.base import to_uint8
from b2fast.utils import append_jsonl, atomic_write, atomic_write_text, finite_json

SAMPLES = "samples.jsonl"
METRICS = "metrics.jsonl"


def read_metrics(out: str | Path) -> list[dict]:
    path = Path(out) / METRICS
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _keep_stages(path: Path, last_stage: int) -> None:
    """Rewrite a JSON-lines file without its records of stages after ``last_stage`` (and without
    a line cut short by a kill)."""
    if path.is_file():
        lines = [line for line in path.read_text().splitlines() if _stage_of(line) <= last_stage]
        atomic_write_text(path, "".join(line + "\n" for line in lines))


def _stage_of(line: str) -> float:
    try:
        return json.loads(line)["stage"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def truncate_metrics(out: str | Path, last_stage: int) -> None:
    """Drop records after ``last_stage`` (a resumed run re-does those stages)."""
    for name in (METRICS, SAMPLES):
        _keep_stages(Path(out) / name, last_stage)


def log_metrics(out: str | Path, record: dict) -> None:
    append_jsonl(Path(out) / METRICS, record)


def log_samples(out: str | Path, stage: int, prompts: list[str], rewards: torch.Tensor, z: torch.Tensor,
                group_ids: torch.Tensor, kept: dict[int, str], captions: list[str] | None = None) -> None:
    """samples.jsonl: one line per image of the stage, in batch order (``kept``: index → role)."""
    items = []
    for i, (prompt, r, zi, g) in enumerate(zip(prompts, rewards.tolist(), z.tolist(), group_ids.tolist())):
        item = {"stage": stage, "index": i, "prompt": prompt, "reward": r, "z": zi, "group": g, "kept": kept.get(i)}
        if captions is not None:
            item["caption"] = captions[i]
        items.append(finite_json(item))  # a NaN reward or z: null
    append_jsonl(Path(out) / SAMPLES, items)


def _uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [0, 1] → (N, H, W, 3) uint8, as the PNG stores them."""
    return to_uint8(images).permute(0, 2, 3, 1).numpy()


# Labelled grids (prompt text | images [| images ...]): a toy image is 32 px, so at 1× a row is
# a few dozen pixels high and no prompt fits beside it. Enlarge by an integer factor (nearest
# neighbour: every source pixel becomes a scale×scale block, nothing is invented) until an image
# is at least GRID_SIDE px; SD-size images (512 px) stay at 1×.
GRID_SIDE = 128
GAP = 4               # px between images and around the picture
BLOCK_GAP = 4 * GAP   # px between two blocks of a row (before | after): wide enough to see the split
BACKGROUND = (255, 255, 255)
INK = (0, 0, 0)


def grid_scale(side: int) -> int:
    """The enlargement of an image whose longer side is ``side`` px: max(1, GRID_SIDE // side)."""
    return max(1, GRID_SIDE // side)


def _font(size: int):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)   # Pillow >= 10.1 with FreeType: a scalable font
    except (TypeError, ImportError, OSError):      # older Pillow or no FreeType: the 11-px bitmap font
        return ImageFont.load_default()


def _wrap(draw, text: str, font, width: int) -> list[str]:
    """Greedy word wrap to ``width`` px (a word longer than a line keeps its own line)."""
    lines: list[str] = []
    for word in text.split():
        candidate = f"{lines[-1]} {word}" if lines else word
        if lines and draw.textlength(candidate, font=font) <= width:
            lines[-1] = candidate
        else:
            lines.append(word)
    return lines or [""]


def labelled_grid(rows: list[tuple[str, list[torch.Tensor]]], headers: list[str] | None = None):
    """A PIL image: per row its label (wrapped) in a left column, then its blocks of images side
    by side (block b of every row under ``headers[b]``), each image enlarged by ``grid_scale``.

    Layout, in px (tile = scaled image size, n_b = the most images of block b in any row):
    label column 2·tile_w wide (none when no row has a label); block b is n_b tiles with GAP between them, blocks BLOCK_GAP
    apart; the picture has a GAP margin, and a header line above the rows when ``headers`` is
    given. Font size tile_h // 8 within [14, 32] px: 16 px beside a 128-px toy row."""
    from PIL import Image, ImageDraw

    _, _, h, w = rows[0][1][0].shape
    scale = grid_scale(max(h, w))
    tile_w, tile_h = w * scale, h * scale
    n_blocks = len(rows[0][1])
    counts = [max(blocks[b].shape[0] for _, blocks in rows) for b in range(n_blocks)]
    block_w = [n * tile_w + (n - 1) * GAP for n in counts]
    font_size = min(32, max(14, tile_h // 8))
    line_h = font_size * 3 // 2
    label_w = 2 * tile_w if any(label for label, _ in rows) else 0
    header_h = line_h + GAP if headers else 0
    width = label_w + GAP + sum(block_w) + (n_blocks - 1) * BLOCK_GAP + GAP
    height = header_h + GAP + len(rows) * (tile_h + GAP)
    picture = Image.new("RGB", (width, height), BACKGROUND)
    draw, font = ImageDraw.Draw(picture), _font(font_size)
    x_blocks = [label_w + GAP + sum(block_w[:b]) + b * BLOCK_GAP for b in range(n_blocks)]
    for b, header in enumerate(headers or []):
        left = x_blocks[b] + (block_w[b] - draw.textlength(header, font=font)) / 2
        draw.text((left, GAP), header, fill=INK, font=font)
    for b in range(1, n_blocks):  # a grey rule in the middle of each gap between blocks
        x = x_blocks[b] - BLOCK_GAP // 2
        draw.line([(x, header_h), (x, height - GAP)], fill=(160, 160, 160), width=2)
    for r, (label, blocks) in enumerate(rows):
        y = header_h + GAP + r * (tile_h + GAP)
        lines = _wrap(draw, label, font, label_w - 2 * GAP)[:max(1, tile_h // line_h)]
        for i, line in enumerate(lines):
            draw.text((GAP, y + i * line_h), line, fill=INK, font=font)
        for b, images in enumerate(blocks):
            for j, pixels in enumerate(_uint8(images)):
                tile = pixels.repeat(scale, axis=0).repeat(scale, axis=1)  # nearest neighbour
                picture.paste(Image.fromarray(tile), (x_blocks[b] + j * (tile_w + GAP), y))
    return picture


def save_png(path: str | Path, picture) -> None:
    """A PIL image as a PNG, written atomically (a kill leaves the old file or none)."""
    atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"))


def _runs(prompts: list[str]) -> list[tuple[int, int]]:
    """(start, end) of each run of equal consecutive prompts."""
    runs, start = [], 0
    for i in range(1, len(prompts) + 1):
        if i == len(prompts) or prompts[i] != prompts[start]:
            runs.append((start, i))
            start = i
    return runs


def save_grid(path: str | Path, images: torch.Tensor, prompts: list[str] | None = None) -> None:
    """A stage's sample grid: with ``prompts`` (one per image), one labelled row per run of
    images of the same prompt (a group's branches); without, rows of up to 8 unlabelled images.
    Enlarged as :func:`labelled_grid`."""
    if prompts is None:
        rows = [("", [images[i:i + 8]]) for i in range(0, images.shape[0], 8)]
    else:
        rows = [(prompts[a], [images[a:b]]) for a, b in _runs(prompts)]
    save_png(path, labelled_grid(rows))


def _prompt_rows(columns: list[torch.Tensor], prompts: list[str], n_per_prompt: int) -> list:
    """Row i: prompt i, then its ``n_per_prompt`` consecutive images of each column."""
    return [(p, [images[i * n_per_prompt:(i + 1) * n_per_prompt] for images in columns])
            for i, p in enumerate(prompts)]


def save_prompt_grid(path: str | Path, images: torch.Tensor, prompts: list[str], n_per_prompt: int) -> None:
    """One row per prompt: the prompt written beside its ``n_per_prompt`` consecutive images."""
    save_png(path, labelled_grid(_prompt_rows([images], prompts, n_per_prompt)))


def save_comparison_grid(path: str | Path, columns: dict[str, torch.Tensor], prompts: list[str],
                         n_per_prompt: int) -> None:
    """One row per prompt: the prompt, then its images of each column (e.g. before | after,
    same seeds) side by side under the column names."""
    save_png(path, labelled_grid(_prompt_rows(list(columns.values()), prompts, n_per_prompt), list(columns)))


def plot_reward_curve(out: str | Path, records: list[dict] | None = None) -> Path | None:
    """reward_curve.png: mean reward ± std per stage, with the interval length on a second axis."""
    records = records if records is not None else read_metrics(out)
    if not records:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = [r["stage"] for r in records]
    mean = np.array([r["reward_mean"] for r in records], dtype=float)
    std = np.array([r["reward_std"] for r in records], dtype=float)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(stages, mean, marker="o", label="reward mean")
    ax.fill_between(stages, mean - std, mean + std, alpha=0.2, label="± std")
    ax.set_xlabel("stage")
    ax.set_ylabel("reward")
    ax2 = ax.twinx()
    ax2.step(stages, [r["interval_len"] for r in records], where="post", color="grey", alpha=0.5)
    ax2.set_ylabel("trained steps L", color="grey")
    ax.legend(loc="lower right")
    fig.tight_layout()
    path = Path(out) / "reward_curve.png"
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return path


class TensorBoardLogger:
    """Scalars of each stage record, when ``log.tensorboard`` is on."""

    def __init__(self, out: str | Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ValueError("log.tensorboard: needs the tensorboard package (pip install tensorboard)") from None
        self.writer = SummaryWriter(str(Path(out) / "tensorboard"))

    def log(self, record: dict) -> None:
        for key, value in record.items():
            if isinstance(value, (int, float)) and key != "stage" and value is not None:
                self.writer.add_scalar(key, value, record["stage"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
