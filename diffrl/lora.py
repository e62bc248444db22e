"""LoRA on the denoiser (a UNet or a transformer) with peft, saved in the diffusers LoRA format of its pipeline
(``pipe.load_lora_weights(dir)`` loads it). The family adapters (diffrl.families) say which pipeline class writes the
file and under which component prefix ("unet", "transformer") the layers go.

The adapter's lora_alpha travels in the safetensors metadata; without it diffusers would assume alpha = rank and
silently rescale the update by rank/alpha.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from diffusers.training_utils import cast_training_params
from diffusers.utils import convert_state_dict_to_diffusers, convert_unet_state_dict_to_peft
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
DEFAULT_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")


class NoLoraTargetError(ValueError):
    """No module of the denoiser matched the LoRA target modules."""


def add_lora(model, rank: int, alpha: float | None = None, target_modules=DEFAULT_TARGET_MODULES
             ) -> list[torch.nn.Parameter]:
    """Freeze the denoiser, attach a LoRA adapter (float32 parameters) and return its trainable parameters.

    The up-projection starts at zero (peft's default), so the adapted model equals the base model at step 0.
    """
    from peft.tuners.tuners_utils import check_target_module_exists

    model.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=rank if alpha is None else alpha, target_modules=list(target_modules),
                        init_lora_weights="gaussian")
    # peft raises a bare ValueError when no module matches; ask it first, with its own matching rule
    if not any(check_target_module_exists(config, name) for name, _ in model.named_modules()):
        raise NoLoraTargetError(f"no module of the {type(model).__name__} matched the LoRA target modules "
                                f"{list(target_modules)}")
    model.add_adapter(config)
    cast_training_params(model, dtype=torch.float32)
    return [p for p in model.parameters() if p.requires_grad]


def has_lora(model) -> bool:
    # diffusers deletes peft_config when the adapters are unloaded, so its presence is the public sign of one
    return bool(getattr(model, "peft_config", None))


def save_lora(model, directory: str | Path, *, pipeline_class=StableDiffusionPipeline, component: str = "unet"
              ) -> Path:
    """Write ``pytorch_lora_weights.safetensors`` (diffusers format, alpha in its metadata) into ``directory``
    through ``pipeline_class.save_lora_weights``, the layers under ``component`` ("unet" for SD and SDXL,
    "transformer" for SD3).

    A UNet's layers get diffusers' names (``to_q.lora.down``), as its SD/SDXL training scripts write them; a
    transformer's keep peft's (``lora_A``), as its SD3 script writes them. diffusers renames only the attention
    projections to_q/k/v/out.0, and its loader converts a file by its first key alone, so a transformer file with
    both kinds of names (``to_q.lora.down`` beside ``add_q_proj.lora_A``) would silently lose half its layers.
    """
    layers = get_peft_model_state_dict(model)
    if component == "unet":
        layers = convert_state_dict_to_diffusers(layers)
    pipeline_class.save_lora_weights(
        str(directory), safe_serialization=True, **{f"{component}_lora_layers": layers,
                                                    f"{component}_lora_adapter_metadata":
                                                        model.peft_config["default"].to_dict()})
    return Path(directory) / LORA_WEIGHTS_NAME


def load_pipeline_lora(pipe, source: str | Path, **kwargs) -> None:
    """``pipe.load_lora_weights`` for a denoiser-only LoRA file, without diffusers' warning, once per text encoder,
    that the file holds no text-encoder weights (it is not meant to)."""
    from diffusers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        pipe.load_lora_weights(str(source), **kwargs)
    finally:
        logging.set_verbosity(level)


def load_lora_into(model, directory: str | Path, *, component: str = "unet") -> None:
    """Load saved LoRA weights into the denoiser's existing adapter (exact resume; the adapter shapes must match)."""
    state = load_file(str(Path(directory) / LORA_WEIGHTS_NAME))
    state = {key.removeprefix(f"{component}."): value for key, value in state.items()}
    result = set_peft_model_state_dict(model, convert_unet_state_dict_to_peft(state), adapter_name="default")
    if result.unexpected_keys:
        raise ValueError(f"LoRA file in {directory} does not match the adapter: unexpected {result.unexpected_keys[:3]}")
