"""Decode and score a stage's sampling batches, overlapped with the sampling of the next batch.

Sampling is UNet-bound; the VAE decode and the reward model are other models that the GPU
would otherwise run in the gaps between batches. With ``overlap`` the two run in one worker
thread on a CUDA stream of their own, so batch i is decoded and scored while batch i + 1
samples; without it they run inline after each batch. Either way every image gets the score it
would get alone, so the stage's table does not depend on the choice.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch

from b2fast.core.policy import Policy
from b2fast.rewards import Reward, score_images
from b2fast.core.sampling import TrajectoryBatch


class StageScorer:
    """``submit`` each sampled batch; ``finish`` returns (images, rewards, captions) in order."""

    def __init__(self, policy: Policy, reward: Reward, overlap: bool, decode_batch: int = 0):
        self.policy, self.reward, self.decode_batch = policy, reward, decode_batch
        self.pending: list[Future] = []
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="b2fast-score") if overlap else None
        cuda = policy.device.type == "cuda"
        self.stream = torch.cuda.Stream(policy.device) if overlap and cuda else None

    def submit(self, batch: TrajectoryBatch) -> None:
        latents, prompts = batch.final_latents, list(batch.prompts)
        if self.pool is None:
            done: Future = Future()
            done.set_result(self._score(latents, prompts, None))
            self.pending.append(done)
            return
        ready = None
        if self.stream is not None:  # the worker's stream starts after the sampler's work so far
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.policy.device))
        self.pending.append(self.pool.submit(self._score, latents, prompts, ready))

    def _score(self, latents: torch.Tensor, prompts: list[str], ready):
        if self.stream is None:
            return self._decode_and_score(latents, prompts)
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(ready)
            images, rewards, captions = self._decode_and_score(latents, prompts)
            self.stream.synchronize()  # the images are complete before another stream reads them
            return images, rewards, captions

    def _decode_and_score(self, latents: torch.Tensor, prompts: list[str]):
        """(images on the CPU, rewards, captions): a stage's 512² images are 4 GB in fp32, which
        the GPU does not need to hold once they are scored (only sample grids read them)."""
        with torch.no_grad():
            images = self.policy.decode(latents, self.decode_batch)
        rewards = score_images(self.reward, images, prompts)
        captions = getattr(self.reward, "last_captions", None)
        captions = list(captions) if captions is not None and len(captions) == len(prompts) else None
        return images.cpu(), rewards, captions

    def finish(self) -> tuple[torch.Tensor, torch.Tensor, list[str] | None]:
        """Wait for every batch; a failure in the worker is raised here, in the caller."""
        try:
            results = [f.result() for f in self.pending]
        finally:
            self.pending = []
            if self.pool is not None:
                self.pool.shutdown(wait=True, cancel_futures=True)
        images = torch.cat([r[0] for r in results])
        rewards = torch.cat([r[1] for r in results])
        captions = None if any(r[2] is None for r in results) else [c for r in results for c in r[2]]
        return images, rewards, captions
