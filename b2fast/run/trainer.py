"""The B²-DiffuRL stage loop, in one process with every model loaded once.

Stage s: L_s = schedule(s) → sample ``sampling.batches_per_stage`` batches (trunk, fork,
branches) → reward → per-prompt z-scores over this and the last H stages → keep best/worst
branches → PPO-clip on their last L_s steps → log, grid, checkpoint. All randomness is drawn
from generators seeded by (seed, stage, purpose, index), so a resumed run repeats an
uninterrupted one exactly, and a run under ``torchrun`` gives the same results on any number of
ranks (see b2fast.distributed).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from b2fast import distributed
from b2fast.run.checkpoint import (TrainerState, adopt_checkpoint, find_checkpoint, load_checkpoint, rng_state,
                                   save_checkpoint, save_lora_folder, set_rng_state)
from b2fast.config import Config, TrainConfig, differences, dump_yaml, to_dict, validate
from b2fast.eval.evaluator import (EvalRow, default_eval_sets, evaluate_sets, format_comparison, format_rows,
                                   pick_prompts)
from b2fast.eval.stats import compare_rows
from b2fast.run.outputs import (TensorBoardLogger, log_metrics, log_samples, plot_reward_curve, save_comparison_grid,
                                save_grid, save_prompt_grid, truncate_metrics)
from b2fast.core.policy import Policy, hide_loading_progress
from b2fast.prompts import load_prompts, prompt_pool
from b2fast.rewards import build_reward
from b2fast.rewards.base import to_uint8
from b2fast.core.sampling import TrajectoryBatch, sample_branches
from b2fast.core.schedule import resolve_schedule, stage_lr
from b2fast.run.scoring import StageScorer
from b2fast.core.selection import (Selection, load_tracker_state, make_tracker, normalize_and_select,
                                   pair_stats)
from b2fast.run.stage_table import StageTable, gather_stage_table
from b2fast.core.update import auto_micro_batch, make_optimizer, policy_update, trained_positions
from b2fast.utils import atomic_write, atomic_write_text, check_writable, finite_json, one_line

PURPOSES = {"prompts": 0, "noise": 1, "shuffle": 2, "null": 3}
FINAL_NAME = "final.json"  # written last by _finish: the run's final outputs are complete
# Fields that may change on resume without changing what the run computes.
_RUN_ONLY = ("out:", "log.", "eval.", "checkpoint_every:", "keep_checkpoints:", "device:", "distributed.")
# The settings the evaluation before training depends on: eval_before.json is reused only if equal.
_EVAL_SETTINGS = ("seed", "model.path", "model.revision", "model.dtype", "prompts.source", "reward", "eval",
                  "sampling.scheduler", "sampling.num_steps", "sampling.guidance_scale", "sampling.eta",
                  "sampling.cache_dtype")


def stage_generator(seed: int, stage: int, purpose: str, index: int = 0,
                    device: torch.device | str = "cpu") -> torch.Generator:
    """An independent generator per (seed, stage, purpose, index), e.g. one per sampling batch."""
    entropy = np.random.SeedSequence([seed, stage, PURPOSES[purpose], index]).generate_state(2)
    return torch.Generator(device).manual_seed(int(entropy[0]) << 32 | int(entropy[1]))


class Trainer:
    """Owns the policy, reward, optimizer and reward history of one run (of this rank)."""

    def __init__(self, cfg: Config, resume: str | None = None):
        self.cfg = validate(cfg)
        self.out = Path(cfg.out)
        self.schedule = resolve_schedule(cfg.schedule.kind)
        self._check_schedule()
        self.prompt_pool = prompt_pool(cfg.prompts.source, cfg.prompts.split, cfg.prompts.sampling)
        self.prompts = self.prompt_pool.prompts
        self._check_eval_sets()
        checkpoint = find_checkpoint(resume) if resume else None
        self.world = distributed.world_from_env()
        if self.world.is_main:
            self._check_out(checkpoint)
        if cfg.sampling.batches_per_stage < self.world.size:
            raise ValueError(f"sampling.batches_per_stage: got {cfg.sampling.batches_per_stage}, expected at "
                             f"least one batch per rank ({self.world.size} ranks)")
        self.device = distributed.resolve_device(cfg.device, self.world)
        if not (cfg.log.progress and self.world.is_main):
            hide_loading_progress()
        distributed.init(self.device, cfg.distributed.backend, cfg.distributed.timeout_s, self.world)
        self.reward = build_reward(cfg.reward.name, cfg.reward.options, self.device)
        torch.manual_seed(cfg.seed)  # LoRA initialisation
        self.policy = Policy(cfg.model, self.device, cfg.sampling.num_steps, cfg.sampling.eta, cfg.sampling.scheduler)
        if cfg.train.gradient_checkpointing:
            self.policy.enable_gradient_checkpointing()
        distributed.broadcast_parameters(self.world, self.policy.lora_parameters())
        self.optimizer = make_optimizer(self.policy.lora_parameters(), cfg.train)
        self.history = make_tracker(cfg.selection)  # selection.kind's reward statistics
        self.micro_batch: int | None = None  # train.micro_batch = 0 resolved at the first update
        self.start_stage = 0
        if resume:
            self._resume(checkpoint)
        if self.world.is_main:  # rank 0 writes every output
            atomic_write_text(self.out / "config.yaml", dump_yaml(cfg))
        self.tensorboard = TensorBoardLogger(self.out) if cfg.log.tensorboard and self.world.is_main else None
        self.progress = cfg.log.progress and self.world.is_main
        self._grids: dict[str, dict] = {}  # evaluation label → its grid images (for before_after.png)

    # -- start-up checks: everything that can be wrong is found before any model loads ------------
    def _check_schedule(self) -> None:
        sc, steps = self.cfg.schedule, self.cfg.sampling.num_steps
        for stage in range(sc.num_stages):
            try:
                length = self.schedule(stage, sc.num_stages, sc.min_interval, sc.max_interval)
            except Exception as exc:  # a user's schedule function
                raise ValueError(f"schedule.kind: {sc.kind!r} failed for stage {stage} ({one_line(exc)}); it must be "
                                 "f(stage, num_stages, min_interval, max_interval) -> int") from None
            if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or not 1 <= length <= steps:
                raise ValueError(f"schedule.kind: {sc.kind!r} gives {length!r} for stage {stage}; expected an "
                                 f"integer in [1, sampling.num_steps={steps}]")

    def _check_eval_sets(self) -> None:
        ev = self.cfg.eval
        if not ev.enabled:
            return
        for name in ev.prompt_sets or default_eval_sets(self.cfg.prompts.source):
            for split in ev.splits:
                load_prompts(name, split, field="eval.prompt_sets")

    def _in_this_run(self, checkpoint: Path) -> bool:
        """Whether ``checkpoint`` (OUT/checkpoints/stage-N) belongs to the run in this output folder."""
        return checkpoint.parent.parent.resolve() == self.out.resolve()

    def _check_out(self, checkpoint: Path | None) -> None:
        """The output folder must be writable, and hold no other run than the one resumed. A run
        stopped before its first checkpoint cannot be resumed, so a new run may start over it:
        its partial metrics and samples are dropped (the rest is overwritten as the run goes)."""
        check_writable(self.out, "out", folder=True)
        holds_run = (self.out / "checkpoints" / "latest").is_file()
        resumed_here = checkpoint is not None and self._in_this_run(checkpoint)
        if holds_run and not resumed_here:
            raise ValueError(f"out: {str(self.out)!r} already holds a run; continue it with --resume {self.out}, "
                             "or choose another --out")
        if checkpoint is None:
            truncate_metrics(self.out, -1)

    def _resume(self, path: Path) -> None:
        ckpt, state = load_checkpoint(path, self.policy)
        self.optimizer.load_state_dict(state.optimizer)
        note = load_tracker_state(self.history, state.history, self.cfg.selection)
        if self.cfg.train.micro_batch == 0 and state.micro_batch:
            self.micro_batch = state.micro_batch  # measured again, it could round the accumulation otherwise
        set_rng_state(state.rng)
        self.start_stage = state.stage + 1
        if self.world.is_main:
            truncate_metrics(self.out, state.stage)
            print(f"resumed from {ckpt} at stage {self.start_stage}")
            if self._in_this_run(ckpt) and (dropped := adopt_checkpoint(ckpt)):
                print(f"removed the later checkpoints of the continuation this resume abandons: {', '.join(dropped)}")
            changed = [c for c in differences(state.config, to_dict(self.cfg)) if not c.startswith(_RUN_ONLY)]
            if changed:
                print(f"warning: resuming with settings that differ from the checkpoint's (the new values apply): "
                      f"{'; '.join(changed)}")
            if note:
                print(note)
            if self.micro_batch:
                print(f"train.micro_batch = {self.micro_batch} (automatic, as measured by the run before)")

    # -- one stage ------------------------------------------------------------------------------
    def interval_len(self, stage: int) -> int:
        sc = self.cfg.schedule
        return int(self.schedule(stage, sc.num_stages, sc.min_interval, sc.max_interval))

    def sample_stage(self, stage: int, interval_len: int) -> tuple[TrajectoryBatch, StageTable]:
        """Sample, decode and score this rank's share of the stage's batches, then gather every
        rank's rewards into the stage's table: (this rank's trajectories, the global table)."""
        s = self.cfg.sampling
        mine = self.world.shard(s.batches_per_stage)
        overlap = s.overlap_reward == "on" or (s.overlap_reward == "auto" and self.device.type == "cuda")
        scorer = StageScorer(self.policy, self.reward, overlap, s.unet_batch)
        batches = []
        for b in tqdm(mine, desc=f"stage {stage} sampling", leave=False, disable=not self.progress):
            picks = self.prompt_pool.draw(s.prompts_per_batch,
                                          stage_generator(self.cfg.seed, stage, "prompts", b))
            noise = stage_generator(self.cfg.seed, stage, "noise", b, self.device)
            batches.append(sample_branches(self.policy, [self.prompts[i] for i in picks.tolist()],
                                           picks, interval_len, s, noise, decode=False))
            scorer.submit(batches[-1])
        batch = TrajectoryBatch.cat(batches)
        batch.images, rewards, captions = scorer.finish()
        return batch, gather_stage_table(self.world, mine, batch, rewards, captions)

    def _train_config(self, batch: TrajectoryBatch) -> TrainConfig:
        """``cfg.train`` with an automatic micro-batch (0) resolved: measured once, at the first
        update, and the smallest over ranks so every rank splits its pairs alike."""
        if self.cfg.train.micro_batch == 0 and self.micro_batch is None:
            size = auto_micro_batch(self.policy, batch, self.cfg.train, self.cfg.sampling)
            self.micro_batch = distributed.min_int(self.world, size, "automatic micro-batch size")
            if self.world.is_main:
                how = "the most that fits in the free GPU memory" if self.device.type == "cuda" else "automatic on a CPU"
                tqdm.write(f"train.micro_batch = {self.micro_batch} ({how})")
        return dataclasses.replace(self.cfg.train, micro_batch=self.micro_batch or self.cfg.train.micro_batch)

    def run_stage(self, stage: int) -> dict:
        started = time.perf_counter()
        interval_len = self.interval_len(stage)
        batch, table = self.sample_stage(stage, interval_len)
        sampled = time.perf_counter()
        rewards = table.rewards
        finite = rewards[torch.isfinite(rewards)]
        if finite.numel() == 0:  # nothing to learn from: a broken reward, not a stage
            raise ValueError(f"stage {stage}: reward {self.cfg.reward.name!r} gave no finite score for any of the "
                             f"{len(table)} images; fix the reward")
        # records the stage in the history (b2) or DDPO's per-prompt buffers, then selects
        z, selection = normalize_and_select(self.history, self.cfg.selection, table.prompts, table.rewards,
                                            table.group_ids, stage_generator(self.cfg.seed, stage, "null"))
        train_cfg = self._train_config(batch)
        lr = stage_lr(self.cfg.train.lr, self.cfg.train.lr_schedule, stage, self.cfg.schedule.num_stages,
                      self.cfg.train.lr_warmup_stages)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        trained = int(trained_positions(self.policy, batch, train_cfg).sum())  # interval steps trained
        with tqdm(total=None, desc=f"stage {stage} training", leave=False, disable=not self.progress) as bar:
            stats = policy_update(self.policy, self.optimizer, batch, selection, train_cfg,
                                  self.cfg.sampling, stage_generator(self.cfg.seed, stage, "shuffle"), bar,
                                  self.world, table.local_rows)
        self._check_finite(stage, stats)
        record = {"stage": stage, "interval_len": interval_len, "trained_steps": trained,
                  "reward_mean": float(finite.mean()) if finite.numel() else None,
                  "reward_std": float(finite.std()) if finite.numel() > 1 else 0.0,
                  "lr": lr, "n_images": len(table), "n_nonfinite": int(rewards.numel() - finite.numel()),
                  "n_selected": len(selection), "n_positive": selection.n_positive,
                  "n_negative": selection.n_negative, **pair_stats(selection, table.rewards), **stats,
                  "ranks": self.world.size,
                  "seconds_sampling": sampled - started,  # sampling, decoding, rewards, gathering
                  "seconds_training": time.perf_counter() - sampled,
                  "seconds": time.perf_counter() - started}
        self._write_outputs(stage, batch, table, z, selection, record)
        return record

    def _check_finite(self, stage: int, stats: dict) -> None:
        """Stop before a checkpoint of diverged weights is written (one host sync per stage)."""
        if not bool(torch.stack([p.isfinite().all() for p in self.policy.lora_parameters()]).all()):
            raise ValueError(f"stage {stage}: the LoRA weights are no longer finite after the update (loss "
                             f"{stats.get('loss')}); lower train.lr or set train.max_grad_norm > 0, then --resume")

    def _write_outputs(self, stage: int, batch: TrajectoryBatch, table: StageTable, z: torch.Tensor,
                       selection: Selection, record: dict) -> None:
        """Rank 0 writes; every rank first checks that the LoRA weights agree before a checkpoint."""
        log = self.cfg.log
        last = stage == self.cfg.schedule.num_stages - 1
        checkpoint = (stage + 1) % self.cfg.checkpoint_every == 0 or last
        if checkpoint:
            distributed.check_in_sync(self.world, self.policy.lora_parameters(), f"stage {stage} checkpoint")
        if not self.world.is_main:
            return
        if log.grid_every and stage % log.grid_every == 0:  # rank 0's batches: 0, W, 2W, …
            save_grid(self.out / "images" / f"stage-{stage:06d}.png", batch.images[:log.grid_images],
                      batch.prompts[:log.grid_images])
        if log.samples:
            roles = {i: "positive" if pos else "negative"
                     for i, pos in zip(selection.indices.tolist(), selection.positive.tolist())}
            log_samples(self.out, stage, table.prompts, table.rewards, z, table.group_ids, roles, table.captions)
        log_metrics(self.out, record)  # before the checkpoint: a resume drops the lines of later stages
        if self.tensorboard:
            self.tensorboard.log(record)
        if checkpoint:
            state = TrainerState(stage=stage, optimizer=self.optimizer.state_dict(),
                                 history=self.history.state_dict(), rng=rng_state(), config=to_dict(self.cfg),
                                 micro_batch=self.micro_batch)
            save_checkpoint(self.out, self.policy, state, self.cfg.keep_checkpoints)

    # -- before/after evaluation ------------------------------------------------------------------
    def evaluate(self, label: str) -> list[EvalRow]:
        """Alignment table of the current weights (fixed seeds). The first prompt's images of each
        (set, split) go to ``images/<label>.png``, one labelled row each, and stay in
        ``_grids[label]`` (uint8 on the CPU, keyed by row label: prompt, set, split)."""
        ev = self.cfg.eval
        images: dict = {}
        if self.progress:
            tqdm.write(f"evaluating alignment ({label}): {ev.images_per_prompt} images per prompt ...")
        rows = evaluate_sets(self.policy, ev.prompt_sets or default_eval_sets(self.cfg.prompts.source),
                             ev.splits, {self.cfg.reward.name: self.reward}, self.cfg.sampling, ev.images_per_prompt,
                             ev.prompts_per_set, self.cfg.seed, images, progress=self.progress)
        grid = {f"{pick_prompts(load_prompts(name, split), ev.prompts_per_set)[0]}  ({name}, {split})":
                to_uint8(v[:ev.images_per_prompt])
                for (name, split), v in images.items()}
        save_prompt_grid(self.out / "images" / f"{label}.png", torch.cat(list(grid.values())).float() / 255,
                         list(grid), ev.images_per_prompt)
        self._grids[label] = grid
        return rows

    def _save_before_after(self) -> None:
        """images/before_after.png: per evaluated (set, split), its first prompt, then its images
        before | after training (same seeds); needs the before images of eval_before_images.pt."""
        before, after = self._grids.get("before"), self._grids["after"]
        if not isinstance(before, dict) or list(before) != list(after):
            print("note: no images/before_after.png: the images of the evaluation before training are "
                  "missing (eval_before_images.pt) or of other prompts")
            return
        save_comparison_grid(self.out / "images" / "before_after.png",
                             {"before": torch.cat(list(before.values())).float() / 255,
                              "after": torch.cat(list(after.values())).float() / 255},
                             list(after), self.cfg.eval.images_per_prompt)

    def _eval_settings(self) -> dict:
        """The config values the evaluation before training depends on, as plain JSON."""
        values = {name: functools.reduce(getattr, name.split("."), self.cfg) for name in _EVAL_SETTINGS}
        return json.loads(json.dumps({k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
                                      for k, v in values.items()}))

    def _evaluation_before(self) -> list[EvalRow]:
        """Evaluate the starting weights once: a resumed run (or a run into a folder holding an
        evaluation of the same model with the same settings) reads the stored result."""
        path = self.out / "eval_before.json"
        settings = self._eval_settings()
        try:
            stored = json.loads(path.read_text()) if path.is_file() else None
        except json.JSONDecodeError:
            stored = None
        grid_path = self.out / "eval_before_images.pt"  # for images/before_after.png after training
        if isinstance(stored, dict) and stored.get("settings") == settings:
            try:
                self._grids["before"] = torch.load(grid_path) if grid_path.is_file() else None
            except Exception:  # a damaged file only costs the picture
                self._grids["before"] = None
            return [EvalRow.from_dict(r) for r in stored["rows"]]
        with self.policy.base_weights():  # a resumed run's LoRA is not the starting point
            rows = self.evaluate("before")
        atomic_write(grid_path, lambda tmp: torch.save(self._grids["before"], tmp))
        atomic_write_text(path, json.dumps(finite_json({"settings": settings, "rows": [r.as_dict() for r in rows]}),
                                           indent=1, allow_nan=False))
        return rows

    # -- the run -----------------------------------------------------------------------------
    def run(self) -> list[dict]:
        """Every stage from ``start_stage``; the evaluations and final outputs happen on rank 0
        while the other ranks wait (within ``distributed.timeout_s``)."""
        records = []
        main = self.world.is_main
        trained = self.start_stage >= self.cfg.schedule.num_stages
        # rank 0's view of the output folder decides (the other ranks vote "finished")
        if trained and distributed.min_int(self.world, int(self._finished() or not main), "final outputs check"):
            if main:
                print(f"nothing to do: the run has all {self.cfg.schedule.num_stages} stages; raise "
                      "--schedule.num_stages to train further")
            return records
        if trained and main:
            print("the run has all its stages but a stop interrupted its final outputs: writing them now")
        before = self._evaluation_before() if self.cfg.eval.enabled and main else None
        if before is not None and not trained:
            print("alignment before training:\n" + format_rows({"before": before}) + "\n")
        distributed.barrier(self.world, "waiting for rank 0's evaluation before training")
        stages = range(self.start_stage, self.cfg.schedule.num_stages)
        for stage in tqdm(stages, desc="stages", disable=not self.progress):
            record = self.run_stage(stage)
            records.append(record)
            if main:
                tqdm.write(_summary_line(record))
        if main:
            self._finish(before)
        distributed.barrier(self.world, "waiting for rank 0's final outputs and evaluation")
        return records

    def _finished(self) -> bool:
        """Whether ``_finish`` wrote every final output of this stage count (final.json comes last)."""
        try:
            return json.loads((self.out / FINAL_NAME).read_text())["stages"] == self.cfg.schedule.num_stages
        except (OSError, ValueError, KeyError, TypeError):
            return False

    def _finish(self, before: list[EvalRow] | None) -> None:
        """Reward curve, final LoRA folder and the after-training evaluation (rank 0)."""
        plot_reward_curve(self.out)
        save_lora_folder(self.policy, self.out / "lora")
        if before is not None:
            after = self.evaluate("after")
            self._save_before_after()
            atomic_write_text(self.out / "eval.json", json.dumps(finite_json(
                {"before": [r.as_dict() for r in before], "after": [r.as_dict() for r in after],
                 "differences": compare_rows(before, after)}), indent=1, allow_nan=False))
            print("\nalignment before and after training (same seeds):\n"
                  + format_comparison({"before": before, "after": after}))
        atomic_write_text(self.out / FINAL_NAME, json.dumps({"stages": self.cfg.schedule.num_stages}) + "\n")
        if self.tensorboard:
            self.tensorboard.close()


def _summary_line(r: dict) -> str:
    def fmt(v):
        return "-" if v is None else f"{v:.4g}"
    # an objective's own statistics, when it reports them (pair objectives: accuracy, errors)
    extra = "".join(f"  {label} {fmt(r[key])}" for key, label in
                    (("accuracy", "acc"), ("error_winner", "err+"), ("error_loser", "err-")) if r.get(key) is not None)
    nonfinite = f" ({r['n_nonfinite']} non-finite dropped)" if r.get("n_nonfinite") else ""
    return (f"stage {r['stage']:3d}  L={r['interval_len']:2d}  reward {fmt(r['reward_mean'])} "
            f"± {fmt(r['reward_std'])}{nonfinite}  kept {r['n_selected']:4d}  loss {fmt(r['loss'])}  "
            f"kl {fmt(r['approx_kl'])}{' (stopped)' if r.get('kl_stopped') else ''}  clip {fmt(r['clipfrac'])}"
            f"{extra}  {r['seconds']:.1f}s "
            f"(sampling {r['seconds_sampling']:.1f}s)")
