"""LAION aesthetic reward: the 'improved aesthetic predictor' MLP on CLIP ViT-L/14 image embeddings.

DDPO's aesthetic reward. The score is ``head(e / |e|)`` with ``e`` the OpenAI CLIP ViT-L/14 image
embedding and ``head`` the MLP of LAION's improved-aesthetic-predictor
(github.com/christophschuhmann/improved-aesthetic-predictor), trained to predict the 1–10 rating
of SAC + LOGOS + AVA images; its public checkpoint is ``sac+logos+ava1-l14-linearMSE.pth``.

The CLIP side is a :class:`~b2fast.rewards.clipscore.CLIPScore` (same on-device tensor
preprocessing, chunking and one-line model errors); only its image tower is used. Prompts are
ignored. The head file is checked before CLIP is created, so a missing file fails at once.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from b2fast.rewards.base import register_reward
from b2fast.utils import one_line
from b2fast.rewards.clipscore import CLIPScore, clipscore

HEAD_FILE = "sac+logos+ava1-l14-linearMSE.pth"
_DOWNLOAD_HINT = (f"download {HEAD_FILE} from the LAION improved-aesthetic-predictor repository "
                  "(github.com/christophschuhmann/improved-aesthetic-predictor) and pass "
                  "--reward.options '{head_path: /path/to/" + HEAD_FILE + "}'")
# The checkpoint is the state dict of an nn.Module whose ``layers`` Sequential is
# Linear, Dropout(0.2), Linear, Dropout(0.2), Linear, Dropout(0.1), Linear, Linear (no
# activations): the Linear layers sit at these indices, so keys read ``layers.0.weight`` ...
HEAD_LINEAR_INDICES = (0, 2, 4, 6, 7)


def aesthetic_head(input_dim: int = 768) -> nn.Sequential:
    """The predictor's MLP, layer for layer, so its state dict loads without renaming."""
    return nn.Sequential(
        nn.Linear(input_dim, 1024), nn.Dropout(0.2),
        nn.Linear(1024, 128), nn.Dropout(0.2),
        nn.Linear(128, 64), nn.Dropout(0.1),
        nn.Linear(64, 16),
        nn.Linear(16, 1),
    )


def _read_state_dict(path: Path) -> dict:
    """A .safetensors file, or a torch.save'd state dict (optionally under a 'state_dict' key)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling / header errors: one cause, many exception types
        raise ValueError(f"reward.options.head_path: cannot read {str(path)!r} ({one_line(exc)}); "
                         f"expected a .pth or .safetensors state dict such as {HEAD_FILE}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a PyTorch Lightning checkpoint of the LAION training script
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"reward.options.head_path: {str(path)!r} does not hold a state dict of tensors")
    return state


def load_aesthetic_head(path: str | Path, device: str | torch.device = "cpu") -> nn.Sequential:
    """Load the head from ``path``; keys may carry the module's ``layers.`` prefix or not.

    The input width is read from the first layer (768 for ViT-L/14); the other widths must be
    the predictor's. The head is returned float32, in eval mode (dropout off), without grads.
    """
    path = Path(path).expanduser()
    state = {k.removeprefix("layers."): v for k, v in _read_state_dict(path).items()}
    expected = [f"{i}.{p}" for i in HEAD_LINEAR_INDICES for p in ("weight", "bias")]
    if sorted(state) != sorted(expected):
        raise ValueError(f"reward.options.head_path: {str(path)!r} is not an aesthetic-predictor head: "
                         f"expected keys {expected} (optionally prefixed 'layers.'), got {sorted(state)[:12]}")
    head = aesthetic_head(int(state["0.weight"].shape[-1]))
    for key, param in head.state_dict().items():
        if state[key].shape != param.shape:
            raise ValueError(f"reward.options.head_path: {str(path)!r} has layers.{key} of shape "
                             f"{tuple(state[key].shape)}, the predictor's is {tuple(param.shape)}")
    head.load_state_dict(state)
    return head.to(device, torch.float32).eval().requires_grad_(False)


class AestheticScore:
    """``reward(images, prompts)`` → predicted aesthetic rating, float32 CPU (N,); prompts ignored."""

    def __init__(self, clip: CLIPScore, head: nn.Module):
        self.clip = clip
        self.head = head

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """The CLIP image embeddings the head reads (N, D), unit norm: evaluation's diversity
        features, as for the clipscore reward."""
        return self.clip.image_embeddings(images)

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str] = ()) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images: expected shape (N, 3, H, W), got {tuple(images.shape)}")
        if images.shape[0] == 0:
            return torch.zeros(0, dtype=torch.float32)
        embeddings = self.image_embeddings(images)  # (N, D), unit norm, batch_size at a time
        return self.head(embeddings).squeeze(-1).float().cpu()  # (N, 1) -> (N,)


def _check_head_path(head_path: object) -> Path:
    if head_path is None:
        raise ValueError("reward.options.head_path: the aesthetic reward needs its MLP head; " + _DOWNLOAD_HINT)
    if not isinstance(head_path, (str, Path)) or not str(head_path):
        raise ValueError(f"reward.options.head_path: expected a file path, got {head_path!r}")
    path = Path(head_path).expanduser()
    if not path.is_file():
        raise ValueError(f"reward.options.head_path: aesthetic head {str(head_path)!r} not found; "
                         + _DOWNLOAD_HINT)
    return path


@register_reward("aesthetic")
def aesthetic(device: str | torch.device = "cpu", head_path: str | None = None,
              model_name: str = "ViT-L-14", pretrained: str | None = "openai",
              batch_size: int = 32, precision: str = "float32") -> AestheticScore:
    """LAION aesthetic predictor: ``head_path`` (required) + OpenCLIP ``model_name``/``pretrained``.

    ``pretrained`` is an open_clip tag, a local checkpoint file, or None (random weights, tests
    only). ``batch_size`` bounds the images encoded at once (memory), not the scores. An OpenAI
    tag selects the model's ``-quickgelu`` variant where open_clip needs it; with a local file of
    OpenAI weights, name that variant yourself (``model_name: ViT-L-14-quickgelu``).
    ``precision`` runs the CLIP tower under autocast, as for clipscore (the head stays fp32).
    """
    path = _check_head_path(head_path)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"reward.options.batch_size: expected a positive integer, got {batch_size!r}")
    head = load_aesthetic_head(path, device)
    if importlib.util.find_spec("open_clip") is None:
        raise ValueError("reward aesthetic: the open_clip package is missing; pip install open_clip_torch")
    clip = clipscore(device=device, model_name=model_name, pretrained=pretrained,
                     scale100_clamp=False, batch_size=batch_size, precision=precision)
    width = getattr(clip.model.visual, "output_dim", None)
    head_width = head[0].in_features
    if width is not None and width != head_width:
        raise ValueError(f"reward.options.head_path: the head takes {head_width}-d embeddings but "
                         f"{model_name!r} makes {width}-d ones (the LAION head needs ViT-L/14: 768)")
    return AestheticScore(clip, head)
