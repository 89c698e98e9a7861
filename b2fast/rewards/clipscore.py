"""CLIPScore reward: cosine similarity of OpenCLIP image and text embeddings.

B²-DiffuRL's reward (the paper uses OpenCLIP ViT-H-14 trained on LAION-2B, cosine similarity).
Images are preprocessed on the tensor's device, without a round trip through PIL: resize (the
model's interpolation, antialiased as PIL is), centre crop, normalise with the model's mean/std,
all read from the preprocess config that open_clip attaches to the model. Text embeddings are
cached per prompt, since a stage scores each prompt K × batches times.

open_clip is imported only when a CLIPScore reward is built, so ``import b2fast.rewards`` stays
cheap.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from b2fast.rewards.base import check_reward_inputs, register_reward
from b2fast.utils import one_line

PRECISIONS = ("float32", "bfloat16", "float16")
_FIX_HINT = ("pre-download the weights into the Hugging Face cache on a machine with internet, or "
             "pass pretrained=/path/to/open_clip_pytorch_model.bin (pretrained=None: random weights, "
             "for tests only)")


def clip_name_for_tag(model_name: str, pretrained: str | None) -> str:
    """The ``-quickgelu`` variant of ``model_name`` when the weights were trained with QuickGELU.

    open_clip ≥ 3 builds 'ViT-L-14' with GELU even for pretrained='openai' (it only warns), which
    changes the embeddings the weights were trained for; 'ViT-L-14-quickgelu' is the matching model.
    open_clip 2.x loads 'openai' tags with QuickGELU whatever the name, and needs no change.
    """
    import open_clip

    if not pretrained or model_name.endswith("-quickgelu") or Path(pretrained).exists():
        return model_name
    tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained) or {}
    model_cfg = open_clip.get_model_config(model_name) or {}
    variant = f"{model_name}-quickgelu"
    if tag_cfg.get("quick_gelu") and not model_cfg.get("quick_gelu") and \
            pretrained in open_clip.list_pretrained_tags_by_model(variant):
        return variant
    return model_name


def create_clip_model(model_name: str, pretrained: str | None, device: str | torch.device) -> torch.nn.Module:
    """``open_clip.create_model`` in eval mode, with one-line errors that say how to fix the config.

    open_clip reports an unknown name with a list of every model (~150) and a missing download
    after minutes of retries with a multi-line hub error; neither names the config field.
    """
    import open_clip

    has_schema = model_name.startswith(("hf-hub:", "local-dir:"))
    if not has_schema and open_clip.get_model_config(model_name.replace("/", "-")) is None:
        raise ValueError(f"reward.options.model_name: unknown open_clip model {model_name!r}; "
                         "see open_clip.list_models() (e.g. 'ViT-H-14')")
    model_name = clip_name_for_tag(model_name, pretrained)
    previous = logging.root.manager.disable
    logging.disable(logging.ERROR)  # open_clip also logs the failure it raises: one line is enough
    try:
        model = open_clip.create_model(model_name, pretrained=pretrained, device=device)
    except Exception as exc:  # open_clip raises RuntimeError/OSError/hub errors for one cause
        raise ValueError(f"reward.options: cannot create open_clip model {model_name!r} with "
                         f"pretrained={pretrained!r} ({one_line(exc)}); {_FIX_HINT}") from None
    finally:
        logging.disable(previous)
    return model.eval().requires_grad_(False)


class CLIPScore:
    """``reward(images, prompts)`` → cos(image embedding, text embedding), float32 CPU (N,).

    With ``scale100_clamp`` the score is max(100·cos, 0), the variant reported by the CLIPScore
    paper's reference code and torchmetrics; the default is the plain cosine, as B²-DiffuRL uses.
    """

    def __init__(self, model_name: str, pretrained: str | None, device: str | torch.device,
                 scale100_clamp: bool, batch_size: int, precision: str = "float32"):
        import open_clip

        self.device = torch.device(device)
        self.precision = precision
        self.model = create_clip_model(model_name, pretrained, self.device)
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.scale100_clamp = scale100_clamp
        self.batch_size = batch_size
        self._text_cache: dict[str, torch.Tensor] = {}
        self._set_preprocess(open_clip.get_model_preprocess_cfg(self.model))

    def _set_preprocess(self, cfg: dict) -> None:
        """Read size/mean/std/interpolation/resize mode from open_clip's preprocess config."""
        size = cfg["size"]
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.interpolation = cfg.get("interpolation", "bicubic")
        self.resize_mode = cfg.get("resize_mode", "shortest")
        if self.interpolation not in ("bicubic", "bilinear") or self.resize_mode not in ("shortest", "squash"):
            raise ValueError(f"reward.options.model_name: preprocessing interpolation={self.interpolation!r}, "
                             f"resize_mode={self.resize_mode!r} is not supported by the clipscore reward "
                             "(supported: bicubic/bilinear, shortest/squash)")
        self.mean = torch.tensor(cfg["mean"], dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg["std"], dtype=torch.float32, device=self.device).view(1, 3, 1, 1)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1] → normalised (N, 3, h, w) at the model's input size.

        Mirrors open_clip's eval transform (torchvision Resize of the shorter side, CenterCrop,
        Normalize) on tensors; antialias and the clamp to [0, 1] reproduce what PIL does on uint8.
        """
        x = images.to(self.device, torch.float32)
        (h, w), (th, tw) = x.shape[-2:], self.size
        if self.resize_mode == "squash":
            new_h, new_w = th, tw
        elif th == tw:  # torchvision Resize(int): shorter side -> th, longer side truncated
            new_h, new_w = (th, int(th * w / h)) if h <= w else (int(th * h / w), th)
        else:
            scale = max(th / h, tw / w)
            new_h, new_w = max(th, round(h * scale)), max(tw, round(w * scale))
        if (new_h, new_w) != (h, w):
            x = F.interpolate(x, size=(new_h, new_w), mode=self.interpolation, align_corners=False,
                              antialias=True).clamp_(0, 1)
        top, left = int(round((new_h - th) / 2.0)), int(round((new_w - tw) / 2.0))
        x = x[..., top:top + th, left:left + tw]  # centre crop, as torchvision computes it
        return (x - self.mean) / self.std

    def text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        """Unit-norm text embeddings (N, D), computed once per distinct prompt and cached."""
        missing = list(dict.fromkeys(p for p in prompts if p not in self._text_cache))
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start:start + self.batch_size]
            tokens = self.tokenizer(chunk).to(self.device)
            with self._autocast():
                emb = F.normalize(self.model.encode_text(tokens).float(), dim=-1)
            self._text_cache.update(zip(chunk, emb))
        return torch.stack([self._text_cache[p] for p in prompts])

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm image embeddings (N, D), in chunks of ``batch_size`` images."""
        with self._autocast():
            chunks = [self.model.encode_image(self.preprocess(images[i:i + self.batch_size])).float()
                      for i in range(0, images.shape[0], self.batch_size)]
        return F.normalize(torch.cat(chunks), dim=-1)

    def _autocast(self):
        """The towers' matmuls in ``precision`` (weights stay fp32; outputs are cast back to fp32)."""
        enabled = self.precision != "float32"
        return torch.autocast(self.device.type, dtype=getattr(torch, self.precision), enabled=enabled)

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        check_reward_inputs(images, prompts)
        if images.shape[0] == 0:
            return torch.zeros(0, dtype=torch.float32)
        cos = (self.image_embeddings(images) * self.text_embeddings(prompts)).sum(dim=-1)
        scores = (100 * cos).clamp_min(0) if self.scale100_clamp else cos
        return scores.float().cpu()


@register_reward("clipscore")
def clipscore(device: str | torch.device = "cpu", model_name: str = "ViT-H-14",
              pretrained: str | None = "laion2b_s32b_b79k", scale100_clamp: bool = False,
              batch_size: int = 32, precision: str = "float32") -> CLIPScore:
    """CLIPScore with an OpenCLIP model (default: ViT-H-14 / LAION-2B, as in B²-DiffuRL).

    ``pretrained`` is an open_clip tag, a local checkpoint file, or None (random weights).
    ``batch_size`` bounds the images/prompts encoded at once (memory), not the scores.
    ``precision`` 'bfloat16' or 'float16' runs the towers under autocast: ~2-4x the images/s on
    a tensor-core GPU, scores within ~1e-2 of float32 (the reward, not the policy, is rounded).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"reward.options.precision: expected one of {PRECISIONS}, got {precision!r}")
    if not isinstance(model_name, str) or not model_name:
        raise ValueError(f"reward.options.model_name: expected an open_clip model name, got {model_name!r}")
    if pretrained is not None and not isinstance(pretrained, str):
        raise ValueError(f"reward.options.pretrained: expected a tag, a file path or None, got {pretrained!r}")
    if not isinstance(scale100_clamp, bool):
        raise ValueError(f"reward.options.scale100_clamp: expected true or false, got {scale100_clamp!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"reward.options.batch_size: expected a positive integer, got {batch_size!r}")
    return CLIPScore(model_name, pretrained, device, scale100_clamp, batch_size, precision)
