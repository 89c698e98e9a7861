"""The B²-DiffuRL stage loop, in one process with every model loaded once.

Stage s: L_s = schedule(s) → sample 32 batches (trunk, fork, branches) → reward → per-prompt
z-scores over this and the last H stages → keep best/worst branches → PPO-clip on their last
L_s steps → log, grid, checkpoint. All randomness is drawn from generators seeded by
(seed, stage, purpose, index), so a resumed run repeats an uninterrupted one exactly.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from b2fast.checkpoint import (TrainerState, load_checkpoint, rng_state, save_checkpoint,
                               save_lora_folder, set_rng_state)
from b2fast.config import Config, dump_yaml, to_dict, validate
from b2fast.evaluation import EvalRow, default_eval_sets, evaluate_sets, format_rows
from b2fast.outputs import (TensorBoardLogger, log_captions, log_metrics, plot_reward_curve, save_grid,
                            truncate_metrics)
from b2fast.policy import Policy
from b2fast.prompts import load_prompts
from b2fast.rewards import build_reward, score_images
from b2fast.sampling import TrajectoryBatch, sample_branches
from b2fast.schedule import resolve_schedule
from b2fast.selection import RewardHistory, normalize_stage, select
from b2fast.update import make_optimizer, policy_update
from b2fast.utils import atomic_write_text

PURPOSES = {"prompts": 0, "noise": 1, "shuffle": 2}


def stage_generator(seed: int, stage: int, purpose: str, index: int = 0,
                    device: torch.device | str = "cpu") -> torch.Generator:
    """An independent generator per (seed, stage, purpose, index), e.g. one per sampling batch."""
    entropy = np.random.SeedSequence([seed, stage, PURPOSES[purpose], index]).generate_state(2)
    return torch.Generator(device).manual_seed(int(entropy[0]) << 32 | int(entropy[1]))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device: {name!r} requested but CUDA is not available; use --device cpu")
    return torch.device(name)


class Trainer:
    """Owns the policy, reward, optimizer and reward history of one run."""

    def __init__(self, cfg: Config, resume: str | None = None):
        self.cfg = validate(cfg)
        self.out = Path(cfg.out)
        self.schedule = resolve_schedule(cfg.schedule.kind)
        self.prompts = load_prompts(cfg.prompts.source, cfg.prompts.split)
        self.device = resolve_device(cfg.device)
        self.reward = build_reward(cfg.reward.name, cfg.reward.options, self.device)
        torch.manual_seed(cfg.seed)  # LoRA initialisation
        self.policy = Policy(cfg.model, self.device, cfg.sampling.num_steps, cfg.sampling.eta)
        self.optimizer = make_optimizer(self.policy.lora_parameters(), cfg.train)
        self.history = RewardHistory(cfg.selection.history_stages)
        self.start_stage = 0
        if resume:
            self._resume(resume)
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.out / "config.yaml", dump_yaml(cfg))
        self.tensorboard = TensorBoardLogger(self.out) if cfg.log.tensorboard else None

    def _resume(self, path: str) -> None:
        ckpt, state = load_checkpoint(path, self.policy)
        self.optimizer.load_state_dict(state.optimizer)
        self.history.load_state_dict(state.history)
        set_rng_state(state.rng)
        self.start_stage = state.stage + 1
        truncate_metrics(self.out, state.stage)
        print(f"resumed from {ckpt} at stage {self.start_stage}")

    # -- one stage ------------------------------------------------------------------------------
    def interval_len(self, stage: int) -> int:
        sc = self.cfg.schedule
        return int(self.schedule(stage, sc.num_stages, sc.min_interval, sc.max_interval))

    def sample_stage(self, stage: int, interval_len: int) -> TrajectoryBatch:
        s = self.cfg.sampling
        batches = []
        bar = tqdm(range(s.batches_per_stage), desc=f"stage {stage} sampling", leave=False,
                   disable=not self.cfg.log.progress)
        for b in bar:
            picks = torch.randint(len(self.prompts), (s.prompts_per_batch,),
                                  generator=stage_generator(self.cfg.seed, stage, "prompts", b))
            noise = stage_generator(self.cfg.seed, stage, "noise", b, self.device)
            batches.append(sample_branches(self.policy, [self.prompts[i] for i in picks.tolist()],
                                           picks, interval_len, s, noise))
        return TrajectoryBatch.cat(batches)

    def run_stage(self, stage: int) -> dict:
        started = time.perf_counter()
        interval_len = self.interval_len(stage)
        batch = self.sample_stage(stage, interval_len)
        rewards = score_images(self.reward, batch.images, batch.prompts)
        captions = getattr(self.reward, "last_captions", None)
        if captions and len(captions) == len(batch):
            log_captions(self.out, stage, batch.prompts, captions, rewards)
        z = normalize_stage(self.history, batch.prompts, rewards)
        selection = select(z, batch.group_ids.cpu(), self.cfg.selection.pos_threshold,
                           self.cfg.selection.neg_threshold)
        n_pairs = len(selection) * interval_len * self.cfg.train.epochs
        with tqdm(total=n_pairs, desc=f"stage {stage} training", leave=False,
                  disable=not self.cfg.log.progress) as bar:
            stats = policy_update(self.policy, self.optimizer, batch, selection, self.cfg.train,
                                  self.cfg.sampling, stage_generator(self.cfg.seed, stage, "shuffle"), bar)
        finite = rewards[torch.isfinite(rewards)]
        record = {"stage": stage, "interval_len": interval_len,
                  "reward_mean": float(finite.mean()) if finite.numel() else None,
                  "reward_std": float(finite.std()) if finite.numel() > 1 else 0.0,
                  "n_images": len(batch), "n_nonfinite": int(rewards.numel() - finite.numel()),
                  "n_selected": len(selection), "n_positive": selection.n_positive,
                  "n_negative": selection.n_negative, **stats,
                  "seconds": time.perf_counter() - started}
        self._write_outputs(stage, batch, record)
        return record

    def _write_outputs(self, stage: int, batch: TrajectoryBatch, record: dict) -> None:
        log = self.cfg.log
        if log.grid_every and stage % log.grid_every == 0:
            save_grid(self.out / "images" / f"stage-{stage:06d}.png", batch.images[:log.grid_images])
        last = stage == self.cfg.schedule.num_stages - 1
        if (stage + 1) % self.cfg.checkpoint_every == 0 or last:
            state = TrainerState(stage=stage, optimizer=self.optimizer.state_dict(),
                                 history=self.history.state_dict(), rng=rng_state(), config=to_dict(self.cfg))
            save_checkpoint(self.out, self.policy, state, self.cfg.keep_checkpoints)
        log_metrics(self.out, record)
        if self.tensorboard:
            self.tensorboard.log(record)

    # -- before/after evaluation ------------------------------------------------------------------
    def evaluate(self, label: str) -> list[EvalRow]:
        """Alignment table of the current weights (fixed seeds); grid of each set's first prompt."""
        ev = self.cfg.eval
        images: dict = {}
        rows = evaluate_sets(self.policy, ev.prompt_sets or default_eval_sets(self.cfg.prompts.source),
                             ev.splits, self.reward, self.cfg.sampling, ev.images_per_prompt,
                             ev.prompts_per_set, self.cfg.seed, images)
        first = torch.cat([v[:ev.images_per_prompt] for v in images.values()])
        save_grid(self.out / "images" / f"{label}.png", first, columns=ev.images_per_prompt)
        return rows

    def _evaluation_before(self) -> list[EvalRow]:
        """Evaluate the starting weights once; a resumed run reads the stored result."""
        path = self.out / "eval_before.json"
        if path.is_file():
            return [EvalRow(**r) for r in json.loads(path.read_text())]
        rows = self.evaluate("before")
        atomic_write_text(path, json.dumps([r.as_dict() for r in rows], indent=1))
        return rows

    # -- the run -----------------------------------------------------------------------------
    def run(self) -> list[dict]:
        records = []
        before = self._evaluation_before() if self.cfg.eval.enabled else None
        stages = range(self.start_stage, self.cfg.schedule.num_stages)
        for stage in tqdm(stages, desc="stages", disable=not self.cfg.log.progress):
            record = self.run_stage(stage)
            records.append(record)
            tqdm.write(_summary_line(record))
        plot_reward_curve(self.out)
        save_lora_folder(self.policy, self.out / "lora")
        if before is not None:
            after = self.evaluate("after")
            atomic_write_text(self.out / "eval.json", json.dumps(
                {"before": [r.as_dict() for r in before], "after": [r.as_dict() for r in after]}, indent=1))
            print("\nalignment before and after training (same seeds):\n"
                  + format_rows({"before": before, "after": after}))
        if self.tensorboard:
            self.tensorboard.close()
        return records


def _summary_line(r: dict) -> str:
    def fmt(v):
        return "-" if v is None else f"{v:.4g}"
    return (f"stage {r['stage']:3d}  L={r['interval_len']:2d}  reward {fmt(r['reward_mean'])} "
            f"± {fmt(r['reward_std'])}  kept {r['n_selected']:4d}  loss {fmt(r['loss'])}  "
            f"kl {fmt(r['approx_kl'])}  clip {fmt(r['clipfrac'])}  {r['seconds']:.1f}s")
