"""A tiny open_clip architecture, so CLIP rewards can be tested without downloading weights.

Only the architecture is registered (random weights via ``pretrained=None``); the tokenizer is
open_clip's own BPE tokenizer, which ships its vocabulary file and so works offline.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

TINY_CLIP_NAME = "b2fast-tiny-clip"

# A ViT with 4x4 patches of 8 px and 2-layer towers: 3.4 M parameters (94% in the 49408-token
# embedding, kept so the real tokenizer fits), created in ~40 ms on a CPU.
TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def register_tiny_clip() -> str:
    """Register :data:`TINY_CLIP_CONFIG` with open_clip (idempotent) and return its model name.

    Uses the public ``open_clip.add_model_config`` (which reads a JSON file) rather than writing to
    open_clip's private config dict; the file may go once open_clip has read it.
    """
    import open_clip

    if open_clip.get_model_config(TINY_CLIP_NAME) is None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{TINY_CLIP_NAME}.json"
            path.write_text(json.dumps(TINY_CLIP_CONFIG), encoding="utf-8")
            open_clip.add_model_config(path)
    return TINY_CLIP_NAME
