"""A tiny Stable-Diffusion-layout model with random weights, built offline from configs.

No weights can be downloaded on CI or on a laptop without a hub account, yet b2fast must load
models through the same public path it uses for real checkpoints. So tests (and the smoke-test
model ``b2fast:tiny-sd``) build the five SD components from small configs, save them in the
diffusers folder layout, and load them back with ``from_pretrained`` like any checkpoint.

The tokenizer is a real CLIP BPE tokenizer whose vocabulary is the 512 byte symbols plus
optional whole words, so any text tokenizes without a vocabulary download.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import torch

from b2fast.utils import default_mode

SD_SCHEDULER = dict(  # Stable Diffusion 1.x scheduler config (scheduler/scheduler_config.json)
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
    prediction_type="epsilon",
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte → printable-character map (the base BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def build_clip_tokenizer(folder: str | os.PathLike, words: Sequence[str] = (), max_length: int = 77):
    """Write and return a CLIPTokenizer with byte symbols plus one merge chain per word."""
    from transformers import CLIPTokenizer

    chars = list(_bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars]
    merges: list[str] = []
    for word in sorted(set(w.lower() for w in words)):
        token = word[0]
        for i, ch in enumerate(word[1:], start=1):
            piece = ch + "</w>" if i == len(word) - 1 else ch
            merges.append(f"{token} {piece}")
            token += piece
            if token not in vocab:
                vocab.append(token)
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("".join(f"{m}\n" for m in ["#version: 0.2", *dict.fromkeys(merges)]))
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                              model_max_length=max_length)
    tokenizer.save_pretrained(folder)
    return tokenizer


def tiny_unet(sample_size: int = 8, cross_attention_dim: int = 32):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=cross_attention_dim,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8,
    )


def tiny_text_encoder(vocab_size: int, hidden_size: int = 32):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=64,
                            num_attention_heads=4, num_hidden_layers=2, max_position_embeddings=77,
                            projection_dim=hidden_size, bos_token_id=vocab_size - 2,
                            eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)
    return CLIPTextModel(config)


def tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                         block_out_channels=(16, 32), norm_num_groups=8,
                         down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2)


def save_tiny_sd(folder: str | os.PathLike, seed: int = 0, sample_size: int = 8,
                 words: Sequence[str] = ()) -> Path:
    """Build a tiny SD model (latents 4×sample_size², images 2× that) and save it in diffusers layout."""
    from diffusers import DDIMScheduler

    folder = Path(folder)
    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer(folder / "tokenizer", words)
    tiny_unet(sample_size).save_pretrained(folder / "unet")
    tiny_text_encoder(len(tokenizer)).save_pretrained(folder / "text_encoder")
    tiny_vae().save_pretrained(folder / "vae")
    DDIMScheduler(**SD_SCHEDULER).save_pretrained(folder / "scheduler")
    write_model_index(folder, with_vae=True)
    return folder


def write_model_index(folder: Path, with_vae: bool) -> None:
    """model_index.json, so ``StableDiffusionPipeline.from_pretrained(folder)`` also works."""
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.30.0",
             "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"] if with_vae else [None, None],
             "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDIMScheduler"],
             "safety_checker": [None, None], "feature_extractor": [None, None],
             "requires_safety_checker": False}
    (Path(folder) / "model_index.json").write_text(json.dumps(index, indent=2))


def cached_tiny_sd(seed: int = 0) -> Path:
    """The ``b2fast:tiny-sd`` model: built once into the b2fast cache folder, atomically."""
    root = Path(os.environ.get("B2FAST_CACHE", Path.home() / ".cache" / "b2fast"))
    target = root / f"tiny-sd-seed{seed}"
    if (target / "model_index.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-sd-", dir=root))
    try:
        os.chmod(tmp, default_mode(folder=True))  # mkdtemp makes 0o700
        save_tiny_sd(tmp, seed=seed)
        os.replace(tmp, target)
    except OSError:
        if not (target / "model_index.json").is_file():  # lost a race with another process is fine
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
