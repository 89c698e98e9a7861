"""The full-size Stable Diffusion 1.x architecture with random weights, built offline from configs.

Benchmarks must measure the FLOPs and memory of the real models, yet must also run where no
weights can be downloaded. So :func:`save_random_sd15` builds the five SD 1.x components from their
published configs (``runwayml/stable-diffusion-v1-5``: UNet 860M, VAE 84M, CLIP ViT-L/14 text
encoder 123M), saves them in diffusers layout in the model dtype, and a benchmark loads the folder
through :class:`b2fast.core.policy.Policy` exactly as a user's checkpoint is loaded. The tokenizer is
:mod:`b2fast.testing.tiny_sd`'s offline CLIP BPE tokenizer; prompts are padded to 77 tokens, so
the text encoder's cost is the real one whatever the vocabulary.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from b2fast.testing.tiny_sd import SD_SCHEDULER, build_clip_tokenizer, write_model_index

SD15_UNET = dict(  # unet/config.json of SD 1.x (diffusers' UNet2DConditionModel defaults but these)
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)
SD15_VAE = dict(  # vae/config.json of SD 1.x: 512² images ↔ 4×64² latents
    in_channels=3, out_channels=3, latent_channels=4, sample_size=512, layers_per_block=2,
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.18215,
)
SD15_TEXT = dict(  # text_encoder/config.json of SD 1.x: the CLIP ViT-L/14 text tower
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
)


def save_random_sd15(folder: str | os.PathLike, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Path:
    """Build SD 1.x with random weights on the CPU and save it in diffusers layout in ``dtype``
    (about 2 GB in bf16; tens of seconds on one CPU core)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = Path(folder)
    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer(folder / "tokenizer")
    special = len(tokenizer) - 2, len(tokenizer) - 1  # <|startoftext|>, <|endoftext|>
    text = CLIPTextConfig(**SD15_TEXT, bos_token_id=special[0], eos_token_id=special[1],
                          pad_token_id=special[1])
    builders = {"unet": lambda: UNet2DConditionModel(**SD15_UNET),
                "vae": lambda: AutoencoderKL(**SD15_VAE),
                "text_encoder": lambda: CLIPTextModel(text)}
    previous = torch.get_default_dtype()
    try:
        torch.set_default_dtype(dtype)  # initialised in the model dtype: half the memory, no cast
        for name, build in builders.items():  # one model in memory at a time
            build().save_pretrained(folder / name)
    finally:
        torch.set_default_dtype(previous)
    DDIMScheduler(**SD_SCHEDULER).save_pretrained(folder / "scheduler")
    write_model_index(folder, with_vae=True)
    return folder
