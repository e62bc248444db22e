"""LoRA on the UNet with peft, saved in the diffusers LoRA format (``pipe.load_lora_weights(dir)`` loads it).

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


def add_lora(unet, rank: int, alpha: float | None = None, target_modules=DEFAULT_TARGET_MODULES
             ) -> list[torch.nn.Parameter]:
    """Freeze the UNet, attach a LoRA adapter (float32 parameters) and return its trainable parameters.

    The up-projection starts at zero (peft's default), so the adapted model equals the base model at step 0.
    """
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank if alpha is None else alpha,
                                target_modules=list(target_modules), init_lora_weights="gaussian"))
    cast_training_params(unet, dtype=torch.float32)
    params = [p for p in unet.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"no UNet module matched the LoRA target modules {list(target_modules)}")
    return params


def has_lora(unet) -> bool:
    return bool(getattr(unet, "_hf_peft_config_loaded", False))


def save_lora(unet, directory: str | Path) -> Path:
    """Write ``pytorch_lora_weights.safetensors`` (diffusers format, alpha in its metadata) into ``directory``."""
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(
        str(directory), unet_lora_layers=layers, safe_serialization=True,
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict())
    return Path(directory) / LORA_WEIGHTS_NAME


def load_unet_lora(pipe, source: str | Path, **kwargs) -> None:
    """``pipe.load_lora_weights`` for a UNet-only LoRA file, without diffusers' warning, once per text encoder, that
    the file holds no text-encoder weights (it is not meant to)."""
    from diffusers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        pipe.load_lora_weights(str(source), **kwargs)
    finally:
        logging.set_verbosity(level)


def load_lora_into(unet, directory: str | Path) -> None:
    """Load saved LoRA weights into the UNet's existing adapter (exact resume; the adapter shapes must match)."""
    state = load_file(str(Path(directory) / LORA_WEIGHTS_NAME))
    state = {key.removeprefix("unet."): value for key, value in state.items()}
    result = set_peft_model_state_dict(unet, convert_unet_state_dict_to_peft(state), adapter_name="default")
    if result.unexpected_keys:
        raise ValueError(f"LoRA file in {directory} does not match the adapter: unexpected {result.unexpected_keys[:3]}")
