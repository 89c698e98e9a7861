"""``python -m b2fast.toy.distill_lcm``: distil the toy model into a latent consistency model.

Latent consistency distillation (Luo et al., "Latent Consistency Models", Algorithm 1, in pixel
space here): the student is the teacher's UNet plus a guidance embedding (``time_cond_proj_dim``,
so w is an input and sampling needs one UNet pass per step), initialised from the teacher, and it
predicts v, not ε: on the toy's cosine schedule √ᾱ at t = 999 (the LCM grid's first step) is
5e-5, so an ε-prediction's error would reach x̂0 amplified 20,000×. Each
step renders fresh training scenes, noises them to t from the 50-step LCM grid, and trains the
student's consistency function f(x_t, t, w) = c_skip(t)·x_t + c_out(t)·x̂0 to match the EMA
target's f at t − 20, where x_{t−20} is the frozen teacher's DDIM step (η = 0) with CFG scale
1 + w, w drawn per example. The text encoder and tokenizer are the teacher's, unchanged. The
result is a diffusers folder with an ``LCMScheduler``; ``--sampling.scheduler lcm`` samples it.
At the end it measures ``toy_align`` at K = 2, 4, 8 steps against the 20-step DDIM teacher and
writes a model card.
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
from b2fast.toy.pretrain import (_training_batch, add_run_arguments, measure_alignment, resolve_device,
                                 validate_run_arguments, write_model_folder)
from b2fast.utils import one_line_warnings

GUIDANCE_DIM = 64       # the toy UNet's time-embedding width (4 × 16 channels)
ORIGIN_STEPS = 50       # the LCM grid: t ∈ {19, 39, …, 999}, skipping 20 steps


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m b2fast.toy.distill_lcm", description=__doc__.split("\n\n")[0])
    add_run_arguments(p, out="runs/toy-lcm", steps=1800, batch_size=48, lr=5e-4, ema=0.95)
    p.add_argument("--teacher", default="b2fast:toy", help="diffusers folder of the DDIM toy model (default: %(default)s)")
    p.add_argument("--w-min", type=float, default=2.0, help="smallest guidance w (CFG scale 1 + w; default: %(default)s)")
    p.add_argument("--w-max", type=float, default=7.0, help="largest guidance w (default: %(default)s)")
    return p


def _validate(args: argparse.Namespace) -> None:
    validate_run_arguments(args)
    if not 0 <= args.w_min <= args.w_max:
        raise ValueError(f"--w-min/--w-max: got {args.w_min}, {args.w_max}; expected 0 <= w-min <= w-max")


def boundary_scalings(t: torch.Tensor, timestep_scaling: float = 10.0, sigma_data: float = 0.5):
    """(c_skip, c_out) of the consistency function at integer timesteps t (diffusers' LCMScheduler)."""
    scaled = t.double() * timestep_scaling
    c_skip = sigma_data ** 2 / (scaled ** 2 + sigma_data ** 2)
    c_out = scaled / (scaled ** 2 + sigma_data ** 2).sqrt()
    return c_skip.float().view(-1, 1, 1, 1), c_out.float().view(-1, 1, 1, 1)


class Distiller:
    """Frozen teacher UNet and text encoder, the student and its EMA target."""

    def __init__(self, teacher: Path, args: argparse.Namespace, device: torch.device):
        from diffusers import DDIMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        self.device, self.args = device, args
        self.tokenizer = CLIPTokenizer.from_pretrained(teacher / "tokenizer")
        self.text = CLIPTextModel.from_pretrained(teacher / "text_encoder").to(device).eval().requires_grad_(False)
        self.teacher = UNet2DConditionModel.from_pretrained(teacher / "unet").to(device).eval().requires_grad_(False)
        self.alphas = DDIMScheduler.from_pretrained(teacher / "scheduler").alphas_cumprod.to(device)
        torch.manual_seed(args.seed)
        self.student = UNet2DConditionModel.from_config({**self.teacher.config, "time_cond_proj_dim": GUIDANCE_DIM})
        missing, unexpected = self.student.load_state_dict(self.teacher.state_dict(), strict=False)
        if unexpected or not all("cond_proj" in k for k in missing):
            raise ValueError(f"--teacher: its UNet does not match the student ({missing}, {unexpected})")
        self.student.to(device).train()
        self.target = copy.deepcopy(self.student).eval().requires_grad_(False)
        self.optimizer = torch.optim.AdamW(self.student.parameters(), lr=args.lr, weight_decay=0.0)
        self.uncond = self._embed([""])

    def _embed(self, prompts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(prompts, padding="max_length", max_length=TEXT_LENGTH, truncation=True,
                             return_tensors="pt").input_ids.to(self.device)
        with torch.no_grad():
            return self.text(ids)[0]

    def _x0(self, x_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = self.alphas[t].view(-1, 1, 1, 1)
        return (x_t - (1 - ab).sqrt() * eps) / ab.sqrt()

    def _consistency(self, unet, x_t, t, cond, w_emb) -> torch.Tensor:
        """f(x_t, t, w) = c_skip(t)·x_t + c_out(t)·x̂0, x̂0 = √ᾱ_t·x_t − √(1−ᾱ_t)·v_θ(x_t, t, c, w)."""
        v = unet(x_t, t, encoder_hidden_states=cond, timestep_cond=w_emb).sample
        ab = self.alphas[t].view(-1, 1, 1, 1)
        c_skip, c_out = boundary_scalings(t)
        return c_skip * x_t + c_out * (ab.sqrt() * x_t - (1 - ab).sqrt() * v)

    def step(self, images: torch.Tensor, prompts: list[str], generator: torch.Generator) -> float:
        n, stride = images.shape[0], len(self.alphas) // ORIGIN_STEPS
        x0 = images.to(self.device) * 2 - 1
        cond = self._embed(prompts)
        index = torch.randint(0, ORIGIN_STEPS, (n,), generator=generator)
        t = ((index + 1) * stride - 1).to(self.device)                         # 19, 39, …, 999
        t_prev = (t - stride).clamp(min=0)
        w = (self.args.w_min + (self.args.w_max - self.args.w_min) * torch.rand(n, generator=generator)).to(self.device)
        w_emb = guidance_embedding(w, GUIDANCE_DIM)
        noise = torch.randn(x0.shape, generator=generator).to(self.device)
        ab = self.alphas[t].view(-1, 1, 1, 1)
        x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        prediction = self._consistency(self.student, x_t, t, cond, w_emb)
        with torch.no_grad():
            both = self.teacher(torch.cat([x_t, x_t]), torch.cat([t, t]),
                                encoder_hidden_states=torch.cat([self.uncond.expand(n, -1, -1), cond])).sample
            eps_u, eps_c = both.chunk(2)
            eps = eps_c + w.view(-1, 1, 1, 1) * (eps_c - eps_u)               # CFG scale 1 + w
            x0_hat = self._x0(x_t, eps, t).clamp(-1, 1)
            ab_prev = self.alphas[t_prev].view(-1, 1, 1, 1)
            x_prev = ab_prev.sqrt() * x0_hat + (1 - ab_prev).sqrt() * eps        # DDIM, η = 0
            target = self._consistency(self.target, x_prev, t_prev, cond, w_emb)
        loss = F.mse_loss(prediction, target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.student.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for e, p in zip(self.target.parameters(), self.student.parameters()):
                e.lerp_(p, 1 - self.args.ema)
        return float(loss.detach())

    def save(self, teacher: Path, folder: Path) -> None:
        """The student (the target's EMA weights, as LCD ships) beside the teacher's text side."""
        from diffusers import LCMScheduler

        for name in ("text_encoder", "tokenizer"):
            shutil.copytree(teacher / name, folder / name)
        shutil.copy(teacher / "model_index.json", folder / "model_index.json")
        self.target.save_pretrained(folder / "unet")
        LCMScheduler(**{**SCHEDULER, "clip_sample": False, "prediction_type": "v_prediction"}).save_pretrained(
            folder / "scheduler")


def distil(args: argparse.Namespace, device: torch.device, teacher: Path, folder: Path) -> dict:
    distiller = Distiller(teacher, args, device)
    rng = np.random.default_rng(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    losses, started = [], time.perf_counter()
    bar = tqdm(range(args.steps), desc="distilling")
    for step in bar:
        images, prompts = _training_batch(rng, args.batch_size, 0.0)
        losses.append(distiller.step(images, prompts, generator))
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.5f}")
    distiller.save(teacher, folder)
    return {"steps": args.steps, "final_loss": float(np.mean(losses[-100:])), "seconds": time.perf_counter() - started}


def _mean(rows: list[dict], key: str) -> float:
    return float(np.mean([r[key] for r in rows])) if rows else float("nan")


def model_card(args, argv: list[str], stats: dict, device: torch.device, results: dict) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    lines = "\n".join(f"| {label} | {_mean(rows, 'score'):.3f} | {_mean(rows, 'success'):.3f} |"
                      for label, rows in results.items())
    return f"""# b2fast toy latent consistency model

The b2fast toy model distilled into a latent consistency model (LCD, pixel space): the same
text encoder and tokenizer, a UNet with a guidance embedding, and diffusers' `LCMScheduler`.
Sample it in 2–8 steps with `--sampling.scheduler lcm --sampling.num_steps 4`.

| | |
|---|---|
| command | `python -m b2fast.toy.distill_lcm {' '.join(argv)}` |
| teacher | `{args.teacher}` (20-step DDIM, CFG) |
| seed | {args.seed} |
| steps × batch | {args.steps} × {args.batch_size}, lr {args.lr}, EMA {args.ema}, w ∈ [{args.w_min}, {args.w_max}] |
| final loss (mean of last 100 steps) | {stats['final_loss']:.5f} |
| distillation time | {stats['seconds'] / 60:.1f} min on {name} (torch {torch.__version__}) |

## Alignment against the teacher

`toy_align`, mean over the three templates and both splits of {args.eval_images} images per
prompt for up to {args.eval_prompts} prompts per template and split, guidance scale
{args.guidance_scale}, seed {args.seed}:

| sampler | score | success |
|---|---|---|
{lines}
"""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    one_line_warnings()
    args = _parser().parse_args(argv)
    try:
        _validate(args)
        from b2fast.core.policy import resolve_model_path
        teacher = Path(resolve_model_path(args.teacher))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    device = resolve_device(args.device)

    def build(folder: Path) -> None:
        stats = distil(args, device, teacher, folder)
        results = {}
        if args.eval_images:
            results["teacher, DDIM 20 steps"] = measure_alignment(teacher, device, args)
            for k in (2, 4, 8):
                results[f"LCM, {k} steps"] = measure_alignment(folder, device, args, "lcm", k)
        (folder / "alignment.json").write_text(json.dumps({"distillation": stats, "alignment": results}, indent=2))
        (folder / "README.md").write_text(model_card(args, argv, stats, device, results))

    write_model_folder(Path(args.out), build)
    print((Path(args.out) / "README.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
