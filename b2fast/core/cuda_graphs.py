"""Capture a tensor function as one CUDA graph per input signature, and replay it.

A denoising step (UNet with CFG + fused DDIM step) is hundreds of kernel launches; at the small
batches of a trunk the CPU cannot launch them as fast as the GPU runs them. Replaying a captured
graph launches them all at once. The function must be graph-safe: no host sync, no ``.item()``,
no data-dependent shapes (the fused ops read per-step scalars from a device table for this).
Parameters are read through their storage, so in-place updates of the LoRA weights
(``optimizer.step``, ``Policy.load_lora_state_dict``) are seen by later replays.
"""
from __future__ import annotations

from typing import Callable

import torch


class CapturedCalls:
    """``fn(*tensors) -> tuple of tensors``, captured on first use of each (shape, dtype) signature.

    Inputs are copied into the graph's static buffers and outputs cloned out of it, so callers
    may keep both. All graphs of one instance share a memory pool (they never run concurrently).
    """

    def __init__(self, fn: Callable[..., tuple[torch.Tensor, ...]], warmup: int = 2):
        self.fn, self.warmup = fn, warmup
        self.graphs: dict[tuple, tuple[list[torch.Tensor], tuple[torch.Tensor, ...], torch.cuda.CUDAGraph]] = {}
        self.pool = None

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        key = tuple((tuple(t.shape), t.dtype, t.device) for t in inputs)
        if key not in self.graphs:
            self.graphs[key] = self._capture(inputs)
        static_inputs, static_outputs, graph = self.graphs[key]
        for buffer, value in zip(static_inputs, inputs):
            buffer.copy_(value)
        graph.replay()
        return tuple(out.clone() for out in static_outputs)

    def _capture(self, inputs: tuple[torch.Tensor, ...]):
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        static_inputs = [t.clone() for t in inputs]
        side = torch.cuda.Stream(inputs[0].device)  # warm-up (lazy init, autotuning) off the capture
        side.wait_stream(torch.cuda.current_stream(inputs[0].device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.fn(*static_inputs)
        torch.cuda.current_stream(inputs[0].device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            static_outputs = tuple(self.fn(*static_inputs))
        return static_inputs, static_outputs, graph
