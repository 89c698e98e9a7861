"""Several processes, one run: ``torchrun`` starts them, this module connects them.

One process ("rank") per GPU, or per CPU slot with gloo. Every rank holds the same LoRA
weights, optimizer state and reward history; a stage splits only the work:

- sampling: rank r samples the stage's batches r, r + W, r + 2W, … (W ranks), each batch with
  the noise stream of its *global* index, so the images do not depend on W;
- rewards, prompts and group ids are gathered into the global table in batch order, so every
  rank computes the same statistics and the same selection;
- training: each rank computes the loss of the selected trajectories it sampled (no latents move
  between ranks); gradients are summed over ranks before every optimizer step, so every rank
  takes the same step as a single process would.

With one process (no ``torchrun``) every function here is a no-op, so the trainer has a single
code path. Collectives time out after ``distributed.timeout_s`` and raise
:class:`CollectiveError` with a one-line message, so a rank that crashes or stalls takes the job
down instead of hanging it.
"""
from __future__ import annotations

import datetime
import os
import re
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as dist

from b2fast.utils import first_line

ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class CollectiveError(RuntimeError):
    """A collective with the other ranks failed: one of them crashed, stalled or disagreed."""


@dataclass(frozen=True)
class World:
    """This process's place in the job; ``World()`` is the single-process run."""
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 writes checkpoints, metrics and images and shows progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def shard(self, n: int) -> list[int]:
        """Indices of ``range(n)`` this rank works on: r, r + W, r + 2W, …"""
        return list(range(self.rank, n, self.size))


def world_from_env() -> World:
    """The World that ``torchrun`` (or any launcher setting RANK/WORLD_SIZE) describes."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    missing = [k for k in ENV_KEYS if k not in os.environ and k != "LOCAL_RANK"]
    if missing:
        raise ValueError(f"distributed: WORLD_SIZE={size} but {', '.join(missing)} not set; "
                         "launch with torchrun --nproc-per-node N -m b2fast.train ...")
    rank = int(os.environ["RANK"])
    return World(rank=rank, size=size, local_rank=int(os.environ.get("LOCAL_RANK", rank)))


def resolve_device(name: str, world: World = World()) -> torch.device:
    """``auto`` → this rank's GPU when CUDA is there, else the CPU; one GPU per rank. Every entry
    point resolves its device here, so each refuses the same devices with the same one line."""
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device: got {name!r} but no CUDA device is visible; use --device cpu")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise ValueError(f"--device: got {name!r} but only {torch.cuda.device_count()} CUDA device(s) are visible "
                         "(numbered from 0)")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and world.distributed:
        if world.local_rank >= torch.cuda.device_count():
            raise ValueError(f"device: local rank {world.local_rank} has no GPU (this machine has "
                             f"{torch.cuda.device_count()}); use --nproc-per-node <= the number of GPUs")
        return torch.device("cuda", world.local_rank)
    if name.startswith("cuda:") and world.distributed:
        raise ValueError(f"device: {name!r} would put every rank on one GPU; use --device cuda "
                         "(each rank takes the GPU of its LOCAL_RANK)")
    return torch.device(name)


def init(device: torch.device, backend: str = "auto", timeout_s: float = 1800.0,
         world: World | None = None) -> World:
    """Join the process group described by the environment (no-op for a single process)."""
    world = world_from_env() if world is None else world
    if not world.distributed or dist.is_initialized():
        return world
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    _collective(world, "joining the process group", dist.init_process_group, backend, rank=world.rank,
                world_size=world.size, timeout=datetime.timedelta(seconds=timeout_s),
                device_id=device if backend == "nccl" else None)
    return world


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _first_words(message: str, limit: int = 160) -> str:
    """The first line of a backend's error, without its ``[source/file.cc:123]`` prefix, cut at a
    word boundary."""
    return first_line(re.sub(r"^\[[^\]]*:\d+\]\s*", "", message.strip()), limit)


def _collective(world: World, what: str, fn, *args, **kwargs):
    """Run one collective; any failure becomes a one-line :class:`CollectiveError`."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # gloo/NCCL raise RuntimeError or DistBackendError subclasses
        first = _first_words(str(exc)) or type(exc).__name__
        raise CollectiveError(
            f"rank {world.rank}/{world.size}: {what} failed ({first}); another rank probably "
            "crashed or stalled (see its log), or the collective timed out (distributed.timeout_s)"
        ) from None


def gather_in_order(world: World, items: dict[int, Any], what: str) -> list[Any]:
    """Each rank holds some of the items 0..n-1 (index → picklable item); all get all, in order."""
    if not world.distributed:
        parts = [items]
    else:
        parts = [None] * world.size
        _collective(world, what, dist.all_gather_object, parts, items)
    merged = {k: v for part in parts for k, v in part.items()}
    if sorted(merged) != list(range(len(merged))):
        raise CollectiveError(f"rank {world.rank}/{world.size}: {what}: the ranks' items do not "
                              f"cover 0..{len(merged) - 1} exactly once")
    return [merged[k] for k in range(len(merged))]


def sum_gradients(world: World, params: Sequence[torch.nn.Parameter]) -> None:
    """Sum every parameter's gradient over ranks, in one flat all-reduce (None counts as 0)."""
    if not world.distributed:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    _collective(world, "gradient all-reduce", dist.all_reduce, flat)
    offset = 0
    for p, g in zip(params, grads):
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        p.grad = g
        offset += g.numel()


def sum_floats(world: World, values: Sequence[float], what: str) -> list[float]:
    """Sum a few numbers over ranks (statistics for the logs), in float64."""
    if not world.distributed:
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64, device=_collective_device())
    _collective(world, what, dist.all_reduce, t)
    return t.tolist()


def min_int(world: World, value: int, what: str) -> int:
    """The smallest of the ranks' values (e.g. a size every rank can afford)."""
    if not world.distributed:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=_collective_device())
    _collective(world, what, dist.all_reduce, t, op=dist.ReduceOp.MIN)
    return int(t.item())


def broadcast_parameters(world: World, params: Sequence[torch.nn.Parameter]) -> None:
    """Copy rank 0's values into every rank's parameters (the start of a run)."""
    if not world.distributed:
        return
    with torch.no_grad():
        for p in params:
            _collective(world, "parameter broadcast", dist.broadcast, p.data, 0)


def check_in_sync(world: World, params: Sequence[torch.nn.Parameter], what: str) -> None:
    """Raise if the ranks' parameters differ: a cheap per-parameter checksum compared over ranks."""
    if not world.distributed:
        return
    with torch.no_grad():
        sums = torch.stack([p.detach().double().sum() for p in params] +
                           [p.detach().double().square().sum() for p in params]).to(_collective_device())
    low, high = sums.clone(), sums.clone()
    _collective(world, what, dist.all_reduce, low, op=dist.ReduceOp.MIN)
    _collective(world, what, dist.all_reduce, high, op=dist.ReduceOp.MAX)
    if not torch.equal(low, high):
        raise CollectiveError(f"rank {world.rank}/{world.size}: {what}: the LoRA weights differ "
                              "between ranks; this is a bug, please report it")


def barrier(world: World, what: str) -> None:
    if world.distributed:
        _collective(world, what, dist.barrier)


def _collective_device() -> torch.device:
    """NCCL reduces CUDA tensors only; gloo reduces CPU tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
