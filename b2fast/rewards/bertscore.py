"""BERTScore alignment reward: caption each image, then BERTScore F1 between caption and prompt.

The image–text alignment reward of DDPO that B²-DiffuRL also reports: a captioning model describes
the generated image (greedy decoding) and BERTScore (Zhang et al., 2020) compares that caption with
the prompt. BERTScore itself is torchmetrics' maintained implementation (``torchmetrics.text.
BERTScore``); its default scorer, ``roberta-large`` at layer 17, is the bert-score package's
default for English. The captioner is BLIP (``Salesforce/blip-image-captioning-large`` by default);
images are resized and normalised on their device with the size, resampling and mean/std read
from the checkpoint's image-processor config, without a round trip through PIL.

Models load with ``from_pretrained`` from a hub id or a local folder; with ``HF_HUB_OFFLINE=1``
a model missing from the cache fails at build time with a one-line error that says which option
to set. transformers and torchmetrics are imported only when the reward is built.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from b2fast.rewards.base import check_reward_inputs, register_reward
from b2fast.utils import one_line

DEFAULT_CAPTIONER = "Salesforce/blip-image-captioning-large"
DEFAULT_SCORER = "roberta-large"
DEFAULT_NUM_LAYERS = 17  # bert-score's model2layers["roberta-large"]
_RESAMPLE = {2: "bilinear", 3: "bicubic", "bilinear": "bilinear", "bicubic": "bicubic"}  # PIL ids / names
_MAX_TOKENS = 512  # BERTScore truncates longer texts, as bert-score does for BERT-like models


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _load(field: str, name: str, loader: Callable[[str], Any], example: str) -> Any:
    """``loader(name)`` with any failure turned into one line that names ``reward.options.<field>``."""
    try:
        return loader(name)
    except Exception as exc:  # OSError, HFValidationError, EnvironmentError...: one cause, many types
        if os.path.isdir(name):
            where = f"cannot be loaded from the folder {name!r} ({one_line(exc)})"
        elif os.path.isabs(name) or name.startswith((".", "~")):
            where = f"folder {name!r} does not exist"
        elif _offline():
            where = f"{name!r} not found locally and the hub is offline (HF_HUB_OFFLINE=1)"
        else:
            where = f"{name!r} is not a local folder and cannot be loaded from the hub ({one_line(exc)})"
        raise ValueError(f"reward bertscore: {field} {where}; pass a local folder, e.g. "
                         f"--reward.options '{{{field}: /path/to/{example}}}'") from None


def load_captioner(name: str, device: torch.device):
    """BLIP captioning model (eval, frozen, on ``device``) and its ``BlipProcessor``."""
    from transformers import AutoConfig, BlipForConditionalGeneration, BlipProcessor

    example = "blip-image-captioning-large"
    config = _load("captioner", name, AutoConfig.from_pretrained, example)
    architectures = getattr(config, "architectures", None) or ["BlipForConditionalGeneration"]
    if config.model_type != "blip" or "BlipForConditionalGeneration" not in architectures:
        raise ValueError(f"reward.options.captioner: {name!r} is a {config.model_type!r} model "
                         f"({', '.join(architectures)}); only BLIP captioning models "
                         f"(BlipForConditionalGeneration, e.g. {DEFAULT_CAPTIONER!r}) are supported, "
                         "LLaVA is not supported yet")
    model = _load("captioner", name, BlipForConditionalGeneration.from_pretrained, example)
    processor = _load("captioner", name, BlipProcessor.from_pretrained, example)
    return model.to(device).eval().requires_grad_(False), processor


def load_scorer(name: str, num_layers: int | None, idf: bool, batch_size: int, device: torch.device):
    """torchmetrics ``BERTScore`` over the encoder ``name`` (loaded once), truncated to ``num_layers``."""
    try:
        from torchmetrics.text import BERTScore
    except ImportError as exc:
        raise ValueError(f"reward bertscore: needs the torchmetrics package ({one_line(exc)}); "
                         "pip install 'torchmetrics>=1.5'") from None
    from transformers import AutoModel, AutoTokenizer

    tokenizer = _load("scorer", name, AutoTokenizer.from_pretrained, DEFAULT_SCORER)
    model = _load("scorer", name, AutoModel.from_pretrained, DEFAULT_SCORER)
    depth = getattr(model.config, "num_hidden_layers", None)
    if num_layers is not None and isinstance(depth, int) and num_layers > depth:
        raise ValueError(f"reward.options.num_layers: {num_layers} > the {depth} layers of scorer {name!r}; "
                         f"use 1..{depth} (bert-score's defaults: roberta-large 17, bert-base-uncased 9)")
    layers = getattr(getattr(model, "encoder", None), "layer", None)
    if num_layers is not None and isinstance(layers, torch.nn.ModuleList):
        # Layers above num_layers never reach the score; dropping them (as bert-score does) saves
        # 7 of roberta-large's 24 layers. hidden_states[num_layers] is unchanged.
        model.encoder.layer = torch.nn.ModuleList(list(layers)[:num_layers])
    model = model.to(device).eval().requires_grad_(False)
    return BERTScore(model_name_or_path=name, model=model, num_layers=num_layers, idf=idf, device=device,
                     batch_size=batch_size, max_length=min(_MAX_TOKENS, tokenizer.model_max_length),
                     truncation=True)


class BERTScoreReward:
    """``reward(images, prompts)`` → BERTScore F1(caption(image), prompt), float32 CPU (N,).

    ``last_captions`` holds the captions of the latest call, for logging. ``score_captions``
    scores given captions, without images.
    """

    def __init__(self, captioner: str, scorer: str, num_layers: int | None, batch_size: int,
                 max_new_tokens: int, idf: bool, device: str | torch.device):
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.last_captions: list[str] = []
        self.metric = load_scorer(scorer, num_layers, idf, batch_size, self.device)  # first: cheaper
        self.model, self.processor = load_captioner(captioner, self.device)
        self._set_preprocess(self.processor.image_processor)

    def _set_preprocess(self, image_processor: Any) -> None:
        """Read resize size/resampling and mean/std from the BLIP image-processor config."""
        size = image_processor.size
        get = size.get if isinstance(size, dict) else lambda key: getattr(size, key, None)
        self.size = (get("height"), get("width")) if image_processor.do_resize else None
        resample = getattr(image_processor.resample, "value", image_processor.resample)
        self.interpolation = _RESAMPLE.get(resample)
        if (self.size is not None and None in self.size) or self.interpolation is None:
            raise ValueError(f"reward.options.captioner: image processor with size={size!r}, "
                             f"resample={image_processor.resample!r} is not supported by the bertscore "
                             "reward (supported: height/width resize, bilinear or bicubic)")
        mean, std = (image_processor.image_mean, image_processor.image_std) if image_processor.do_normalize \
            else ((0.0,) * 3, (1.0,) * 3)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1] → normalised (N, 3, h, w), as ``BlipImageProcessor`` does.

        BLIP squashes to height × width (no crop); the images are already in [0, 1], which is
        the processor's rescale of uint8 by 1/255. PIL resamples the width first and clamps to
        uint8 range between its two passes: two antialiased 1-D passes with a clamp after each
        match PIL to about 1/255, where one 2-D pass differs by up to 13/255 on noisy images.
        """
        x = images.to(self.device, torch.float32)
        if self.size is not None and tuple(x.shape[-2:]) != self.size:
            h, (th, tw) = x.shape[-2], self.size
            for size in ((h, tw), (th, tw)):
                x = F.interpolate(x, size=size, mode=self.interpolation, align_corners=False,
                                  antialias=True).clamp_(0, 1)
        return (x - self.mean) / self.std

    def caption(self, images: torch.Tensor) -> list[str]:
        """Greedy captions, ``batch_size`` images at a time."""
        captions: list[str] = []
        for start in range(0, images.shape[0], self.batch_size):
            pixels = self.preprocess(images[start:start + self.batch_size])
            ids = self.model.generate(pixel_values=pixels, max_new_tokens=self.max_new_tokens,
                                      do_sample=False, num_beams=1)
            captions += [c.strip() for c in self.processor.batch_decode(ids, skip_special_tokens=True)]
        return captions

    @torch.inference_mode()
    def score_captions(self, captions: Sequence[str], prompts: Sequence[str]) -> torch.Tensor:
        """BERTScore F1 of each caption against its prompt, float32 CPU (N,); empty text scores 0."""
        if len(captions) != len(prompts):
            raise ValueError(f"captions: expected {len(prompts)} captions (one per prompt), got {len(captions)}")
        if not captions:
            return torch.zeros(0, dtype=torch.float32)
        self.metric.reset()
        self.metric.update(list(captions), list(prompts))
        return torch.as_tensor(self.metric.compute()["f1"]).reshape(-1).float().cpu()

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        check_reward_inputs(images, prompts)
        self.last_captions = self.caption(images)
        return self.score_captions(self.last_captions, prompts)


def _check_positive_int(name: str, value: Any, allow_none: bool = False) -> None:
    if allow_none and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        allowed = "a positive integer or null" if allow_none else "a positive integer"
        raise ValueError(f"reward.options.{name}: expected {allowed}, got {value!r}")


@register_reward("bertscore")
def bertscore(device: str | torch.device = "cpu", captioner: str = DEFAULT_CAPTIONER,
              scorer: str = DEFAULT_SCORER, num_layers: int | None = DEFAULT_NUM_LAYERS,
              batch_size: int = 16, max_new_tokens: int = 30, idf: bool = False) -> BERTScoreReward:
    """BLIP caption → BERTScore F1 against the prompt (defaults: BLIP-large, roberta-large layer 17).

    ``captioner`` / ``scorer`` are hub ids or local folders; ``num_layers`` picks the scorer layer
    (null: its last layer); ``batch_size`` bounds images captioned and texts encoded at once;
    ``max_new_tokens`` bounds caption length; ``idf`` weights tokens by inverse document frequency
    over the prompts scored together (so with idf a score depends on the rest of the batch).
    """
    for name, value in (("captioner", captioner), ("scorer", scorer)):
        if not isinstance(value, str) or not value:
            raise ValueError(f"reward.options.{name}: expected a hub id or a local folder, got {value!r}")
    _check_positive_int("num_layers", num_layers, allow_none=True)
    _check_positive_int("batch_size", batch_size)
    _check_positive_int("max_new_tokens", max_new_tokens)
    if not isinstance(idf, bool):
        raise ValueError(f"reward.options.idf: expected true or false, got {idf!r}")
    return BERTScoreReward(captioner, scorer, num_layers, batch_size, max_new_tokens, idf, device)
