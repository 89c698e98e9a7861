"""The toy world's text-to-image model, in the same diffusers layout as Stable Diffusion.

Pixel space, no VAE: the UNet denoises the 32×32 RGB canvas itself. That keeps the reward
exact (the detector reads exactly what the sampler produced, with no decoder in between), saves
pretraining a second model, and at 3×32×32 the "latent" is no larger than SD's 4×64×64 would be
per unit of detail. The text side is a 2-layer CLIP text encoder over a word-level CLIP BPE
vocabulary built from the prompt grammar, so every word of the toy language is one token.
"""
from __future__ import annotations

import os
from pathlib import Path

from b2fast.testing.tiny_sd import build_clip_tokenizer, write_model_index
from b2fast.toy.grammar import COLOURS, RELATIONS, SHAPES
from b2fast.toy.world import CANVAS
from b2fast.utils import readable_folder

TEXT_LENGTH = 16  # the longest toy prompt, "a red circle left of a blue square", is 10 tokens
SCHEDULER = dict(  # cosine betas suit 32×32 pixels; spacing and offset as in SD's scheduler
    num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=True,
    clip_sample_range=1.0, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
    prediction_type="epsilon",
)
UNET = dict(
    sample_size=CANVAS, in_channels=3, out_channels=3, layers_per_block=1,
    block_out_channels=(16, 32, 64), norm_num_groups=8, cross_attention_dim=64,
    # text cross-attention at 8×8 (and in the mid block): at 16×16 it tripled the CPU cost
    down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    attention_head_dim=16,
)


BUILDERS = {"pretrained": "pretrain", "pretrained_lcm": "distill_lcm"}  # shipped folder → its builder


def pretrained_path(name: str = "pretrained") -> Path:
    """Folder of a shipped toy model: ``pretrained`` (``b2fast:toy``) or ``pretrained_lcm``
    (``b2fast:toy-lcm``, its latent consistency distillation)."""
    from importlib import resources

    folder = readable_folder(Path(str(resources.files("b2fast.toy") / name)))  # rebuilt in place by a killed run
    if not (folder / "unet").is_dir():
        raise ValueError(f"model.path: the toy model is not installed at {folder.name}/; build one with "
                         f"`python -m b2fast.toy.{BUILDERS[name]} --out DIR` and give DIR as the model path")
    return folder


def vocabulary() -> list[str]:
    """Every word the toy grammar uses."""
    words = {"a", "and", *COLOURS, *SHAPES}
    for relation in RELATIONS:
        words.update(relation.split())
    return sorted(words)


def build_toy_model(folder: str | os.PathLike, seed: int = 0) -> Path:
    """Random-initialised toy model saved in diffusers layout (unet/, text_encoder/, tokenizer/, scheduler/)."""
    import torch
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = Path(folder)
    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer(folder / "tokenizer", vocabulary(), max_length=TEXT_LENGTH)
    UNet2DConditionModel(**UNET).save_pretrained(folder / "unet")
    text_config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                 num_attention_heads=4, num_hidden_layers=2,
                                 max_position_embeddings=TEXT_LENGTH, projection_dim=64,
                                 bos_token_id=len(tokenizer) - 2, eos_token_id=len(tokenizer) - 1,
                                 pad_token_id=len(tokenizer) - 1)
    CLIPTextModel(text_config).save_pretrained(folder / "text_encoder")
    DDIMScheduler(**SCHEDULER).save_pretrained(folder / "scheduler")
    write_model_index(folder, with_vae=False)
    return folder
