"""The stage's table of every image, in global batch order, on every rank.

Normalisation and selection need all of a stage's rewards, but with several ranks each one
holds only the batches it sampled. :func:`gather_stage_table` collects the small per-image
columns (reward, prompt, branch group, caption) from all ranks, ordered by global batch index
exactly as a single process would have concatenated them, and remembers which rows this rank
holds the trajectories of (``local_rows``), so training never moves latents between ranks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from b2fast.distributed import World, gather_in_order
from b2fast.core.sampling import TrajectoryBatch


@dataclass
class StageTable:
    prompts: list[str]             # (N,) prompt of each image
    rewards: torch.Tensor          # (N,) float32 CPU; NaN = no valid score
    group_ids: torch.Tensor        # (N,) int64 branch group; batch b's groups are b·P … b·P + P − 1
    captions: list[str] | None     # (N,) what a captioning reward read in each image, if any
    local_rows: torch.Tensor       # (N,) int64 row in this rank's TrajectoryBatch, −1 on another rank

    def __len__(self) -> int:
        return len(self.prompts)


def gather_stage_table(world: World, batch_indices: list[int], batch: TrajectoryBatch,
                       rewards: torch.Tensor, captions: list[str] | None) -> StageTable:
    """Assemble the global table from each rank's batches ``batch_indices`` (in ``batch`` order).

    Every sampling batch has the same number of images and branch groups, so row k·n … k·n + n − 1
    of ``batch`` is global batch ``batch_indices[k]``.
    """
    n_batches = len(batch_indices)
    n = len(batch) // n_batches if n_batches else 0
    groups = batch.fork_latents.shape[0] // n_batches if n_batches else 0
    items = {}
    for k, b in enumerate(batch_indices):
        rows = slice(k * n, (k + 1) * n)
        items[b] = {"prompts": batch.prompts[rows], "rewards": rewards[rows].cpu(),
                    "groups": batch.group_ids[rows].cpu() - k * groups,  # 0 … P − 1 within the batch
                    "n_groups": groups, "captions": captions[rows] if captions is not None else None,
                    "local_rows": torch.arange(k * n, (k + 1) * n)}
    parts = gather_in_order(world, items, "gathering the stage's rewards")
    sizes = {len(p["prompts"]) for p in parts}
    if len(sizes) > 1:
        raise ValueError(f"sampling batches differ in size ({sorted(sizes)}); every batch must have "
                         "sampling.prompts_per_batch × sampling.branches images")
    offsets = [sum(p["n_groups"] for p in parts[:b]) for b in range(len(parts))]  # as TrajectoryBatch.cat
    has_captions = all(p["captions"] is not None for p in parts)
    return StageTable(
        prompts=[q for p in parts for q in p["prompts"]],
        rewards=torch.cat([p["rewards"] for p in parts]),
        group_ids=torch.cat([p["groups"] + offset for p, offset in zip(parts, offsets)]),
        captions=[c for p in parts for c in p["captions"]] if has_captions else None,
        local_rows=torch.cat([p["local_rows"] if b in items else torch.full((len(p["prompts"]),), -1)
                              for b, p in enumerate(parts)]))
