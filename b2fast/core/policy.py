"""The diffusion policy: SD components loaded with diffusers/transformers, LoRA added with peft.

Everything the sampler and the trainer need from the model lives here: prompt embeddings
(cached, plus the empty prompt for CFG), the ε-prediction for a batch that may mix timesteps,
VAE decoding to images in [0, 1], the device-side DDIM step table, and the LoRA weights
(trainable, fp32, saved in the format ``pipe.load_lora_weights`` reads).
"""
from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path

import torch

from b2fast.config import ModelConfig
from b2fast.core.cuda_graphs import CapturedCalls
from b2fast.ops.reference.ddim import SQRT_1M_AB, SQRT_AB, add_noise
from b2fast.core.schedule import StepTable, build_lcm_table, build_step_table
from b2fast.utils import LORA_WEIGHTS_NAME, did_you_mean, first_line

TINY_SD = "b2fast:tiny-sd"
TOY = "b2fast:toy"  # the pretrained toy-world model shipped inside the package
TOY_LCM = "b2fast:toy-lcm"  # its latent consistency distillation, also shipped
SD_SUBFOLDERS = ("unet", "text_encoder", "tokenizer", "vae", "scheduler")
OPTIONAL_SUBFOLDERS = ("vae",)  # without a VAE the UNet works in pixel space (the toy world)


class ModelLoadError(ValueError):
    """The model path does not hold a loadable SD-layout model; the message says how to fix it."""


class LoraMismatchError(ValueError):
    """LoRA weights of another rank or other target modules than this policy's adapter."""


def hide_loading_progress() -> None:
    """No "Loading weights" bars from diffusers / transformers / the hub (ranks other than 0, or
    ``log.progress: false``)."""
    import diffusers.utils.logging
    import huggingface_hub.utils
    import transformers.utils.logging

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()


def resolve_model_path(path: str) -> str:
    """Map ``b2fast:tiny-sd``, ``b2fast:toy`` and ``b2fast:toy-lcm`` to their folders; check a local
    folder's layout up front."""
    if path == TINY_SD:
        from b2fast.testing.tiny_sd import cached_tiny_sd
        return str(cached_tiny_sd())
    if path in (TOY, TOY_LCM):
        from b2fast.toy.model import pretrained_path
        return str(pretrained_path("pretrained" if path == TOY else "pretrained_lcm"))
    if path.startswith("b2fast:"):
        hint = did_you_mean(path, (TOY, TOY_LCM, TINY_SD))
        raise ModelLoadError(f"model.path: unknown built-in model {path!r}{hint}; the built-ins are {TOY}, {TOY_LCM} "
                             f"and {TINY_SD}")
    local = Path(path).expanduser()
    looks_local = path.startswith((".", "/", "~")) or local.exists() or path.count("/") != 1
    if not looks_local:
        return path  # a hub id "org/name"
    if not local.is_dir():
        raise ModelLoadError(f"model.path: no such folder {path!r}; give a local folder in diffusers "
                             f"layout ({', '.join(SD_SUBFOLDERS)}) or a hub id like 'org/name'")
    missing = [s for s in SD_SUBFOLDERS if s not in OPTIONAL_SUBFOLDERS and not (local / s).is_dir()]
    if missing:
        raise ModelLoadError(f"model.path: {path!r} is not in diffusers layout: missing subfolder(s) "
                             f"{', '.join(missing)}")
    return str(local)


def _load(cls, path: str, subfolder: str, **kwargs):
    try:
        return cls.from_pretrained(path, subfolder=subfolder, **kwargs)
    except (OSError, ValueError, EnvironmentError) as exc:
        reason = first_line(exc) or type(exc).__name__
        raise ModelLoadError(f"model.path: cannot load {subfolder}/ from {path!r} ({reason}); check the "
                             "path or hub id, and that the weights are downloaded") from None


def _set_attention(modules: list[torch.nn.Module], choice: str, device: torch.device) -> str:
    """xformers when asked (or, for 'auto', when it imports and runs on this GPU), else SDPA."""
    if choice == "xformers" or (choice == "auto" and device.type == "cuda"):
        try:
            import xformers  # noqa: F401  (diffusers' check below needs the package)
            for module in modules:
                module.enable_xformers_memory_efficient_attention()
            return "xformers"
        except Exception as exc:  # not installed, no CUDA, or built for another torch
            if choice == "xformers":
                reason = first_line(exc, 160) or type(exc).__name__
                raise ModelLoadError(f"model.attention: xformers is not usable here ({reason}); "
                                     "use 'sdpa' or 'auto'") from None
    from diffusers.models.attention_processor import AttnProcessor2_0

    for module in modules:
        module.set_attn_processor(AttnProcessor2_0())
    return "sdpa"


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """(N, dim) sinusoidal embedding of 1000·w, the guidance input of latent consistency models
    (LCM's w_embedding; its pipelines pass w = guidance_scale − 1)."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=w.device) * -(math.log(10000.0) / (half - 1)))
    angles = 1000.0 * w.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    return torch.nn.functional.pad(emb, (0, dim % 2))


class Policy:
    """SD UNet (+ LoRA) with its text encoder, tokenizer, VAE and DDIM step table."""

    def __init__(self, cfg: ModelConfig, device: torch.device, num_steps: int, eta: float, scheduler: str = "ddim"):
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        self.device = torch.device(device)
        self.dtype = getattr(torch, cfg.dtype)
        path = resolve_model_path(cfg.path)
        kw = {"revision": cfg.revision} if cfg.revision else {}
        self.tokenizer = _load(CLIPTokenizer, path, "tokenizer", **kw)
        self.text_encoder = _load(CLIPTextModel, path, "text_encoder", torch_dtype=self.dtype, **kw)
        pixel_space = Path(path).is_dir() and not (Path(path) / "vae").is_dir()
        self.vae = None if pixel_space else _load(AutoencoderKL, path, "vae", torch_dtype=self.dtype, **kw)
        self.unet = _load(UNet2DConditionModel, path, "unet", torch_dtype=self.dtype, **kw)
        self.scheduler = _load(DDIMScheduler, path, "scheduler", **kw)
        for module in (self.text_encoder, self.vae, self.unet):
            if module is not None:
                module.requires_grad_(False).eval().to(self.device)
        # an LCM takes the guidance scale as an input embedding (one UNet pass, no CFG batch)
        self.guidance_dim = self.unet.config.time_cond_proj_dim
        if scheduler in ("lcm", "rlcm"):
            self._check_lcm(path, kw, scheduler)
            self.steps: StepTable = build_lcm_table(self.scheduler, num_steps,
                                                    rlcm_compat=scheduler == "rlcm").to(self.device)
        else:
            self.steps = build_step_table(self.scheduler, num_steps, eta).to(self.device)
        self.v_prediction = self.scheduler.config.prediction_type == "v_prediction"
        self._add_lora(cfg)
        self._embeddings: dict[str, torch.Tensor] = {}
        self._captured: dict[tuple, CapturedCalls] = {}
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.attention = self._configure_kernels(cfg)

    def _check_lcm(self, path: str, kw: dict, scheduler: str) -> None:
        """``sampling.scheduler: lcm`` needs a latent consistency model: a UNet with a guidance
        embedding, or a folder whose scheduler is diffusers' LCMScheduler (e.g. SD + fused LCM-LoRA)."""
        from diffusers import DDIMScheduler

        if self.guidance_dim is not None:
            return
        declared = DDIMScheduler.load_config(path, subfolder="scheduler", **kw).get("_class_name")
        if declared != "LCMScheduler":
            raise ModelLoadError(f"sampling.scheduler: {scheduler!r} needs a latent consistency model, but {path!r} has no "
                                 f"guidance embedding (unet time_cond_proj_dim) and its scheduler is {declared}; use "
                                 "an LCM (or an SD folder with a fused LCM-LoRA and LCMScheduler), or 'ddim'")

    # -- speed: same maths, other kernels ----------------------------------------------------
    def _configure_kernels(self, cfg: ModelConfig) -> str:
        """Attention backend, memory format and compilation; returns the attention backend used."""
        modules = [m for m in (self.unet, self.vae) if m is not None]
        attention = _set_attention(modules, cfg.attention, self.device)
        for module in modules:
            module.to(memory_format=self.memory_format)
        if cfg.compile:
            # Inductor keeps its FX-graph, autotuning and Triton caches here (it reads the variable at
            # each use): a second run with the same shapes loads the compiled kernels instead of
            # compiling them again.
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(cfg.compile_cache_dir).expanduser().resolve())
            mode = None if cfg.compile_mode == "default" else cfg.compile_mode
            self.unet.compile(mode=mode)
            if self.vae is not None:  # decode() calls the decoder module, not the VAE's forward
                self.vae.decoder.compile(mode=mode)
        return attention

    def captured(self, key: tuple, fn) -> CapturedCalls:
        """The CUDA-graph wrapper of ``fn`` kept under ``key`` (one per sampler setting); its
        graphs read the LoRA weights in place, so they stay valid across optimizer steps."""
        if key not in self._captured:
            self._captured[key] = CapturedCalls(fn)
        return self._captured[key]

    def enable_gradient_checkpointing(self) -> None:
        """Recompute the UNet blocks' activations in the backward pass (less memory, more time)."""
        self.unet.enable_gradient_checkpointing()

    # -- LoRA ---------------------------------------------------------------------------------
    def _add_lora(self, cfg: ModelConfig) -> None:
        """peft LoRA on the UNet attention projections; LoRA weights in fp32 over a frozen base."""
        from peft import LoraConfig

        lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, init_lora_weights="gaussian",
                          target_modules=list(cfg.lora_targets))
        try:
            self.unet.add_adapter(lora)
        except ValueError as exc:
            raise ModelLoadError(f"model.lora_targets: {cfg.lora_targets} do not match UNet modules ({exc})") from None
        for p in self.unet.parameters():
            if p.requires_grad:
                p.data = p.data.float()

    @contextlib.contextmanager
    def base_weights(self):
        """Run the base model, LoRA off (= the starting weights: peft starts LoRA's B at zero).
        Graphs captured meanwhile are dropped on exit: they were recorded without LoRA."""
        captured, self._captured = self._captured, {}
        self.unet.disable_adapters()
        try:
            yield self
        finally:
            self.unet.enable_adapters()
            self._captured = captured

    def lora_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.unet.parameters() if p.requires_grad]

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        from peft.utils import get_peft_model_state_dict
        return {k: v.detach().clone() for k, v in get_peft_model_state_dict(self.unet).items()}

    def load_lora_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy LoRA weights in place (parameters keep their storage, so captured graphs stay valid)."""
        from peft.utils import get_peft_model_state_dict
        own = get_peft_model_state_dict(self.unet)
        if set(own) != set(state) or any(own[k].shape != state[k].shape for k in own):
            raise LoraMismatchError("LoRA weights do not match this model's adapter (different rank or targets?)")
        params = dict(self.unet.named_parameters())
        with torch.no_grad():
            for name, param in params.items():
                if param.requires_grad:
                    key = name.replace(".default", "")
                    param.copy_(state[key].to(param.dtype))

    def load_lora(self, folder: str | os.PathLike) -> None:
        """Load LoRA weights written by :meth:`save_lora` (or any diffusers SD LoRA of this shape)."""
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import convert_unet_state_dict_to_peft

        state, _ = StableDiffusionPipeline.lora_state_dict(str(folder))
        unet = {k.removeprefix("unet."): v for k, v in state.items() if k.startswith("unet.")}
        self.load_lora_state_dict(convert_unet_state_dict_to_peft(unet))

    def save_lora(self, folder: str | os.PathLike) -> None:
        """Write LoRA weights as diffusers does, so ``pipe.load_lora_weights(folder)`` reads them."""
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import convert_state_dict_to_diffusers

        layers = convert_state_dict_to_diffusers(self.lora_state_dict())
        StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers,
                                                  weight_name=LORA_WEIGHTS_NAME, safe_serialization=True)

    # -- text -----------------------------------------------------------------------------------
    @torch.no_grad()
    def embed(self, prompts: list[str]) -> torch.Tensor:
        """(N, 77, D) text embeddings, computed once per distinct prompt and cached."""
        new = [p for p in dict.fromkeys(prompts) if p not in self._embeddings]
        if new:
            length = min(self.tokenizer.model_max_length, self.text_encoder.config.max_position_embeddings)
            ids = self.tokenizer(new, padding="max_length", max_length=length, truncation=True,
                                 return_tensors="pt").input_ids.to(self.device)
            hidden = self.text_encoder(ids)[0]
            self._embeddings.update(zip(new, hidden))
        return torch.stack([self._embeddings[p] for p in prompts])

    # -- UNet and VAE ---------------------------------------------------------------------------
    def predict_eps(self, x: torch.Tensor, step_index: torch.Tensor, cond: torch.Tensor,
                    guidance_scale: float, use_cfg: bool = True, max_batch: int = 0):
        """ε-predictions (ε_u or None, ε_c) for latents ``x`` at per-sample steps ``step_index``.

        With CFG the unconditional and conditional halves go through the UNet as one batch; a
        latent consistency model gets w as its guidance embedding instead (one pass, ε_u None).
        ``max_batch`` > 0 splits the call into chunks of at most that many images.
        """
        n = x.shape[0]
        if max_batch and n > max_batch:
            parts = [self.predict_eps(x[i:i + max_batch], step_index[i:i + max_batch],
                                      cond[i:i + max_batch], guidance_scale, use_cfg) for i in range(0, n, max_batch)]
            uncond = None if parts[0][0] is None else torch.cat([p[0] for p in parts])
            return uncond, torch.cat([p[1] for p in parts])
        t = self.steps.timesteps.index_select(0, step_index)
        x_in = x.to(self.dtype).contiguous(memory_format=self.memory_format)
        if self.guidance_dim is not None:  # an LCM: w enters as an embedding, never as CFG
            w = guidance_embedding(torch.full((n,), guidance_scale - 1.0, device=x.device), self.guidance_dim)
            out = self.unet(x_in, t, encoder_hidden_states=cond, timestep_cond=w.to(self.dtype)).sample
            return None, self._as_eps(out, x, step_index)
        if not use_cfg:
            return None, self._as_eps(self.unet(x_in, t, encoder_hidden_states=cond).sample, x, step_index)
        uncond = self.embed([""]).expand(n, -1, -1)
        out = self.unet(torch.cat([x_in, x_in]), torch.cat([t, t]),
                        encoder_hidden_states=torch.cat([uncond, cond])).sample
        eps_uncond, eps_cond = out.chunk(2)
        return self._as_eps(eps_uncond, x, step_index), self._as_eps(eps_cond, x, step_index)

    def _as_eps(self, out: torch.Tensor, x: torch.Tensor, step_index: torch.Tensor) -> torch.Tensor:
        """The UNet output as ε. v-prediction models (SD 2.x 768-v) predict v = √ᾱ·ε − √(1−ᾱ)·x₀,
        so ε = √ᾱ·v + √(1−ᾱ)·x_t (in fp32; CFG, linear, commutes with this map)."""
        if not self.v_prediction:
            return out
        rows = self.steps.table.index_select(0, step_index).float()
        shape = (-1,) + (1,) * (x.dim() - 1)
        return rows[:, SQRT_AB].view(shape) * out.float() + rows[:, SQRT_1M_AB].view(shape) * x.float()

    def denoising_error(self, x0: torch.Tensor, step_index: torch.Tensor, noise: torch.Tensor,
                        cond: torch.Tensor) -> torch.Tensor:
        """(N,) fp32 M(x0, t, e) = mean over elements of ‖ε(√ᾱ_t·x0 + √(1−ᾱ_t)·e, t, c) − e‖², the
        conditional prediction only (no CFG), at each sample's DDIM step ``step_index``."""
        x_t = add_noise(x0, noise, self.steps.table, step_index)
        _, eps = self.predict_eps(x_t, step_index, cond, 1.0, use_cfg=False)
        return (eps.float() - noise.float()).pow(2).flatten(1).mean(dim=1)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, max_batch: int = 0) -> torch.Tensor:
        """Latents → float32 images (N, 3, H, W) in [0, 1] (pixel-space models: x/2 + 1/2)."""
        if self.vae is None:
            return (latents.float() / 2 + 0.5).clamp(0, 1)
        chunks = latents.split(max_batch) if max_batch else (latents,)
        scale = self.vae.config.scaling_factor
        images = [self.vae.decode((c.to(self.dtype) / scale).contiguous(memory_format=self.memory_format)).sample
                  for c in chunks]
        return (torch.cat(images).float() / 2 + 0.5).clamp(0, 1)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        size = self.unet.config.sample_size
        return (self.unet.config.in_channels, size, size)
