"""Typed, strict run configuration: nested dataclasses loaded from YAML plus `key.path=value` overrides.

`load_config(path, overrides)` reads the file, applies the overrides, checks every key and type against the
annotations below and returns a `Config`; `save_config` writes the fully resolved config back (active trainer only).
Every mistake a user can make raises `UserInputError` with one sentence naming the key or file.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import types
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from diffrl.atomic_files import write_text_atomic
from diffrl.errors import UserInputError, unknown_name
from diffrl.sample_settings import check_settings
from diffrl.trainers import TRAINERS, section_name, trainer_entry


@dataclass
class SampleConfig:
    num_steps: int = 50             # DDIM sampling steps (DRaFT, DDPO: 50)
    guidance_scale: float = 7.5     # classifier-free guidance scale; <= 1 disables CFG (SD default 7.5)
    eval_guidance_scale: float | None = None  # guidance of grids and `diffrl evaluate`; None: guidance_scale. Train
    # CFG-free (guidance_scale 1) and look with CFG, as Flow-GRPO's maintainers recommend for flow models
    eta: float = 0.0                # DDIM stochasticity in [0, 1]: 0 deterministic (DRaFT), 1 for DDPO/DPOK
    batch_size: int = 4             # prompts per process per training step
    resolution: int | None = None   # image side in pixels; None: the model's default
    negative_prompt: str = ""       # text of the unconditional CFG branch
    scheduler: str | None = None    # the kind of step (a transition kernel); None: the model family's own (ddim for
    # SD 1.x/2.x/SDXL, flow_euler for flow models). Diffusion models: ddim | euler_ancestral (SD-Turbo) | lcm
    # (LCM-LoRA); flow models: flow_euler (ODE) | flow_sde (Flow-GRPO); each step recomputable with log-probs;
    # or any diffusers scheduler class (e.g. DPMSolverMultistepScheduler) for plain sampling
    noise_level: float = 0.7        # flow_sde's noise scale a, σ_t = a √(σ/(1−σ)) (Flow-GRPO: 0.7)
    schedule: str = "model"         # the noise schedule, a preset over the model's scheduler config: model (as is) |
    # trailing (few-step students: SD-Turbo, SDXL-Turbo) | adjoint_matching (DDIM; the SOC recipe)
    timesteps: list[int] | None = None  # explicit timesteps, lcm only (DMD2 4-step: [999, 749, 499, 249]); their
    # count must equal num_steps; None: num_steps spaced by the scheduler
    vae_slicing: bool = False       # decode one image at a time: SD 1.5, 4 images at 256 px: 1054 -> 256 MiB, same time


@dataclass
class TrainConfig:
    steps: int = 1000               # trainer steps (outer iterations); optimizer steps = steps / accumulation
    learning_rate: float = 1e-4     # AdamW learning rate of the LoRA weights (recipes: DRaFT 4e-4, DDPO 3e-4)
    lora_rank: int = 4              # LoRA rank r of each adapted projection (DDPO, DPOK: 4; DRaFT recipe: 8)
    lora_alpha: float | None = None  # LoRA scale numerator (scale = alpha / rank); None means alpha = lora_rank
    lora_target_modules: list[str] | None = None  # denoiser modules that get LoRA; None: the family's attention
    # projections (SD, SDXL: to_q, to_k, to_v, to_out.0; SD3 adds the text stream's add_q/k/v_proj, to_add_out)
    weight_decay: float = 0.0       # AdamW decoupled weight decay (DRaFT recipe: 0.1)
    adam_beta1: float = 0.9         # AdamW beta1 (PyTorch default)
    adam_beta2: float = 0.999       # AdamW beta2 (PyTorch default)
    adam_epsilon: float = 1e-8      # AdamW epsilon (PyTorch default)
    lr_scheduler: str = "constant"  # a diffusers.optimization.get_scheduler name, e.g. constant, cosine
    lr_warmup_steps: int = 0        # warmup length of lr_scheduler, in optimizer steps
    max_grad_norm: float = 1.0      # global grad-norm clip before each optimizer step (DDPO: 1.0)
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step (accelerate owns the accumulation)
    gradient_checkpointing: bool | None = None  # recompute activations in backward (DRaFT-1, SD 1.5: 31 -> 13 GB,
    # +17% time); None: on for trainers that backpropagate through sampling (draft), off for those whose graph is one
    # UNet call (ddpo, loop, dpok, adjoint_matching: +50% time on their training pass, as in DDPO's official code)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"  # autocast dtype; LoRA weights and log-probs stay float32
    vae_float32: bool | None = None  # keep the VAE in float32 under fp16/bf16 weights; None: when the VAE's config
    # asks for it (force_upcast: SDXL's VAE overflows in fp16) and weights are fp16, as diffusers' SDXL pipeline does
    attention: Literal["sdpa", "xformers"] = "sdpa"  # UNet/VAE attention kernel; xformers needs its package + a GPU
    compile: bool = False           # torch.compile the UNet (tiny model, CPU: 2x faster steps after ~2 min of compiling)
    seed: int = 0                   # seeds torch, numpy and python RNGs; same seed + config = same run
    max_nonfinite_skips: int = 0    # steps with a NaN/inf loss, reward or grad norm undone and skipped; 0 = stop at 1st


@dataclass
class LogConfig:
    every: int = 1                  # write a metrics.jsonl line every N steps
    grid_every: int = 100           # save grids/step-N.png every N steps
    checkpoint_every: int = 100     # save checkpoints/step-N every N steps
    keep_last: int | None = None    # checkpoints kept on disk (oldest deleted first); None keeps all
    tracker: Literal["none", "tensorboard", "wandb"] = "none"  # where metrics go besides metrics.jsonl
    grid_prompts: int = 4           # grid rows: the first N prompts of the prompt file
    grid_seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3])  # grid columns: one fixed seed each


@dataclass
class SharedConfig:
    """The sections every run has; Config adds one section per trainer of diffrl.trainers.TRAINERS."""

    model: str = "tiny"             # hub id, local diffusers folder, single-file checkpoint, or built-in name
    base_lora: str | None = None    # a LoRA fused into the model before training, making the student (LCM-LoRA,
    # DMD2): a local .safetensors file or folder, or owner/repo/file.safetensors on the hub
    base_lora_scale: float = 1.0    # the fused LoRA's scale (diffusers' fuse_lora lora_scale)
    vae: str | None = None          # a replacement VAE (hub id or local folder), e.g. madebyollin/sdxl-vae-fp16-fix
    # to decode SDXL in fp16; None: the model's own
    trainer: str = "draft"          # which trainer section below is used: a TRAINERS name or "package.module:Class"
    reward: str | dict[str, float] = field(default_factory=lambda: {"brightness": 1.0})  # name, mod:Class or {name: w}
    reward_weights: dict[str, str] = field(default_factory=dict)  # reward name -> local weights file/folder; else HF
    prompts: str = "assets/prompts/simple.txt"  # text file, one prompt per line
    sample: SampleConfig = field(default_factory=SampleConfig)  # how images are sampled during training
    train: TrainConfig = field(default_factory=TrainConfig)     # optimizer, LoRA and run length
    log: LogConfig = field(default_factory=LogConfig)           # metrics, grids and checkpoints

    def __post_init__(self) -> None:
        validate(self)


def _with_sections(base: type, sections: dict[str, type]) -> type:
    """``base`` plus one field per trainer section, named like the trainer, defaulting to the section's defaults
    (each section's fields are documented in its trainer's file: DraftConfig in diffrl/trainers/draft.py, ...)."""
    cls = dataclasses.make_dataclass("Config", [(name, section, field(default_factory=section))
                                                for name, section in sections.items()], bases=(base,))
    cls.__module__, cls.__qualname__ = __name__, "Config"
    return cls


Config = _with_sections(SharedConfig, {name: config_class for name, (config_class, _) in TRAINERS.items()})
Config.__doc__ = """A run's whole configuration: the shared sections and one section per trainer (only the active
trainer's is used and saved)."""


def config_class_for(trainer: str) -> type:
    """Config, plus the section of a user trainer ("package.module:Class" whose class has a ``config_class``)."""
    config_class, _ = trainer_entry(trainer)
    name = section_name(trainer)
    if ":" not in trainer or config_class is None:
        return Config
    if name in _field_types(Config):
        raise UserInputError(f"trainer {trainer!r}: its section would be named {name!r}, which is taken; rename "
                             "the class")
    return _with_sections(Config, {name: config_class})


SHARED_SECTIONS = ("sample", "train", "log")

# (key path, lowest allowed, highest allowed); None values of `X | None` fields are skipped.
_RANGES: list[tuple[str, float | None, float | None]] = [
    ("sample.batch_size", 1, None),
    ("sample.resolution", 1, None),
    ("train.steps", 0, None),
    ("train.lora_rank", 1, None),
    ("train.gradient_accumulation_steps", 1, None),
    ("train.lr_warmup_steps", 0, None),
    ("train.max_nonfinite_skips", 0, None),
    ("log.every", 1, None),
    ("log.grid_every", 1, None),
    ("log.checkpoint_every", 1, None),
    ("log.keep_last", 1, None),
]


def trainer_sections(config_cls: type = Config) -> dict[str, type]:
    """Section name -> its config class: every dataclass field of the config class except the shared sections."""
    hints = _field_types(config_cls)
    return {n: t for n, t in hints.items() if dataclasses.is_dataclass(t) and n not in SHARED_SECTIONS}


def validate(config: Config) -> None:
    """Reject values that no run could use; called by Config.__post_init__."""
    config_class, _ = trainer_entry(config.trainer)
    if config_class is not None and section_name(config.trainer) not in trainer_sections(type(config)):
        raise UserInputError(f"trainer {config.trainer!r} has a config_class, so its config needs its section: "
                             "build it with load_config (or diffrl.config.config_class_for)")
    sample = config.sample
    if sample.timesteps is not None and len(sample.timesteps) != sample.num_steps:
        raise UserInputError(f"sample.timesteps has {len(sample.timesteps)} values but sample.num_steps is "
                             f"{sample.num_steps}; set sample.num_steps={len(sample.timesteps)}")
    check_settings(sample.num_steps, sample.eta, sample.schedule, sample.scheduler, sample.timesteps,
                   sample.noise_level)
    if isinstance(config.reward, dict) and not config.reward:
        raise UserInputError("reward is an empty mapping; give at least one reward name -> weight")
    for path, low, high in _RANGES:
        value: Any = config
        for name in path.split("."):
            value = getattr(value, name)
        if value is None:
            continue
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise UserInputError(f"{path} must be {bounds}, got {value!r}")


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config (None: all defaults), apply `key.path=value` overrides in order, check everything."""
    raw = {} if path is None else _read_yaml(Path(path))
    config_cls = _config_class_of(raw, overrides)
    for override in overrides:
        _apply_override(raw, override, config_cls)
    return _build(config_cls, raw, "")


def _config_class_of(raw: dict, overrides: Sequence[str]) -> type:
    """The config class of the trainer the file and overrides name (the last `trainer=` override wins)."""
    trainer = raw.get("trainer", SharedConfig.trainer)
    for override in overrides:
        key, sep, text = override.partition("=")
        if sep and key.strip() == "trainer":
            trainer = yaml.safe_load(text)
    return config_class_for(trainer) if isinstance(trainer, str) and ":" in trainer else Config


def config_to_dict(config: Config) -> dict[str, Any]:
    """The resolved config as plain data, with only the active trainer's section (the others do not affect the run)."""
    data = dataclasses.asdict(config)
    for name in trainer_sections(type(config)):
        if name != section_name(config.trainer):
            del data[name]
    return data


def save_config(config: Config, path: str | Path) -> None:
    """Write the resolved config as YAML atomically, so a crash never leaves a half-written config.yaml."""
    write_text_atomic(path, yaml.safe_dump(config_to_dict(config), sort_keys=False, allow_unicode=True))


# ---- reading the file ----

def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise UserInputError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        raise UserInputError(f"config file {str(path)!r} is not valid YAML{where}: {problem}") from None
    if data is None:  # an empty file means all defaults
        return {}
    if not isinstance(data, dict):
        raise UserInputError(f"config file {str(path)!r} must be a mapping of key: value, got {type(data).__name__}")
    return data


# ---- schema ----

@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    """Field name -> resolved annotation, in declaration order (annotations are strings under __future__)."""
    hints = get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _field_default(cls: type, name: str) -> Any:
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else copy.deepcopy(f.default)


def _union_arms(tp: Any) -> tuple | None:
    return get_args(tp) if get_origin(tp) in (Union, types.UnionType) else None


def _dict_type(tp: Any) -> Any:
    """The dict[...] type a field accepts (directly or as one arm of a union), or None."""
    for arm in _union_arms(tp) or (tp,):
        if get_origin(arm) is dict:
            return arm
    return None


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if arms := _union_arms(tp):
        return " | ".join(_type_name(a) for a in arms)
    if args := get_args(tp):
        return f"{get_origin(tp).__name__}[{', '.join(_type_name(a) for a in args)}]"
    return tp.__name__


def _type_error(path: str, tp: Any, value: Any) -> UserInputError:
    # YAML 1.1 turns unquoted no/yes/on/off into booleans, which bites mixed_precision: no in particular.
    wants_text = tp is str or get_origin(tp) is Literal
    hint = "; quote it, YAML reads bare no/yes/on/off as true/false" if wants_text and isinstance(value, bool) else ""
    return UserInputError(f"{path or 'config'} must be {_type_name(tp)}, got {value!r}{hint}")


# ---- checking values against the schema ----

def _build(cls: type, data: Any, path: str) -> Any:
    """A dataclass instance from a mapping; unknown keys are errors, missing keys keep their defaults."""
    if data is None:  # `draft:` with nothing under it means all defaults
        data = {}
    if isinstance(data, cls):  # an override's value, already checked (a list of spin.iterations)
        return data
    if not isinstance(data, dict):
        raise _type_error(path, cls, data)
    hints = _field_types(cls)
    for key in data:
        if key not in hints:
            raise unknown_name("config key", _join(path, key), [_join(path, k) for k in hints])
    return cls(**{key: _convert(value, hints[key], _join(path, key)) for key, value in data.items()})


def _convert(value: Any, tp: Any, path: str) -> Any:
    """`value` checked against annotation `tp` (and int -> float, "1e-4" -> float); raises naming `path`."""
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    if (arms := _union_arms(tp)) is not None:
        return _convert_union(value, tp, arms, path)
    origin = get_origin(tp)
    if origin is Literal and any(type(value) is type(a) and value == a for a in get_args(tp)):
        return value
    if origin is list and isinstance(value, list):
        return [_convert(v, get_args(tp)[0], f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict and isinstance(value, dict):
        key_tp, value_tp = get_args(tp)
        return {_convert(k, key_tp, path): _convert(v, value_tp, _join(path, str(k))) for k, v in value.items()}
    if tp is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:  # PyYAML reads 1e-4 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if tp in (int, str, bool) and type(value) is tp:
        return value
    raise _type_error(path, tp, value)


def _convert_union(value: Any, tp: Any, arms: tuple, path: str) -> Any:
    if value is None or (value == "None" and str not in arms):  # "None" is what people type in an override
        if type(None) in arms:
            return None
    # A mapping or list goes to the one arm of that shape, so errors inside it name the exact entry.
    for shape, origin in ((dict, dict), (list, list)):
        if isinstance(value, shape):
            arm = next((a for a in arms if get_origin(a) is origin), None)
            if arm is None:
                raise _type_error(path, tp, value)
            return _convert(value, arm, path)
    for arm in arms:
        try:
            return _convert(value, arm, path)
        except UserInputError:
            continue
    raise _type_error(path, tp, value)


# ---- overrides ----

def _apply_override(raw: dict, override: str, root: type = Config) -> None:
    """Set one `key.path=value` in the raw (not yet checked) config mapping."""
    key, sep, text = override.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise UserInputError(f"override {override!r} is not of the form key.path=value, e.g. sample.num_steps=20")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        raise UserInputError(f"override {override!r}: the value {text!r} is not valid YAML") from None
    cls, node = root, raw
    for i, name in enumerate(parts):
        hints, prefix = _field_types(cls), ".".join(parts[:i])
        if name not in hints:
            raise unknown_name("config key", _join(prefix, name), [_join(prefix, k) for k in hints])
        tp, path, rest = hints[name], _join(prefix, name), parts[i + 1:]
        if not rest:
            node[name] = _override_value(node.get(name), value, text, tp, path)
            return
        if dataclasses.is_dataclass(tp):
            node = _child_section(node, name, tp, path)
            cls = tp
            continue
        # A dict field: the rest of the path is one entry's key, dots included ("reward.pkg.mod:Cls=1").
        _set_entry(node, cls, name, ".".join(rest), value, text, path)
        return


def _child_section(node: dict, name: str, tp: type, path: str) -> dict:
    child = node.get(name)
    if child is None:
        child = node[name] = {}
    if not isinstance(child, dict):
        raise _type_error(path, tp, child)
    return child


def _override_value(old: Any, value: Any, text: str, tp: Any, path: str) -> Any:
    """The checked value; a section given as a mapping is merged into what the file set."""
    if dataclasses.is_dataclass(tp):
        return {**old, **value} if isinstance(old, dict) and isinstance(value, dict) else value
    try:
        return _convert(value, tp, path)
    except UserInputError as error:
        if isinstance(value, str):
            raise
        first = error
    # `mixed_precision=no` or `model=1.5` parse as YAML non-strings; the text itself may be what was meant.
    try:
        return _convert(text, tp, path)
    except UserInputError:
        raise first from None


def _set_entry(node: dict, cls: type, name: str, entry: str, value: Any, text: str, path: str) -> None:
    dict_tp = _dict_type(_field_types(cls)[name])
    if dict_tp is None:
        raise UserInputError(f"{path} is a single value, not a section or mapping, so {path}.{entry} cannot be set")
    current = node[name] if name in node else _field_default(cls, name)
    if not isinstance(current, dict):
        raise UserInputError(f"{path} is {current!r}, not a mapping; set it whole, e.g. {path}={{{entry}: 1.0}}")
    entry_value = _override_value(None, value, text, get_args(dict_tp)[1], f"{path}.{entry}")
    node[name] = {**current, entry: entry_value}


def _join(prefix: str, key: Any) -> str:
    return f"{prefix}.{key}" if prefix else str(key)
