"""Typed, validated configuration: one dataclass tree, YAML files, ``--section.field value`` overrides.

Defaults are the reference settings of B²-DiffuRL (Hu et al., CVPR 2025; docs/algorithm.md).
This module imports no torch, so ``--help`` and validation are instant and a bad config fails
before any model loads. Every error names the field, what was given and what is allowed, in one line.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from b2fast.utils import DEVICE_NAMES, did_you_mean, is_device_name

# Kernel backends of b2fast.ops (kept here too so the config stays torch-free).
BACKENDS = ("auto", "cuda", "triton", "cpp", "torch")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A field with its documentation (shown by ``--help`` and the README's config reference)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: json.loads(json.dumps(d)), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


DTYPES, ATTENTION = ("float32", "float16", "bfloat16"), ("auto", "sdpa", "xformers")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
OVERLAP, SCHEDULERS, REDUCTIONS = ("auto", "on", "off"), ("ddim", "lcm", "rlcm"), ("mean", "sum")
# Objectives registered in b2fast.core.objectives (kept here too so the config stays torch-free;
# tests/test_config.py checks the two lists agree).
OBJECTIVES = ("ppo", "d3po", "dro", "dro_unpaired", "diffusion_dpo")
PAIR_MODES, OPTIMIZERS, LR_SCHEDULES = ("thresholds", "always"), ("adamw", "nsgd"), ("constant", "cosine")


@dataclass
class ModelConfig:
    path: str = _f("runwayml/stable-diffusion-v1-5",
                   "hub id or local folder in diffusers layout (unet/, text_encoder/, tokenizer/, "
                   "vae/, scheduler/); 'b2fast:toy' is the shipped toy-world model ('b2fast:toy-lcm' its LCM), "
                   "'b2fast:tiny-sd' builds a tiny random SD-layout model for smoke tests")
    revision: str | None = _f(None, "hub revision (branch, tag or commit) when path is a hub id")
    dtype: str = _f("float16", f"dtype of the frozen base weights, one of {DTYPES}; LoRA weights stay fp32. "
                               "float16 (SD 1.x/2.x's own dtype) keeps a LoRA update of >= 0.05% of a projection's "
                               "output visible in the forward pass; bfloat16 rounds away updates below ~0.2-0.4%")
    lora_rank: int = _f(4, "LoRA rank r")
    lora_alpha: float = _f(4.0, "LoRA alpha (scale = alpha / rank)")
    lora_targets: list[str] = _f(["to_q", "to_k", "to_v", "to_out.0"], "UNet module names that get LoRA")
    attention: str = _f("auto", f"attention kernels of the UNet and VAE, one of {ATTENTION}: 'auto' = xformers when "
                                "it imports and runs on this device, else PyTorch SDPA (flash/cuDNN/efficient)")
    channels_last: bool = _f(False, "store UNet and VAE activations channels-last (NHWC)")
    compile: bool = _f(False, "torch.compile the UNet and the VAE decoder (first calls of each batch shape "
                              "compile; the compiled artifacts are cached on disk, see compile_cache_dir)")
    compile_mode: str = _f("default", f"torch.compile mode, one of {COMPILE_MODES}")
    compile_cache_dir: str = _f("~/.cache/b2fast/inductor", "where torch.compile keeps compiled kernels and graphs "
                                "between runs (sets TORCHINDUCTOR_CACHE_DIR when compile is on)")


PROMPT_SAMPLING, SELECTION_KINDS, NULL_CONTROLS = ("uniform", "balanced"), ("b2", "ddpo"), ("off", "shuffle", "zero")


@dataclass
class PromptConfig:
    source: str = _f("animal_activity", "built-in prompt set name, or a file: JSON list or one prompt per line; "
                     "several as a YAML list or comma-separated ('toy_attribute,toy_spatial')", joins_list=True)
    split: str = _f("train", "split of a built-in prompt set: 'train' or 'test'")
    sampling: str = _f("uniform", f"how stage prompts are drawn, one of {PROMPT_SAMPLING}: 'uniform' over all "
                                  "prompts of all sources; 'balanced' = a source uniformly (the built-in 'toy' "
                                  "counts as its three templates), then a prompt uniformly within it")


@dataclass
class SamplingConfig:
    num_steps: int = _f(20, "denoising steps S (an LCM: 1-8, e.g. 4)")
    scheduler: str = _f("ddim", f"one of {SCHEDULERS}: DDIM with eta; an LCM's multistep sampling as in diffusers "
                                "(eta unused); 'rlcm': as in RLCM's code (its timesteps, a noisy trained last step)")
    guidance_scale: float = _f(5.0, "classifier-free guidance scale w (1 disables the unconditional pass)")
    eta: float = _f(1.0, "DDIM eta; 0 is deterministic and gives no policy gradient")
    branches: int = _f(5, "branches K forked from each trunk")
    prompts_per_batch: int = _f(8, "prompts P per sampling batch (trunk batch size)")
    batches_per_stage: int = _f(32, "sampling batches per stage; images per stage = batches x P x K")
    cache_dtype: str = _f("float32", f"dtype of stored latents, one of {DTYPES}; bfloat16 keeps 8 significant "
                          "bits, so at SD's last step (sigma ~0.02) it rounds x_t' by up to 38% of sigma for values "
                          "below 4 in magnitude, 76% below 8: a labelled low-memory option")
    logprob_reduction: str = _f("mean", "log-prob over latent elements: 'mean' (DDPO) or 'sum'")
    unet_batch: int = _f(0, "max images per UNet call while sampling (0 = the whole batch)")
    cuda_graphs: bool = _f(False, "capture each batch shape's denoising step (UNet + CFG + DDIM step) as a CUDA "
                                  "graph and replay it (CUDA only; ignored on a CPU)")
    overlap_reward: str = _f("auto", f"one of {OVERLAP}: decode and score batch i in a worker (its own CUDA stream) "
                                     "while batch i+1 samples; 'auto' = on with CUDA, off on a CPU")


@dataclass
class ScheduleConfig:
    kind: str = _f("linear", "interval schedule: 'linear' (equal plateaus), 'constant', or 'module:function'")
    num_stages: int = _f(100, "number of stages N")
    min_interval: int = _f(14, "trained steps L_min at stage 0")
    max_interval: int = _f(20, "trained steps L_max of the last plateau (<= sampling.num_steps); 'linear' reaches "
                               "it when num_stages >= max_interval - min_interval + 1")


@dataclass
class SelectionConfig:
    history_stages: int = _f(8, "previous stages H whose rewards join the per-prompt statistics")
    pos_threshold: float = _f(0.5, "keep a group's best branch when its z-score >= this")
    neg_threshold: float = _f(-0.5, "keep a group's worst branch when its z-score < this")
    kind: str = _f("b2", f"selection and normalisation, one of {SELECTION_KINDS}: 'b2' = per-prompt z over "
                         "H stages, best/worst branch per group by the thresholds; 'ddpo' = every sample kept, "
                         "DDPO's per-prompt stat tracking (buffer_size, min_count)")
    buffer_size: int = _f(32, "ddpo: rewards per prompt kept for its statistics (the newest; ddpo-pytorch's 32)")
    min_count: int = _f(16, "ddpo: below this many buffered rewards a prompt is normalised with the whole "
                            "stage's mean and std instead of its own (ddpo-pytorch's 16)")
    null_control: str = _f("off", f"one of {NULL_CONTROLS}: 'shuffle' permutes the kept samples' advantages "
                                  "within the stage (and swaps each pair's winner and loser with probability "
                                  "1/2), 'zero' sets them to 0 — a run that must NOT learn, beside every claim "
                                  "that a setting does")
    pair_mode: str = _f("thresholds", f"pair objectives, one of {PAIR_MODES}: 'thresholds' = a group gives its "
                                      "(best, worst) pair when both pass the thresholds; 'always' = whenever "
                                      "the best's reward exceeds the worst's")


@dataclass
class TrainConfig:
    objective: str = _f("ppo", f"policy objective, one of {OBJECTIVES}: 'ppo' = DDPO-style PPO-clip on the kept "
                                "branches' interval steps (the paper's); d3po, dro, dro_unpaired, diffusion_dpo "
                                "train on the same branches (docs/algorithm.md, 'Objectives')")
    optimizer: str = _f("adamw", f"one of {OPTIMIZERS}: 'adamw' (DDPO's); 'nsgd' = SGD on the gradient scaled to "
                                  "unit norm, so every step moves the LoRA weights exactly lr (with train.momentum): "
                                  "keeps the gradient's direction where AdamW's per-coordinate scaling amplifies "
                                  "noise (few samples per step; docs/algorithm.md, 'Policy update')")
    lr: float = _f(1e-4, "learning rate (nsgd: Euclidean length of each step in LoRA-weight space)")
    lr_schedule: str = _f("constant", f"one of {LR_SCHEDULES}: the stage's learning rate, lr throughout, or "
                                      "lr * (1 + cos(pi * stage / num_stages)) / 2 (late stages refine, not undo)")
    lr_warmup_stages: int = _f(0, "stage s < this trains at (s+1)/(this+1) of the scheduled lr (0 = none)")
    momentum: float = _f(0.0, "nsgd: heavy-ball momentum over optimizer steps (0 = none)")
    max_step_gain: float = _f(0.0, "interval steps whose log-prob gradient gain |dmu/deps|/sigma_t exceeds this multiple "
                                   "of the median are not trained: the near-deterministic step to t=1 (gain 5-14x) "
                                   "adds only gradient noise (0 = train every interval step, as the paper)")
    weight_decay: float = _f(1e-4, "AdamW weight decay")
    adam_beta1: float = _f(0.9, "AdamW beta1")
    adam_beta2: float = _f(0.999, "AdamW beta2")
    adam_eps: float = _f(1e-8, "AdamW epsilon")
    max_grad_norm: float = _f(1.0, "gradient-norm clip (0 disables)")
    clip_range: float = _f(0.1, "PPO ratio clip epsilon")
    target_kl: float = _f(0.0, "ppo: end the stage's update before a step whose units' approx-KL (before the step) "
                               "exceeds 1.5 x this, as stable-baselines3's target_kl (0 = off)")
    d3po_beta: float = _f(0.1, "d3po: beta of -log sigmoid(beta * (log rho_w - log rho_l)) (the official code's)")
    d3po_clip: float = _f(0.1, "d3po: ratios to the base model clamped to [1 - clip, 1 + clip] (the official "
                               "code's; zero gradient outside)")
    dpo_beta: float = _f(5000.0, "diffusion_dpo: beta of the implicit reward (Diffusion-DPO's value for SD 1.5)")
    loser_guard: float = _f(0.1, "dro, dro_unpaired: stop a loser's gradient once its denoising error exceeds the "
                                 "base model's by this fraction; the loser term is unbounded below, so without "
                                 "the guard (0) a long run can only stop by breaking the model")
    adv_clip: float = _f(5.0, "advantages clamped to [-adv_clip, adv_clip]")
    pos_weight: float = _f(1.0, "advantage weight beta+ for positive samples")
    neg_weight: float = _f(1.0, "advantage weight beta- for negative samples")
    trajectories_per_step: int = _f(128, "trajectories whose interval steps one optimizer step sees")
    micro_batch: int = _f(8, "(trajectory, step) pairs per UNet forward+backward; 0 = the most that fits in "
                             "the free GPU memory, measured once at the first update (8 on a CPU)")
    epochs: int = _f(2, "passes over the selected trajectories per stage")
    cfg: bool = _f(True, "apply CFG in the training log-prob, as at sampling time (needed for ratio = 1)")
    gradient_checkpointing: bool = _f(False, "recompute UNet block activations in the backward pass: less "
                                             "memory, one more forward's time (bench train measures both)")


@dataclass
class RewardConfig:
    name: str = _f("clipscore", "registered reward name, or 'module:function'")
    options: dict = _f({}, "keyword options of the reward, e.g. {model_name: ViT-H-14, pretrained: laion2b_s32b_b79k}")


@dataclass
class EvalConfig:
    enabled: bool = _f(False, "evaluate alignment before training and after it, and print the table")
    prompt_sets: list[str] = _f([], "prompt sets to evaluate (empty: the toy templates for a toy run, "
                                "else prompts.source)")
    splits: list[str] = _f(["train", "test"], "splits of each prompt set to evaluate")
    images_per_prompt: int = _f(4, "images per prompt (same seeds before and after)")
    prompts_per_set: int = _f(12, "prompts per set and split, spread evenly over the list (0 = all)")


@dataclass
class LogConfig:
    grid_every: int = _f(1, "write a sample grid PNG every this many stages (0 = never)")
    grid_images: int = _f(16, "images per sample grid")
    tensorboard: bool = _f(False, "also log scalars to TensorBoard (needs the tensorboard package)")
    progress: bool = _f(True, "show progress bars")
    samples: bool = _f(True, "append every image's prompt, reward, z-score, branch group and selection (and the "
                             "caption of a captioning reward) to samples.jsonl")


# steer.kind, and FK's potentials, resampling and weights (b2fast.core.steering; docs in README, "Sampling").
STEER_KINDS, POTENTIALS = ("none", "fk"), ("diff", "max", "add", "rt")
RESAMPLE_MODES, FK_WEIGHTS = ("schedule", "adaptive"), ("smc", "official")


@dataclass
class SteerConfig:
    kind: str = _f("none", f"one of {STEER_KINDS}: 'fk' = Feynman-Kac steering in python -m b2fast.sample "
                           "(training refuses it)")
    particles: int = _f(4, "fk: particles N per prompt and seed, one batch, resampled within their prompt")
    lam: float = _f(10.0, "fk: lambda >= 0; the particles target p(x)*exp(lambda*r(x)) (0: plain sampling)")
    potential: str = _f("diff", f"fk: one of {POTENTIALS}: exp(lam*(r-r_prev)), exp(lam*max(r,r_prev)), "
                                "exp(lam*(r+r_prev)), exp(lam*r)")
    resample: str = _f("schedule", f"fk: one of {RESAMPLE_MODES}: at each potential step, or when ESS < N/2 "
                                   "(the last step: always the ESS test)")
    start: int = _f(5, "fk: first potential step of a 100-step chain, scaled to sampling.num_steps (20 steps: 1)")
    every: int = _f(5, "fk: steps between potential steps of a 100-step chain, scaled (at least 1)")
    end: int = _f(30, "fk: last scheduled potential step of a 100-step chain, scaled; the final step always is one")
    weights: str = _f("smc", f"fk: one of {FK_WEIGHTS}: log-weights kept over skipped steps (SMC), or each "
                             "step's alone (the official code)")


DIST_BACKENDS = ("auto", "nccl", "gloo")


@dataclass
class DistributedConfig:
    backend: str = _f("auto", "torch.distributed backend under torchrun: 'auto' (nccl on GPUs, gloo on CPUs), "
                              "'nccl' or 'gloo'")
    timeout_s: float = _f(1800.0, "seconds a rank waits in a collective before the job stops with an error (a crashed "
                          "or stalled rank); must exceed the before/after evaluation, which rank 0 runs alone")


@dataclass
class Config:
    seed: int = _f(0, "random seed: noise, prompt order and LoRA init derive from it")
    device: str = _f("auto", "'auto' (cuda when available), 'cpu', 'cuda' or 'cuda:N'")
    backend: str = _f("auto", "kernel backend of the fused ops: 'auto' (fastest available), 'cuda', "
                              "'triton', 'cpp' or 'torch' (the B2FAST_BACKEND variable sets the default)")
    out: str = _f("runs/b2fast", "output directory (metrics, checkpoints, images)")
    checkpoint_every: int = _f(1, "write a checkpoint every this many stages")
    keep_checkpoints: int = _f(3, "keep only the newest this many checkpoints")
    model: ModelConfig = field(default_factory=ModelConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    steer: SteerConfig = field(default_factory=SteerConfig)


# ---------------------------------------------------------------------------------------------
# Loading and overriding

def _coerce(value: Any, annotation: Any, name: str) -> Any:
    """Convert ``value`` (from YAML or a CLI string) to the field's type, or raise ConfigError."""
    if annotation == (str | None) and value in ("null", "None", "~"):
        return None
    if isinstance(value, str) and annotation is not str and annotation != (str | None):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ConfigError(f"{name}: cannot parse {value!r}") from None
    if get_origin(annotation) is not None and type(None) in get_args(annotation):
        if value is None:
            return None
        annotation = next(a for a in get_args(annotation) if a is not type(None))
    if annotation is float and isinstance(value, str):
        try:  # YAML 1.1 reads '3e-4' as a string
            value = float(value)
        except ValueError:
            raise ConfigError(f"{name}: expected a number, got {value!r}") from None
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    origin = get_origin(annotation) or annotation
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        return [str(v) for v in value]
    if not isinstance(value, origin) or (origin in (int, float) and isinstance(value, bool)):
        raise ConfigError(f"{name}: expected {origin.__name__}, got {value!r}")
    return value


def _resolve(cfg: Config, dotted: str) -> tuple[Any, str, Any]:
    """(section object, field name, type annotation) of a leaf field; ConfigError if none."""
    node: Any = cfg
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(node) or part not in {f.name for f in dataclasses.fields(node)}:
            where = ".".join(parts[:i]) or "config"
            known = [f.name for f in dataclasses.fields(node)] if dataclasses.is_dataclass(node) else []
            hint = did_you_mean(part, known)
            raise ConfigError(f"{dotted}: unknown field {part!r} in {where}{hint}; known: {', '.join(known)}")
        if i < len(parts) - 1:
            node = getattr(node, part)
    annotation = get_type_hints(type(node))[parts[-1]]
    if dataclasses.is_dataclass(annotation):
        raise ConfigError(f"{dotted}: is a section; set its fields, e.g. {dotted}.<field>")
    return node, parts[-1], annotation


def _set(cfg: Config, dotted: str, value: Any) -> None:
    node, name, annotation = _resolve(cfg, dotted)
    meta = next(f.metadata for f in dataclasses.fields(node) if f.name == name)
    if meta.get("joins_list") and isinstance(value, list):  # a YAML list of names -> 'a,b,c'
        if not value or not all(isinstance(v, str) and v.strip() and "," not in v for v in value):
            raise ConfigError(f"{dotted}: expected a non-empty list of names or paths without commas, got {value!r}")
        value = ",".join(v.strip() for v in value)
    setattr(node, name, _coerce(value, annotation, dotted))


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and name not in ("reward.options",):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def apply_dict(cfg: Config, tree: dict) -> Config:
    for name, value in _flatten(tree).items():
        _set(cfg, name, value)
    return cfg


def presets_dir() -> Path:
    """The presets shipped in the package (``b2fast/configs``)."""
    return Path(str(resources.files("b2fast") / "configs"))


def find_config(path: str | Path) -> Path:
    """A YAML file, or a shipped preset's name (``sd15_clipscore`` or ``sd15_clipscore.yaml``, any folder)."""
    path = Path(path)
    if path.is_file() or path.parent != Path("."):
        return path
    candidates = (presets_dir() / path.name, presets_dir() / f"{path.name}.yaml")
    return next((c for c in candidates if c.is_file()), path)


def load_yaml(path: str | Path, cfg: Config | None = None) -> Config:
    """Read a YAML config (a file or a shipped preset's name) over the defaults (or over ``cfg``)."""
    path = find_config(path)
    if not path.is_file():
        shipped = sorted(p.stem for p in presets_dir().glob("*.yaml"))
        raise ConfigError(f"--config: no such file {str(path)!r}{did_you_mean(path.stem, shipped)}; give a YAML "
                          f"file or a shipped preset ({', '.join(shipped)})")
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"--config: {path} is not valid YAML{where}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"--config: {path} is not UTF-8 text; save it as UTF-8") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"--config: {path} must hold a mapping of sections, got {type(tree).__name__}")
    return apply_dict(cfg or Config(), tree)


def apply_overrides(cfg: Config, args: list[str]) -> Config:
    """Apply ``--section.field value`` (or ``--section.field=value``) pairs."""
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like --train.lr 3e-4")
        key, eq, value = arg[2:].partition("=")
        _resolve(cfg, key)  # an unknown field is named as such, even without a value
        if not eq:
            if i + 1 >= len(args):
                raise ConfigError(f"{key}: missing value after --{key}")
            value, i = args[i + 1], i + 1
        _set(cfg, key, value)
        i += 1
    return cfg


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """``field: old -> new`` for every leaf that differs between two :func:`to_dict` trees."""
    changed = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            changed.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return changed


def iter_fields(node: Any = None, prefix: str = ""):
    """Yield ``(dotted name, default, help)`` for every leaf field (for --help and docs)."""
    node = node if node is not None else Config()
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            yield from iter_fields(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", value, f.metadata.get("help", "")


# ---------------------------------------------------------------------------------------------
# Validation: every rule in one place, run before any model loads.

def _check(ok: bool, name: str, value: Any, allowed: str, choices=()) -> None:
    if not ok:
        raise ConfigError(f"{name}: got {value!r}{did_you_mean(value, choices)}, expected {allowed}")


_CHOICES = {"model.dtype": DTYPES, "model.attention": ATTENTION, "model.compile_mode": COMPILE_MODES,
            "sampling.overlap_reward": OVERLAP, "sampling.scheduler": SCHEDULERS, "sampling.cache_dtype": DTYPES,
            "sampling.logprob_reduction": REDUCTIONS, "prompts.sampling": PROMPT_SAMPLING,
            "selection.kind": SELECTION_KINDS, "selection.null_control": NULL_CONTROLS, "train.lr_schedule": LR_SCHEDULES,
            "selection.pair_mode": PAIR_MODES, "train.optimizer": OPTIMIZERS, "train.objective": OBJECTIVES,
            "backend": BACKENDS, "distributed.backend": DIST_BACKENDS, "steer.kind": STEER_KINDS,
            "steer.potential": POTENTIALS, "steer.resample": RESAMPLE_MODES, "steer.weights": FK_WEIGHTS}
_AT_LEAST = {"model.lora_rank": 1, "sampling.num_steps": 1, "sampling.branches": 1, "sampling.prompts_per_batch": 1,
             "sampling.batches_per_stage": 1, "sampling.unet_batch": 0, "schedule.num_stages": 1,
             "selection.history_stages": 0, "selection.buffer_size": 1, "train.trajectories_per_step": 1,
             "train.epochs": 1, "train.lr_warmup_stages": 0, "eval.images_per_prompt": 1, "eval.prompts_per_set": 0,
             "log.grid_every": 0, "log.grid_images": 1, "keep_checkpoints": 1, "checkpoint_every": 1}  # integer fields


def validate(cfg: Config, training: bool = True) -> Config:
    """Raise :class:`ConfigError` naming the first invalid field; return ``cfg`` when all is well.
    ``training=False`` (the sample CLI): no training-only rules, steering allowed."""
    m, s, sc, sel, t = cfg.model, cfg.sampling, cfg.schedule, cfg.selection, cfg.train
    values = {name: value for name, value, _ in iter_fields(cfg)}
    for name, value in values.items():
        _check(not isinstance(value, float) or math.isfinite(value), name, value, "a finite number")
    for name, choices in _CHOICES.items():
        _check(values[name] in choices, name, values[name], f"one of {choices}", choices)
    for name, low in _AT_LEAST.items():
        _check(values[name] >= low, name, values[name], f"an integer >= {low}")
    _check(0 <= cfg.seed < 2 ** 63, "seed", cfg.seed, "an integer in [0, 2**63)")
    _check(bool(m.path), "model.path", m.path, "a hub id or a local folder")
    _check(m.lora_alpha > 0, "model.lora_alpha", m.lora_alpha, "a number > 0")
    _check(bool(m.compile_cache_dir), "model.compile_cache_dir", m.compile_cache_dir, "a folder path")
    _check(not (s.cuda_graphs and m.compile and m.compile_mode in ("reduce-overhead", "max-autotune")),
           "sampling.cuda_graphs", s.cuda_graphs,
           f"false with model.compile_mode={m.compile_mode!r}, which captures CUDA graphs itself "
           "(or compile_mode 'default' / 'max-autotune-no-cudagraphs')")
    _check(len(m.lora_targets) > 0, "model.lora_targets", m.lora_targets, "a non-empty list of module names")
    _check(cfg.prompts.split in ("train", "test"), "prompts.split", cfg.prompts.split, "'train' or 'test'")
    src = cfg.prompts.source
    _check(Path(src).is_file() or all(part.strip() for part in src.split(",")), "prompts.source", src,
           "a prompt set name or a file, or several separated by commas (no empty entries)")
    _check(s.guidance_scale >= 0, "sampling.guidance_scale", s.guidance_scale, "a number >= 0")
    _check(0 <= s.eta <= 1, "sampling.eta", s.eta, "a number in [0, 1]")
    _check(1 <= sc.min_interval <= sc.max_interval, "schedule.min_interval", sc.min_interval,
           f"an integer in [1, schedule.max_interval={sc.max_interval}]")
    _check(not training or sc.max_interval <= s.num_steps, "schedule.max_interval", sc.max_interval,
           f"an integer <= sampling.num_steps={s.num_steps}")
    _check(sel.neg_threshold < sel.pos_threshold, "selection.neg_threshold", sel.neg_threshold,
           f"a number < selection.pos_threshold={sel.pos_threshold}")
    _check(1 <= sel.min_count <= sel.buffer_size, "selection.min_count", sel.min_count,
           f"an integer in [1, selection.buffer_size={sel.buffer_size}]")
    for name in ("lr", "adam_eps", "clip_range", "adv_clip", "d3po_beta", "dpo_beta"):
        _check(getattr(t, name) > 0, f"train.{name}", getattr(t, name), "a number > 0")
    _check(t.max_step_gain == 0 or t.max_step_gain >= 1, "train.max_step_gain", t.max_step_gain, "0 or a number >= 1")
    for name in ("weight_decay", "max_grad_norm", "pos_weight", "neg_weight", "target_kl", "loser_guard"):
        _check(getattr(t, name) >= 0, f"train.{name}", getattr(t, name), "a number >= 0")
    for name in ("adam_beta1", "adam_beta2", "momentum"):
        _check(0 <= getattr(t, name) < 1, f"train.{name}", getattr(t, name), "a number in [0, 1)")
    _check(t.objective == "ppo" or sel.kind == "b2", "train.objective", t.objective,
           "'ppo' with selection.kind 'ddpo' (the other objectives need B² branch groups)")
    _check(t.target_kl == 0 or t.objective == "ppo", "train.target_kl", t.target_kl, "0 (only ppo measures KL)")
    _check(0 < t.d3po_clip < 1, "train.d3po_clip", t.d3po_clip, "a number in (0, 1)")
    _check(t.lr_warmup_stages < sc.num_stages, "train.lr_warmup_stages", t.lr_warmup_stages, "< schedule.num_stages")
    _check(t.micro_batch >= 0, "train.micro_batch", t.micro_batch, "an integer >= 1, or 0 for automatic")
    _check(bool(cfg.reward.name), "reward.name", cfg.reward.name, "a reward name or 'module:function'")
    splits = cfg.eval.splits
    _check(all(sp in ("train", "test") for sp in splits) and bool(splits), "eval.splits", splits,
           "a non-empty list of 'train' / 'test'")
    _check(cfg.distributed.timeout_s > 0, "distributed.timeout_s", cfg.distributed.timeout_s, "a number > 0")
    _check(is_device_name(cfg.device), "device", cfg.device, DEVICE_NAMES)
    st = cfg.steer
    for name, low in (("particles", 1), ("lam", 0), ("start", 0), ("every", 1), ("end", st.start)):
        _check(getattr(st, name) >= low, f"steer.{name}", getattr(st, name), f"a number >= {low}")
    _check(st.kind == "none" or s.eta > 0, "sampling.eta", s.eta, "> 0 with steer.kind 'fk' (copies need fresh noise)")
    _check(st.kind == "none" or s.scheduler != "rlcm", "sampling.scheduler", s.scheduler,
           "'ddim' or 'lcm' with steer.kind 'fk' ('rlcm' is RLCM's training policy: its image is not its last latent)")
    _check(not training or st.kind == "none", "steer.kind", st.kind, "'none' for training: steered samples are not "
           "samples of the policy, so PPO ratios and z-scores would be biased (steer in python -m b2fast.sample)")
    return cfg
