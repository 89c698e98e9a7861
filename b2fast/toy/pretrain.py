"""``python -m b2fast.toy.pretrain``: train the toy text-to-image model from scratch (or go on
training one, ``--init``).

Standard diffusion training (ε- or v-prediction) on clean renders of random *training* prompts
(the three templates equally often, or as ``--template-weights`` says), UNet and text encoder
together, with classifier-free-guidance dropout (the prompt replaced by "" 10% of the time) and
an EMA of the weights, which is what gets saved. Short runs deliberately stop while attribute
binding and relations are imperfect: that is what the RL fine-tuning then has to fix. At the end
it measures alignment and writes a model card (README.md) next to the weights.

``--prediction-type v_prediction`` exists for the layout: where each object goes (so the spatial
relation) is decided at the noisiest steps, where the ε loss barely depends on x₀ (its weight on
x₀ errors is the signal-to-noise ratio ᾱ/(1−ᾱ), 0.006 at t = 951); the v loss weighs them like
x₀ errors. docs/toy-world-limits.md reports what it and the other options changed.
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

from b2fast.toy.grammar import TEMPLATES, prompts as grammar_prompts
from b2fast.toy.model import TEXT_LENGTH, build_toy_model
from b2fast.toy.world import sample_images
from b2fast.distributed import resolve_device
from b2fast.utils import (DEVICE_NAMES, atomic_write_folder, is_device_name, one_line_warnings, require,
                          stop_on_interrupt)


def add_run_arguments(p: argparse.ArgumentParser, out: str, steps: int, batch_size: int, lr: float,
                      ema: float) -> None:
    """The options every toy model builder shares: output, optimisation, seed, device, evaluation."""
    p.add_argument("--out", default=out, help="output folder (diffusers layout + README.md; default: %(default)s)")
    p.add_argument("--steps", type=int, default=steps, help="optimizer steps (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=batch_size, help="images per step (default: %(default)s)")
    p.add_argument("--lr", type=float, default=lr, help="AdamW learning rate (default: %(default)s)")
    p.add_argument("--ema", type=float, default=ema, help="EMA decay (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of init, data and noise")
    p.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda' or 'cuda:N'")
    p.add_argument("--eval-images", type=int, default=4, help="images per prompt in the final evaluation (0 skips it)")
    p.add_argument("--eval-prompts", type=int, default=12, help="prompts per template and split in the evaluation")
    p.add_argument("--guidance-scale", type=float, default=5.0, help="guidance scale of the final evaluation")


def validate_run_arguments(args: argparse.Namespace) -> None:
    for name in ("steps", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: got {getattr(args, name)}, expected an integer >= 1")
    if not 0 <= args.ema < 1:
        raise ValueError(f"--ema: got {args.ema}, expected a number in [0, 1)")
    if args.lr <= 0:
        raise ValueError(f"--lr: got {args.lr}, expected a number > 0")
    # found only after training otherwise, and the trained model lost with it
    require(args.eval_images >= 0, "--eval-images", args.eval_images, "an integer >= 0 (0 skips the evaluation)")
    require(args.eval_prompts >= 1, "--eval-prompts", args.eval_prompts, "an integer >= 1")
    require(is_device_name(args.device), "--device", args.device, DEVICE_NAMES)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m b2fast.toy.pretrain", description=__doc__.split("\n\n")[0])
    add_run_arguments(p, out="runs/toy-model", steps=3000, batch_size=64, lr=2e-3, ema=0.999)
    p.add_argument("--warmup", type=int, default=100, help="linear warm-up steps")
    p.add_argument("--cfg-dropout", type=float, default=0.1, help="probability of training on the empty prompt")
    p.add_argument("--init", default=None, metavar="MODEL",
                   help="continue from this toy model's weights (a folder or b2fast:toy) instead of a random init")
    p.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), default=None,
                   help="what the UNet predicts: ε, or v = √ᾱ·ε − √(1−ᾱ)·x₀, whose loss weighs the high-noise steps "
                        "that decide the layout (default: the --init model's, else epsilon)")
    p.add_argument("--template-weights", type=float, nargs=3, default=(1.0, 1.0, 1.0), metavar=("ATTR", "TWO", "SPATIAL"),
                   help="relative frequency of the attribute, two-object and spatial templates (default: 1 1 1)")
    return p


def _validate(args: argparse.Namespace) -> None:
    validate_run_arguments(args)
    if not 0 <= args.cfg_dropout < 1:
        raise ValueError(f"--cfg-dropout: got {args.cfg_dropout}, expected a number in [0, 1)")
    weights = args.template_weights
    if min(weights) < 0 or sum(weights) <= 0:
        raise ValueError(f"--template-weights: got {list(weights)}, expected three numbers >= 0, not all 0")
    if args.init:
        init_folder(args.init)


def training_batch(rng: np.random.Generator, n: int, dropout: float,
                    template_weights: tuple[float, ...] | None = None) -> tuple[torch.Tensor, list[str]]:
    """n renders of random training prompts (templates equally likely, or in proportion to
    ``template_weights``) and their captions, a fraction ``dropout`` of which is "" so the model
    also learns the unconditional ε for CFG."""
    pools = [grammar_prompts(t, "train") for t in TEMPLATES]
    if template_weights is None or len(set(template_weights)) == 1:  # the shipped model's data stream
        picks = [pools[rng.integers(len(pools))] for _ in range(n)]
    else:
        p = np.asarray(template_weights, np.float64) / sum(template_weights)
        picks = [pools[i] for i in rng.choice(len(pools), size=n, p=p)]
    prompts = [pool[rng.integers(len(pool))] for pool in picks]
    images = torch.from_numpy(sample_images(prompts, rng))
    return images, ["" if rng.random() < dropout else p for p in prompts]


class ToyTrainer:
    """UNet + text encoder + EMA copies, trained on freshly sampled renders every step."""

    def __init__(self, folder: Path, args: argparse.Namespace, device: torch.device):
        from diffusers import DDIMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        self.device = device
        self.tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
        self.unet = UNet2DConditionModel.from_pretrained(folder / "unet").to(device).train()
        self.text = CLIPTextModel.from_pretrained(folder / "text_encoder").to(device).train()
        scheduler = DDIMScheduler.from_pretrained(folder / "scheduler")
        self.alphas = scheduler.alphas_cumprod.to(device)
        self.v_prediction = scheduler.config.prediction_type == "v_prediction"
        self.ema = [copy.deepcopy(self.unet).eval().requires_grad_(False),
                    copy.deepcopy(self.text).eval().requires_grad_(False)]
        params = list(self.unet.parameters()) + list(self.text.parameters())
        self.optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)
        total, warm = args.steps, args.warmup
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / max(1, warm)) * 0.5 * (1 + np.cos(np.pi * min(s, total) / total)))
        self.args = args

    def step(self, images: torch.Tensor, prompts: list[str], generator: torch.Generator) -> float:
        ids = self.tokenizer(prompts, padding="max_length", max_length=TEXT_LENGTH, truncation=True,
                             return_tensors="pt").input_ids.to(self.device)
        x0 = images.to(self.device) * 2 - 1                                   # (B, 3, 32, 32) in [-1, 1]
        t = torch.randint(0, len(self.alphas), (x0.shape[0],), generator=generator).to(self.device)
        noise = torch.randn(x0.shape, generator=generator).to(self.device)
        ab = self.alphas[t].view(-1, 1, 1, 1)
        x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        pred = self.unet(x_t, t, encoder_hidden_states=self.text(ids)[0]).sample
        target = ab.sqrt() * noise - (1 - ab).sqrt() * x0 if self.v_prediction else noise
        loss = F.mse_loss(pred, target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(self.unet.parameters()) + list(self.text.parameters()), 1.0)
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._update_ema()
        return float(loss.detach())

    @torch.no_grad()
    def _update_ema(self) -> None:
        for ema, live in zip(self.ema, (self.unet, self.text)):
            for e, p in zip(ema.parameters(), live.parameters()):
                e.lerp_(p, 1 - self.args.ema)

    def save(self, folder: Path) -> None:
        self.ema[0].save_pretrained(folder / "unet")
        self.ema[1].save_pretrained(folder / "text_encoder")


def train(args: argparse.Namespace, device: torch.device, folder: Path) -> dict:
    """Build a random model in ``folder`` (or copy ``--init``'s), train it, overwrite its weights
    with the EMA."""
    if args.init:
        copy_toy_model(args.init, folder)
    else:
        build_toy_model(folder, seed=args.seed)
    if args.prediction_type:
        set_prediction_type(folder, args.prediction_type)
    torch.manual_seed(args.seed)
    trainer = ToyTrainer(folder, args, device)
    rng = np.random.default_rng(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    losses, started = [], time.perf_counter()
    bar = tqdm(range(args.steps), desc="pretraining")
    for step in bar:
        images, prompts = training_batch(rng, args.batch_size, args.cfg_dropout, args.template_weights)
        losses.append(trainer.step(images, prompts, generator))
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    trainer.save(folder)
    return {"steps": args.steps, "final_loss": float(np.mean(losses[-100:])),
            "seconds": time.perf_counter() - started}


def measure_alignment(folder: Path, device: torch.device, args: argparse.Namespace, scheduler: str = "ddim",
                      num_steps: int = 20) -> list[dict]:
    """toy_align success and score per template and split, with the card's fixed seed."""
    from b2fast.config import ModelConfig, SamplingConfig
    from b2fast.eval.evaluator import evaluate_sets
    from b2fast.prompts import TOY_SETS
    from b2fast.core.policy import Policy
    from b2fast.rewards import build_reward

    policy = Policy(ModelConfig(path=str(folder), dtype="float32"), device, num_steps, 1.0, scheduler)
    reward = build_reward("toy_align", {}, device)
    rows = evaluate_sets(policy, list(TOY_SETS), ["train", "test"], reward,
                         SamplingConfig(num_steps=num_steps, guidance_scale=args.guidance_scale, scheduler=scheduler),
                         args.eval_images, args.eval_prompts, seed=args.seed)
    return [r.as_dict() for r in rows]


def model_card(args: argparse.Namespace, argv: list[str], stats: dict, device: torch.device,
               rows: list[dict]) -> str:
    table = "\n".join(f"| {r['prompt_set']} | {r['split']} | {r['n_images']} | {r['success']:.3f} | "
                      f"{r['score']:.3f} | {r['diversity']:.3f} |" for r in rows)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    return f"""# b2fast toy model

A small text-to-image diffusion model of the b2fast toy world (coloured shapes on a 32×32
canvas), in diffusers layout: `unet/` (UNet2DConditionModel, pixel space), `text_encoder/`
(2-layer CLIPTextModel), `tokenizer/` (word-level CLIP BPE), `scheduler/` (DDIM). It draws
recognisable shapes but binds colours, shapes and relations imperfectly, which is what RL
fine-tuning with b2fast has to fix. Load it as `model.path: "b2fast:toy"`.

| | |
|---|---|
| command | `python -m b2fast.toy.pretrain {' '.join(argv)}` |
| seed | {args.seed} |
| initial weights | {args.init or 'random'} |
| prediction | {args.prediction_type or ('as --init' if args.init else 'epsilon')} |
| steps × batch | {args.steps} × {args.batch_size} |
| final loss (mean of last 100 steps) | {stats['final_loss']:.4f} |
| training time | {stats['seconds'] / 60:.1f} min on {name} (torch {torch.__version__}) |

## Alignment of the base model

`toy_align` on {args.eval_images} images per prompt for up to {args.eval_prompts} prompts per
template and split (evenly spread over the list), 20 DDIM steps, η = 1, CFG scale
{args.guidance_scale}, seed {args.seed}. success = every constraint of the prompt met; score =
fraction of constraints met; diversity = mean pairwise distance of 8×8-pooled images of a prompt.

| prompt set | split | images | success | score | diversity |
|---|---|---|---|---|---|
{table}
"""


def init_folder(source: str) -> Path:
    """The folder of the toy model ``source`` (a folder, or ``b2fast:toy``), checked."""
    from b2fast.toy.model import pretrained_path

    src = pretrained_path() if source == "b2fast:toy" else Path(source)
    if not all((src / part).is_dir() for part in ("unet", "text_encoder", "tokenizer", "scheduler")):
        raise ValueError(f"--init: {source} is not a toy model folder (it needs unet/, text_encoder/, tokenizer/ "
                         "and scheduler/); give a folder written by `python -m b2fast.toy.pretrain` or b2fast:toy")
    return src


def copy_toy_model(source: str, folder: Path) -> None:
    """Copy the toy model ``source`` into ``folder`` to continue training it."""
    src = init_folder(source)
    for part in ("unet", "text_encoder", "tokenizer", "scheduler"):
        shutil.copytree(src / part, folder / part, dirs_exist_ok=True)
    shutil.copy(src / "model_index.json", folder / "model_index.json")


def set_prediction_type(folder: Path, prediction_type: str) -> None:
    """Write ``prediction_type`` into the folder's scheduler config (samplers read it from there)."""
    path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text())
    config["prediction_type"] = prediction_type
    path.write_text(json.dumps(config, indent=2) + "\n")


@stop_on_interrupt("--out is unchanged (the model is written when training ends)")
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    one_line_warnings()
    args = _parser().parse_args(argv)
    try:
        _validate(args)
        device = resolve_device(args.device)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    def build(folder: Path) -> None:
        stats = train(args, device, folder)
        rows = measure_alignment(folder, device, args) if args.eval_images else []
        (folder / "alignment.json").write_text(json.dumps({"training": stats, "alignment": rows}, indent=2))
        (folder / "README.md").write_text(model_card(args, argv, stats, device, rows))

    atomic_write_folder(Path(args.out), build)  # a killed run leaves the old model or the new one
    print((Path(args.out) / "README.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
