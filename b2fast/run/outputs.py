"""What a run writes besides checkpoints: metrics.jsonl, sample grids, the reward curve, TensorBoard."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from b2fast.utils import append_jsonl, atomic_write, atomic_write_text

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
    lines = []
    for i, (prompt, r, zi, g) in enumerate(zip(prompts, rewards.tolist(), z.tolist(), group_ids.tolist())):
        item = {"stage": stage, "index": i, "prompt": prompt, "reward": _finite_or_none(r),
                "z": _finite_or_none(zi), "group": g, "kept": kept.get(i)}
        if captions is not None:
            item["caption"] = captions[i]
        lines.append(json.dumps(item, sort_keys=True) + "\n")
    with open(Path(out) / SAMPLES, "a", encoding="utf-8") as f:
        f.write("".join(lines))
        f.flush()


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def image_grid(images: torch.Tensor, columns: int = 0) -> np.ndarray:
    """(N, 3, H, W) in [0, 1] → one (rows·H, cols·W, 3) uint8 array with 1-px gaps."""
    n, _, h, w = images.shape
    cols = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * (h + 1) + 1, cols * (w + 1) + 1, 3), dtype=np.uint8)
    pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    for k in range(n):
        r, c = divmod(k, cols)
        grid[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + c * (w + 1):1 + c * (w + 1) + w] = pixels[k]
    return grid


def save_grid(path: str | Path, images: torch.Tensor, min_size: int = 256, columns: int = 0) -> None:
    """Write a PNG grid, upscaled with nearest neighbour so tiny images stay visible."""
    from PIL import Image

    grid = Image.fromarray(image_grid(images, columns))
    scale = max(1, min_size // max(grid.size))
    if scale > 1:
        grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    atomic_write(path, lambda tmp: grid.save(tmp, format="PNG"))


def save_prompt_grid(path: str | Path, images: torch.Tensor, prompts: list[str], n_per_prompt: int, min_size: int = 256) -> None:
    """A PNG with one row per prompt: its images side by side, the prompt written above them;
    upscaled with nearest neighbour (as ``save_grid``) so tiny images stay visible."""
    from PIL import Image, ImageDraw, ImageFont

    rows = [Image.fromarray(image_grid(images[i * n_per_prompt:(i + 1) * n_per_prompt], n_per_prompt))
            for i in range(len(prompts))]
    scale = max(1, min_size // max(rows[0].width, sum(r.height for r in rows)))
    rows = [r.resize((r.width * scale, r.height * scale), Image.NEAREST) for r in rows]
    font = ImageFont.load_default()
    boxes = [font.getbbox(p) for p in prompts]                          # (left, top, right, bottom)
    line = max(box[3] for box in boxes) + 4                             # text height + margin
    width = max(rows[0].width, *(box[2] + 6 for box in boxes))
    grid = Image.new("RGB", (width, sum(line + r.height for r in rows)))
    draw, y = ImageDraw.Draw(grid), 0
    for prompt, row in zip(prompts, rows):
        draw.text((3, y + 2), prompt, fill=(255, 255, 255), font=font)
        grid.paste(row, (0, y + line))
        y += line + row.height
    atomic_write(path, lambda tmp: grid.save(tmp, format="PNG"))


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
