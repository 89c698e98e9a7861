"""The ``rewards`` suite of ``python -m b2fast.bench``: images/s of each reward on full-size models.

A stage scores 1,280 images (32 batches × 8 prompts × 5 branches); that must stay a small
fraction of the stage. Each reward is built with ``build_reward``, as a run builds it, from the
full-size architecture with random weights (no downloads: open_clip ``pretrained=None``,
transformers models built from config objects, saved to a temporary folder and loaded back with
``from_pretrained``), so FLOPs and memory are the real models':

  clipscore  OpenCLIP ViT-H-14, the laion2b_s32b_b79k architecture (the reward's default)
  aesthetic  OpenCLIP ViT-L-14 + the LAION MLP head
  bertscore  BLIP-base captioner (``--blip large``: BLIP-large, the reward's default) and
             roberta-large cut to layer 17 (BERTScore's default scorer), over a synthetic
             vocabulary of bert-base-uncased's size (30,522 tokens)
  jpeg       jpeg_compressibility, quality 95 (PIL, on the CPU whatever the device)

``--quick`` uses the tiny models of :mod:`b2fast.testing` instead (seconds on a CPU; tests).

Inputs per call: ``--images`` random images of ``--image-size``² (the SD 1.x decoder's 512²) in
[0, 1] on the device, with the animal_activity train prompts in turn; the reward chunks them by
its ``batch_size`` as in a stage. clipscore caches text embeddings after the warm-up, as in a
stage where every prompt is scored K times. Random BLIP weights would end captions at random, so
the end token's output bias is lowered: every caption has ``max_new_tokens`` (30) tokens, an
upper bound of the captioning cost (real captions run ~10 tokens).

Baseline, measured in the same run on the same model objects: the research scripts' path, where
images go tensor → uint8 → PIL → the library's own preprocessing per image (open_clip's eval
transform; ``BlipImageProcessor``) → stack → device; everything after (model calls, text cache,
BERTScore) is the reward's own, so the ratio is what on-device preprocessing buys. jpeg has no
baseline: the reward is DDPO's PIL loop itself.

Reported per reward: ms per call (median, p20, p80), images/s, seconds per 1,280 images, GFLOP
per image (``torch.utils.flop_counter.FlopCounterMode`` on one call of the reward after the
warm-up), achieved TFLOP/s and its % of a dense square matmul in float32 (the rewards' dtype,
at torch's float32 matmul precision) timed in the same run, the baseline's images/s and the
speed-up vs it, and on CUDA the peak memory allocated during the calls (weights included).
Time: after ``--warmup`` untimed calls, ``--repeats`` calls bracketed by CUDA events on cuda,
``time.perf_counter`` on cpu.

JSON (``--json``): ``suite``, ``date``, ``device``, ``device_type``, ``torch``, ``cuda``,
``b2fast``, ``open_clip``, ``transformers``, ``threads``, ``image_size``, ``images``,
``warmup``, ``repeats``, ``timer``, ``float32_matmul_precision``, ``matmul`` {``n``, ``ms``,
``tflops``} and ``records``, one per reward: ``reward``, ``model``, ``batch_size``, ``ms``,
``ms_p20``, ``ms_p80``, ``images_per_s``, ``s_per_1280``, ``gflop_per_image``, ``tflops``,
``pct_of_matmul``, ``peak_gib``, ``baseline_ms``, ``baseline_images_per_s``,
``speedup_vs_baseline``, ``baseline_peak_gib`` (null where not measured) — or ``error`` (one
line) for a reward that failed: the run goes on, the row says "failed" and the exit code is 1.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import gc
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

import b2fast
from b2fast.bench.common import (device_name, flop_count, matmul_ceiling, progress, sig,
                                 summarize, time_calls)
from b2fast.distributed import resolve_device
from b2fast.rewards.base import to_uint8
from b2fast.utils import one_line

STAGE_IMAGES = 1280                 # 32 batches × 8 prompts × 5 branches
BERT_VOCAB = 30522                  # bert-base-uncased, BLIP's text vocabulary
DEFAULTS = {  # (images per call, warm-up calls, timed calls, matmul n)
    "cuda": (128, 2, 5, 8192), "cpu": (8, 1, 3, 1024), "quick": (4, 1, 2, 256)}
BLIP_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 max_position_embeddings=512)          # BLIP base and large: a BERT-base decoder
BLIP_VISION = {  # Salesforce/blip-image-captioning-{base,large}: ViT-B/16, ViT-L/16 at 384²
    "base": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 image_size=384, patch_size=16),
    "large": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=384, patch_size=16),
}
ROBERTA_LARGE = dict(vocab_size=50265, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                     intermediate_size=4096, max_position_embeddings=514, type_vocab_size=1,
                     layer_norm_eps=1e-5)


@dataclass
class Case:
    """One reward as built, and its PIL-preprocessing baseline (None: no baseline)."""

    name: str
    model: str                    # what the table says was measured
    batch_size: int | None        # the reward's chunk size (None: it has none)
    reward: Callable
    baseline: Callable | None


# ----------------------------------------------------------------------------------------------
# Baselines: the reward with its on-device preprocessing swapped for the PIL round trip


def to_pil(images: torch.Tensor) -> list:
    """What the research scripts hand to the library: one uint8 PIL image per tensor, on the CPU."""
    from PIL import Image

    return [Image.fromarray(a) for a in to_uint8(images).permute(0, 2, 3, 1).numpy()]  # (N, H, W, 3)


def _with_preprocess(obj, preprocess: Callable):
    """A shallow copy of a reward (same models, same caches) whose ``preprocess`` is ``preprocess``."""
    twin = copy.copy(obj)
    twin.preprocess = preprocess
    return twin


def pil_clip(clip):
    """``clip`` (a CLIPScore) preprocessing through PIL and open_clip's own eval transform."""
    import open_clip

    cfg = open_clip.get_model_preprocess_cfg(clip.model)
    transform = open_clip.image_transform(cfg["size"], is_train=False, mean=cfg["mean"], std=cfg["std"],
                                          resize_mode=cfg.get("resize_mode"),
                                          interpolation=cfg.get("interpolation"))
    return _with_preprocess(clip, lambda images: torch.stack(
        [transform(im) for im in to_pil(images)]).to(clip.device))


def pil_blip(reward):
    """``reward`` (a BERTScoreReward) preprocessing through PIL and ``BlipImageProcessor``."""
    processor = reward.processor.image_processor
    return _with_preprocess(reward, lambda images: processor(
        images=to_pil(images), return_tensors="pt")["pixel_values"].to(reward.device))


# ----------------------------------------------------------------------------------------------
# Cases


def _random_word_vocabulary() -> list[str]:
    """Whole words w0, w1, … so the tokenizer has bert-base-uncased's size and random token ids
    decode into words (captions then cost what real ones do in BERTScore)."""
    from b2fast.testing.tiny_captioner import build_bert_tokenizer

    return [f"w{i}" for i in range(BERT_VOCAB - len(build_bert_tokenizer(())))]


def save_roberta_large(folder: Path, words: list[str]) -> Path:
    """roberta-large's architecture with random weights and a WordPiece tokenizer over ``words``."""
    from transformers import RobertaConfig, RobertaModel

    from b2fast.testing.tiny_captioner import build_bert_tokenizer

    tokenizer = build_bert_tokenizer(words)
    tokenizer.model_max_length = 512
    RobertaModel(RobertaConfig(**ROBERTA_LARGE)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _batch(args) -> dict:
    """The reward's ``batch_size`` option when --batch-size is given (else its own default)."""
    return {} if args.batch_size is None else {"batch_size": args.batch_size}


def _clip_case(args, device, tmp: Path) -> Case:
    from b2fast.rewards import build_reward
    from b2fast.testing.tiny_clip import register_tiny_clip

    model = register_tiny_clip() if args.quick else "ViT-H-14"
    options = {"model_name": model, "pretrained": None, **_batch(args)}
    reward = build_reward("clipscore", options, device)
    return Case("clipscore", f"{model} (random weights)", reward.batch_size, reward, pil_clip(reward))


def _aesthetic_case(args, device, tmp: Path) -> Case:
    from b2fast.rewards import build_reward
    from b2fast.rewards.aesthetic import HEAD_FILE, aesthetic_head
    from b2fast.testing.tiny_clip import TINY_CLIP_CONFIG, register_tiny_clip

    model, width = (register_tiny_clip(), TINY_CLIP_CONFIG["embed_dim"]) if args.quick else ("ViT-L-14", 768)
    head = tmp / HEAD_FILE
    torch.save(aesthetic_head(width).state_dict(), head)
    options = {"head_path": str(head), "model_name": model, "pretrained": None, **_batch(args)}
    reward = build_reward("aesthetic", options, device)
    baseline = copy.copy(reward)
    baseline.clip = pil_clip(reward.clip)
    return Case("aesthetic", f"{model} + MLP head (random weights)", reward.clip.batch_size, reward, baseline)


def _bertscore_case(args, device, tmp: Path) -> Case:
    from b2fast.rewards import build_reward
    from b2fast.testing.tiny_captioner import save_blip, save_tiny_bert, save_tiny_blip

    if args.quick:
        options = {"captioner": str(save_tiny_blip(tmp / "blip")), "scorer": str(save_tiny_bert(tmp / "bert")),
                   "num_layers": 2, "max_new_tokens": 8}
        model = "tiny BLIP + tiny BERT"
    else:
        words = _random_word_vocabulary()
        blip = save_blip(tmp / "blip", BLIP_TEXT, BLIP_VISION[args.blip], projection_dim=512, words=words,
                         end_captions=False)
        options = {"captioner": str(blip), "scorer": str(save_roberta_large(tmp / "roberta", words))}
        model = f"BLIP-{args.blip} + roberta-large L17 (random weights)"
    reward = build_reward("bertscore", {**options, **_batch(args)}, device)
    return Case("bertscore", model, reward.batch_size, reward, pil_blip(reward))


def _jpeg_case(args, device, tmp: Path) -> Case:
    from b2fast.rewards import build_reward

    return Case("jpeg", "PIL JPEG, quality 95", None, build_reward("jpeg_compressibility"), None)


# reward → builder(args, device, temporary folder for model files) -> Case
BUILDERS = {"clipscore": _clip_case, "aesthetic": _aesthetic_case, "bertscore": _bertscore_case,
            "jpeg": _jpeg_case}


# ----------------------------------------------------------------------------------------------
# Measuring


def inputs(args, device: torch.device) -> tuple[torch.Tensor, list[str]]:
    """``--images`` random images in [0, 1] on the device and the animal_activity train prompts in turn."""
    from b2fast.prompts import load_prompts

    gen = torch.Generator(device).manual_seed(0)
    images = torch.rand((args.images, 3, args.image_size, args.image_size), generator=gen, device=device)
    prompts = load_prompts("animal_activity", "train")
    return images, [prompts[i % len(prompts)] for i in range(args.images)]


def _timed(fn: Callable[[], object], device: torch.device, args) -> dict:
    """Timing stats of ``fn`` and, on CUDA, the peak memory allocated while it ran (GiB)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    stats = summarize(time_calls(fn, device, args.warmup, args.repeats))
    stats["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
    return stats


def measure_case(case: Case, images, prompts, device, args, matmul_tflops: float) -> dict:
    """The record of one reward (fields in the module doc); its baseline timed after it."""
    n = images.shape[0]
    record = {"reward": case.name, "model": case.model, "batch_size": case.batch_size,
              **_timed(lambda: case.reward(images, prompts), device, args)}
    flops = flop_count(lambda: case.reward(images, prompts))
    seconds = record["ms"] * 1e-3
    record.update(images_per_s=n / seconds, s_per_1280=STAGE_IMAGES * seconds / n, gflop_per_image=None,
                  tflops=None, pct_of_matmul=None)
    if flops:  # jpeg: none counted (PIL)
        record.update(gflop_per_image=flops / n / 1e9, tflops=flops / seconds / 1e12,
                      pct_of_matmul=100 * flops / seconds / 1e12 / matmul_tflops)
    record.update(baseline_ms=None, baseline_images_per_s=None, speedup_vs_baseline=None,
                  baseline_peak_gib=None)
    if case.baseline is not None:
        base = _timed(lambda: case.baseline(images, prompts), device, args)
        record.update(baseline_ms=base["ms"], baseline_images_per_s=n / (base["ms"] * 1e-3),
                      speedup_vs_baseline=base["ms"] / record["ms"], baseline_peak_gib=base["peak_gib"])
    return record


def _run_case(name: str, images, prompts, device, args, matmul_tflops: float, progress) -> dict:
    """Build, measure and free one reward; a failure costs its row, not the run."""
    try:
        with tempfile.TemporaryDirectory(prefix="b2fast-bench-") as tmp:
            progress(f"{name}: building")
            case = BUILDERS[name](args, device, Path(tmp))
            record = measure_case(case, images, prompts, device, args, matmul_tflops)
    except Exception as exc:  # OOM, a library's failure: one line, the other rewards still run
        record = {"reward": name, "error": one_line(exc, 280)}
        progress(f"{name}: FAILED {record['error']}")
    else:
        progress(f"{name}: {sig(record['images_per_s'])} images/s, {sig(record['s_per_1280'])} s per "
                 f"{STAGE_IMAGES}")
    case = None
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return record


def _fill_defaults(args: argparse.Namespace, device: torch.device) -> None:
    images, warmup, repeats, matmul_n = DEFAULTS["quick" if args.quick else device.type]
    args.images = args.images or images
    args.warmup = args.warmup or warmup
    args.repeats = args.repeats or repeats
    args.image_size = args.image_size or (64 if args.quick else 512)
    args.matmul_n = matmul_n


def measure(args: argparse.Namespace) -> dict:
    """Run the suite; the JSON document (header and records) described in the module doc."""
    import open_clip
    import transformers

    device = resolve_device(args.device)
    _fill_defaults(args, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    matmul = matmul_ceiling(device, args.matmul_n, args.warmup, args.repeats)
    progress(f"float32 matmul {sig(matmul['tflops'])} TFLOP/s")
    images, prompts = inputs(args, device)
    records = [_run_case(name, images, prompts, device, args, matmul["tflops"], progress)
               for name in args.rewards]
    return {
        "suite": "rewards",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device), "device_type": device.type, "torch": torch.__version__,
        "cuda": torch.version.cuda, "b2fast": b2fast.__version__, "open_clip": open_clip.__version__,
        "transformers": transformers.__version__, "threads": torch.get_num_threads(),
        "image_size": args.image_size, "images": args.images, "warmup": args.warmup,
        "repeats": args.repeats, "timer": "cuda events" if device.type == "cuda" else "time.perf_counter",
        "float32_matmul_precision": torch.get_float32_matmul_precision(), "matmul": matmul,
        "records": records,
    }


def _cell(value) -> str:
    return "-" if value is None else sig(value)


def format_report(doc: dict) -> str:
    """The Markdown table, headed by device, versions, settings and the matmul ceiling."""
    n = doc["threads"]
    threads = f", {n} thread{'s' * (n != 1)}" if doc["device_type"] == "cpu" else ""
    cuda = f" (CUDA {doc['cuda']})" if doc["device_type"] == "cuda" else ""
    matmul = doc["matmul"]
    lines = [
        f"## b2fast rewards on {doc['device']} ({doc['device_type']}{threads})",
        "",
        f"torch {doc['torch']}{cuda}, open_clip {doc['open_clip']}, transformers {doc['transformers']}, "
        f"b2fast {doc['b2fast']}, {doc['date']}",
        f"{doc['images']} random {doc['image_size']}² images per call; median of {doc['repeats']} calls "
        f"after {doc['warmup']} warm-up ({doc['timer']}); float32 matmul {matmul['n']}² "
        f"{sig(matmul['tflops'])} TFLOP/s (precision {doc['float32_matmul_precision']}); baseline: "
        "PIL preprocessing per image, same models",
        "",
        f"| reward | model | batch | ms/call | images/s | s per {STAGE_IMAGES} | GFLOP/image | TFLOP/s | "
        "% of matmul | peak GiB | baseline images/s | × vs baseline |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in doc["records"]:
        if "error" in r:
            lines.append(f"| {r['reward']} | failed: {r['error'][:80]} | | | | | | | | | | |")
            continue
        lines.append(
            f"| {r['reward']} | {r['model']} | {r['batch_size'] or '-'} | {sig(r['ms'])} | "
            f"{sig(r['images_per_s'])} | {sig(r['s_per_1280'])} | {_cell(r['gflop_per_image'])} | "
            f"{_cell(r['tflops'])} | {_cell(r['pct_of_matmul'])} | {_cell(r['peak_gib'])} | "
            f"{_cell(r['baseline_images_per_s'])} | {_cell(r['speedup_vs_baseline'])} |")
    return "\n".join(lines)
