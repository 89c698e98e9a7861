"""``python -m b2fast.toy.distill_lcm``: distil the toy model into a latent consistency model.

Consistency distillation with exact targets: the consistency function of the teacher's
probability-flow ODE maps every point of an ODE trajectory to that trajectory's end, so the
student learns it by regression on solved trajectories. The frozen teacher (20-step-quality
DDIM, η = 0, CFG scale 1 + w with w drawn per trajectory) solves ``--trajectories`` trajectories
from fresh noise over the 50-step LCM grid (t = 999, 979, …, 19; UNet calls every other grid
point, the points between by the DDIM interpolation of the same x̂0 and ε̂); the student
f(x_t, t, w) = c_skip(t)·x_t + c_out(t)·x̂0 then regresses each trajectory's end from its grid
points, and the EMA of its weights is saved. The student is the teacher's UNet plus a guidance
embedding (``time_cond_proj_dim``: w is an input, one UNet pass per step), initialised from
the teacher, and it predicts v, not ε: on the toy's cosine schedule √ᾱ at t = 999 is 5e-5, so
an ε-prediction's error would reach x̂0 amplified 20,000×.

Where this differs from LCM's Algorithm 1 (LCD: one DDIM step of the teacher, the EMA target's
f at t − 20 as the target): the targets here are the ODE's own ends, not bootstrapped, which on
the toy converges an order of magnitude faster (LCD reached toy_align 0.03 at K = 4 after 22 CPU
minutes; this matches the teacher in 7). It needs whole teacher trajectories, which only a small
model makes cheap. The text encoder and tokenizer are the teacher's, unchanged. The result is a
diffusers folder with an ``LCMScheduler``; ``--sampling.scheduler lcm`` samples it. At the end it
measures ``toy_align`` at K = 2, 4, 8 steps against the 20-step DDIM teacher and writes a model
card.
"""
from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from b2fast.core.policy import guidance_embedding
from b2fast.toy.model import SCHEDULER, TEXT_LENGTH
from b2fast.distributed import resolve_device
from b2fast.toy.pretrain import add_run_arguments, measure_alignment, training_batch, validate_run_arguments
from b2fast.utils import atomic_write_folder, one_line_warnings, stop_on_interrupt

GUIDANCE_DIM = 64       # the toy UNet's time-embedding width (4 × 16 channels)
ORIGIN_STEPS = 50       # the LCM grid: t ∈ {19, 39, …, 999}, 20 apart
SOLVE_BATCH = 128       # trajectories the teacher solves at once


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m b2fast.toy.distill_lcm", description=__doc__.split("\n\n")[0])
    add_run_arguments(p, out="runs/toy-lcm", steps=800, batch_size=64, lr=5e-4, ema=0.99)
    p.add_argument("--teacher", default="b2fast:toy", help="diffusers folder of the DDIM toy model (default: %(default)s)")
    p.add_argument("--trajectories", type=int, default=1024,
                   help="teacher ODE trajectories solved before training (default: %(default)s)")
    p.add_argument("--w-min", type=float, default=2.0, help="smallest guidance w (CFG scale 1 + w; default: %(default)s)")
    p.add_argument("--w-max", type=float, default=7.0, help="largest guidance w (default: %(default)s)")
    return p


def _validate(args: argparse.Namespace) -> None:
    validate_run_arguments(args)
    if args.trajectories < 1:
        raise ValueError(f"--trajectories: got {args.trajectories}, expected an integer >= 1")
    if not 0 <= args.w_min <= args.w_max:
        raise ValueError(f"--w-min/--w-max: got {args.w_min}, {args.w_max}; expected 0 <= w-min <= w-max")


def boundary_scalings(t: torch.Tensor, timestep_scaling: float = 10.0, sigma_data: float = 0.5):
    """(c_skip, c_out) of the consistency function at integer timesteps t (diffusers' LCMScheduler)."""
    scaled = t.double() * timestep_scaling
    c_skip = sigma_data ** 2 / (scaled ** 2 + sigma_data ** 2)
    c_out = scaled / (scaled ** 2 + sigma_data ** 2).sqrt()
    return c_skip.float().view(-1, 1, 1, 1), c_out.float().view(-1, 1, 1, 1)


def grid_timestep(index: torch.Tensor) -> torch.Tensor:
    """LCM grid index 0…49 → timestep 19…999."""
    stride = 1000 // ORIGIN_STEPS
    return (index + 1) * stride - 1


class Trajectories:
    """Solved teacher trajectories: ``points`` (N, 50, C, H, W) fp16 at the grid timesteps,
    ``ends`` (N, C, H, W), and per trajectory its text embedding ``cond`` and guidance ``w``."""

    def __init__(self, points: torch.Tensor, ends: torch.Tensor, cond: torch.Tensor, w: torch.Tensor):
        self.points, self.ends, self.cond, self.w = points, ends, cond, w

    def batch(self, n: int, generator: torch.Generator, device: torch.device):
        """n random (trajectory, grid point) pairs: x_t, t, cond, w and the trajectory's end."""
        j = torch.randint(0, len(self.w), (n,), generator=generator)
        i = torch.randint(0, ORIGIN_STEPS, (n,), generator=generator)
        return (self.points[j, i].float().to(device), grid_timestep(i).to(device), self.cond[j].to(device),
                self.w[j].to(device), self.ends[j].to(device))


class Distiller:
    """Frozen teacher UNet and text encoder, the student and the EMA of its weights."""

    def __init__(self, teacher: Path, args: argparse.Namespace, device: torch.device):
        from diffusers import DDIMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        self.device, self.args = device, args
        self.tokenizer = CLIPTokenizer.from_pretrained(teacher / "tokenizer")
        self.text = CLIPTextModel.from_pretrained(teacher / "text_encoder").to(device).eval().requires_grad_(False)
        self.teacher = UNet2DConditionModel.from_pretrained(teacher / "unet").to(device).eval().requires_grad_(False)
        scheduler = DDIMScheduler.from_pretrained(teacher / "scheduler")
        self.alphas = scheduler.alphas_cumprod.to(device)
        self.teacher_predicts_v = scheduler.config.prediction_type == "v_prediction"
        torch.manual_seed(args.seed)
        config = {k: v for k, v in self.teacher.config.items() if not k.startswith("_")}  # not the teacher's path
        self.student = UNet2DConditionModel.from_config({**config, "time_cond_proj_dim": GUIDANCE_DIM})
        missing, unexpected = self.student.load_state_dict(self.teacher.state_dict(), strict=False)
        if unexpected or not all("cond_proj" in k for k in missing):
            raise ValueError(f"--teacher: its UNet does not match the student ({missing}, {unexpected})")
        self.student.to(device).train()
        self.ema = copy.deepcopy(self.student).eval().requires_grad_(False)
        self.optimizer = torch.optim.AdamW(self.student.parameters(), lr=args.lr, weight_decay=0.0)
        self.uncond = self._embed([""])

    def _embed(self, prompts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(prompts, padding="max_length", max_length=TEXT_LENGTH, truncation=True,
                             return_tensors="pt").input_ids.to(self.device)
        with torch.no_grad():
            return self.text(ids)[0]

    def _sqrt_ab(self, t: int) -> tuple[float, float]:
        ab = self.alphas[t].item() if t >= 0 else 1.0
        return ab ** 0.5, (1 - ab) ** 0.5

    @torch.no_grad()
    def solve(self, prompts: list[str], w: torch.Tensor, generator: torch.Generator) -> Trajectories:
        """The teacher's DDIM (η = 0, x̂0 clipped as its scheduler does) from fresh noise, recorded
        at every grid timestep: UNet calls at 999, 959, …, 39 and the interpolated point 20 below."""
        n, stride = len(prompts), 1000 // ORIGIN_STEPS
        cond = self._embed(prompts)
        text = torch.cat([self.uncond.expand(n, -1, -1), cond])
        scale = w.to(self.device).view(-1, 1, 1, 1)
        x = torch.randn((n, 3, self.teacher.config.sample_size, self.teacher.config.sample_size),
                        generator=generator).to(self.device)
        points = torch.empty((n, ORIGIN_STEPS) + x.shape[1:], dtype=torch.float16)
        for t in range(1000 - 1, 0, -2 * stride):
            index = (t + 1) // stride - 1
            points[:, index] = x.cpu().half()
            out_u, out_c = self.teacher(torch.cat([x, x]), torch.full((2 * n,), t, device=self.device),
                                        encoder_hidden_states=text).sample.chunk(2)
            out = out_c + scale * (out_c - out_u)                                       # CFG scale 1 + w
            a, b = self._sqrt_ab(t)
            if self.teacher_predicts_v:                                                 # v = a·ε − b·x0
                eps, x0 = a * out + b * x, (a * x - b * out).clamp(-1, 1)
            else:
                eps, x0 = out, ((x - b * out) / a).clamp(-1, 1)
            a, b = self._sqrt_ab(t - stride)
            points[:, index - 1] = (a * x0 + b * eps).cpu().half()
            a, b = self._sqrt_ab(t - 2 * stride)
            x = a * x0 + b * eps if t - 2 * stride >= 0 else x0
        return Trajectories(points, x.cpu(), cond.cpu(), w.cpu())

    def step(self, data: Trajectories, generator: torch.Generator) -> float:
        """One regression step of f(x_t, t, w) onto the trajectories' ends."""
        x_t, t, cond, w, end = data.batch(self.args.batch_size, generator, self.device)
        v = self.student(x_t, t, encoder_hidden_states=cond, timestep_cond=guidance_embedding(w, GUIDANCE_DIM)).sample
        ab = self.alphas[t].view(-1, 1, 1, 1)
        c_skip, c_out = boundary_scalings(t)
        f = c_skip * x_t + c_out * (ab.sqrt() * x_t - (1 - ab).sqrt() * v)
        loss = F.mse_loss(f, end)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.student.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for e, p in zip(self.ema.parameters(), self.student.parameters()):
                e.lerp_(p, 1 - self.args.ema)
        return float(loss.detach())

    def save(self, teacher: Path, folder: Path) -> None:
        """The student's EMA weights beside the teacher's text side, with an LCMScheduler."""
        from diffusers import LCMScheduler

        for name in ("text_encoder", "tokenizer"):
            shutil.copytree(teacher / name, folder / name)
        shutil.copy(teacher / "model_index.json", folder / "model_index.json")
        self.ema.save_pretrained(folder / "unet")
        LCMScheduler(**{**SCHEDULER, "clip_sample": False, "prediction_type": "v_prediction"}).save_pretrained(
            folder / "scheduler")


def distil(args: argparse.Namespace, device: torch.device, teacher: Path, folder: Path) -> dict:
    distiller = Distiller(teacher, args, device)
    rng = np.random.default_rng(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    started = time.perf_counter()
    parts = []
    for first in tqdm(range(0, args.trajectories, SOLVE_BATCH), desc="solving teacher trajectories"):
        _, prompts = training_batch(rng, min(SOLVE_BATCH, args.trajectories - first), 0.0)
        w = args.w_min + (args.w_max - args.w_min) * torch.rand(len(prompts), generator=generator)
        parts.append(distiller.solve(prompts, w, generator))
    data = Trajectories(*(torch.cat([getattr(p, k) for p in parts]) for k in ("points", "ends", "cond", "w")))
    solved = time.perf_counter() - started
    losses = []
    bar = tqdm(range(args.steps), desc="distilling")
    for step in bar:
        losses.append(distiller.step(data, generator))
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.5f}")
    distiller.save(teacher, folder)
    return {"trajectories": args.trajectories, "steps": args.steps, "final_loss": float(np.mean(losses[-100:])),
            "solve_seconds": solved, "seconds": time.perf_counter() - started}


def _mean(rows: list[dict], key: str) -> float:
    return float(np.mean([r[key] for r in rows])) if rows else float("nan")


def model_card(args, argv: list[str], stats: dict, device: torch.device, results: dict) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    lines = "\n".join(f"| {label} | {_mean(rows, 'score'):.3f} | {_mean(rows, 'success'):.3f} |"
                      for label, rows in results.items())
    return f"""# b2fast toy latent consistency model

The b2fast toy model distilled into a latent consistency model (consistency distillation by
regression on the teacher's ODE trajectories, pixel space): the same text encoder and
tokenizer, a UNet with a guidance embedding, and diffusers' `LCMScheduler`. Load it as
`model.path: "b2fast:toy-lcm"`.
Sample it in 2–8 steps with `--sampling.scheduler lcm --sampling.num_steps 4`.

| | |
|---|---|
| command | `python -m b2fast.toy.distill_lcm {' '.join(argv)}` |
| teacher | `{args.teacher}` (20-step DDIM, CFG) |
| seed | {args.seed} |
| teacher trajectories | {args.trajectories} (DDIM, η = 0, 25 UNet steps, CFG scale 1 + w, w ∈ [{args.w_min}, {args.w_max}]) |
| steps × batch | {args.steps} × {args.batch_size}, lr {args.lr}, EMA {args.ema} |
| final loss (mean of last 100 steps) | {stats['final_loss']:.5f} |
| distillation time | {stats['seconds'] / 60:.1f} min ({stats['solve_seconds'] / 60:.1f} solving) on {name} (torch {torch.__version__}) |

## Alignment against the teacher

`toy_align`, mean over the three templates and both splits of {args.eval_images} images per
prompt for up to {args.eval_prompts} prompts per template and split, guidance scale
{args.guidance_scale}, seed {args.seed}:

| sampler | score | success |
|---|---|---|
{lines}
"""


@stop_on_interrupt("--out is unchanged (the model is written when distillation ends)")
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    one_line_warnings()
    args = _parser().parse_args(argv)
    try:
        _validate(args)
        from b2fast.core.policy import resolve_model_path
        teacher = Path(resolve_model_path(args.teacher))
        device = resolve_device(args.device)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    def build(folder: Path) -> None:
        stats = distil(args, device, teacher, folder)
        results = {}
        if args.eval_images:
            results["teacher, DDIM 20 steps"] = measure_alignment(teacher, device, args)
            for k in (2, 4, 8):
                results[f"LCM, {k} steps"] = measure_alignment(folder, device, args, "lcm", k)
        (folder / "alignment.json").write_text(json.dumps({"distillation": stats, "alignment": results}, indent=2))
        (folder / "README.md").write_text(model_card(args, argv, stats, device, results))

    atomic_write_folder(Path(args.out), build)  # a killed run leaves the old model or the new one
    print((Path(args.out) / "README.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
