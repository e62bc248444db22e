"""load_pipeline: a diffusers Stable Diffusion, SDXL, SD3, FLUX.1 or Z-Image pipeline from a hub id, a local folder, a
single file, or a built-in; load_model: that plus what a run config adds (a fused student LoRA, a replacement VAE)."""

from __future__ import annotations

import collections
import json
import os
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import torch

from diffrl.errors import UserInputError, unknown_name

if TYPE_CHECKING:  # diffusers/transformers take seconds to import; only loading a model needs them
    from diffusers import (DiffusionPipeline, FluxPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline,
                           StableDiffusionXLPipeline, ZImagePipeline)
    from transformers import Qwen2Tokenizer

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


# Stable Diffusion 1.x architectures as constructor arguments; the text encoder's vocabulary is always the offline
# tokenizer's (the real 49k-token one cannot be downloaded here).
TINY_ARCHITECTURE = {  # 32 px images, 16x16x4 latents: every SD code path, a batch in a fraction of a second on CPU
    "text_encoder": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         projection_dim=32),
    "unet": dict(sample_size=16, layers_per_block=1, block_out_channels=(32, 64), cross_attention_dim=32,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4, norm_num_groups=8),
    "vae": dict(sample_size=32, block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=8),
}
SD15_ARCHITECTURE = {  # SD 1.5's UNet and VAE configs, CLIP ViT-L/14's text config: 1.03 B params (SD 1.5: 1.07 B)
    "text_encoder": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                         projection_dim=768),
    "unet": dict(sample_size=64, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768,
                 attention_head_dim=8),
    "vae": dict(sample_size=512, block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2),
}


def build_random_sd1_pipeline(architecture: dict, seed: int = 0) -> StableDiffusionPipeline:
    """A StableDiffusionPipeline of the given architecture with seeded random weights and SD v1's DDIM scheduler.

    Built in float32 without downloads and without touching the global RNG; its images mean nothing.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffrl.tiny_tokenizer import build_tiny_tokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = build_tiny_tokenizer()
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
            **architecture["text_encoder"]))
        unet = UNet2DConditionModel(in_channels=4, out_channels=4, **architecture["unet"])
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, **architecture["vae"])
    scheduler = DDIMScheduler(  # Stable Diffusion v1's own scheduler configuration
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def build_tiny_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """Stable Diffusion's architecture at toy size (32 px images, 16x16x4 latents), random weights, no download."""
    return build_random_sd1_pipeline(TINY_ARCHITECTURE, seed)


def build_sd15_random_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """Stable Diffusion 1.5's architecture (512 px, 64x64x4 latents) with random weights, for benchmarks."""
    return build_random_sd1_pipeline(SD15_ARCHITECTURE, seed)


# SDXL: two text encoders whose penultimate hidden states are concatenated (cross_attention_dim = their sum), the second
# one's projection as the pooled embedding, and micro-conditioning time ids (addition_embed_type="text_time"):
# projection_class_embeddings_input_dim = text_encoder_2 projection + 6 time ids x addition_time_embed_dim.
TINY_SDXL_ARCHITECTURE = {  # 32 px images, 16x16x4 latents, the SDXL code paths at toy size
    "text_encoder": dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                         projection_dim=32, hidden_act="gelu"),
    "text_encoder_2": dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           projection_dim=32, hidden_act="gelu"),
    "unet": dict(sample_size=16, layers_per_block=1, block_out_channels=(32, 64),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                 transformer_layers_per_block=(1, 2), use_linear_projection=True, cross_attention_dim=64,
                 addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=32 + 6 * 8, norm_num_groups=8),
    "vae": dict(sample_size=32, block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=8,
                scaling_factor=0.13025, force_upcast=True),
}
SDXL_ARCHITECTURE = {  # stabilityai/stable-diffusion-xl-base-1.0's configs; UNet 2.57 B params, both text encoders 0.82 B
    "text_encoder": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                         projection_dim=768, hidden_act="quick_gelu"),                      # CLIP ViT-L/14
    "text_encoder_2": dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                           projection_dim=1280, hidden_act="gelu"),                         # OpenCLIP ViT-bigG/14
    "unet": dict(sample_size=128, layers_per_block=2, block_out_channels=(320, 640, 1280),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
                 cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=1280 + 6 * 256),
    "vae": dict(sample_size=1024, block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, scaling_factor=0.13025,
                force_upcast=True),
}
# stabilityai/stable-diffusion-xl-base-1.0's scheduler config (an Euler scheduler; the DDIM keys are its own too).
SDXL_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="epsilon", interpolation_type="linear", use_karras_sigmas=False, timestep_spacing="leading",
    steps_offset=1, clip_sample=False, sample_max_value=1.0, set_alpha_to_one=False, skip_prk_steps=True)


def build_random_sdxl_pipeline(architecture: dict, seed: int = 0) -> StableDiffusionXLPipeline:
    """A StableDiffusionXLPipeline of the given architecture with seeded random weights and SDXL's scheduler config.

    Built in float32 without downloads and without touching the global RNG; no watermarker; its images mean nothing.
    """
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from diffrl.tiny_tokenizer import build_tiny_tokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer, tokenizer_2 = build_tiny_tokenizer(), build_tiny_tokenizer()
        text_encoder = CLIPTextModel(_clip_text_config(tokenizer, architecture["text_encoder"]))
        text_encoder_2 = CLIPTextModelWithProjection(_clip_text_config(tokenizer_2, architecture["text_encoder_2"]))
        unet = UNet2DConditionModel(in_channels=4, out_channels=4, **architecture["unet"])
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, **architecture["vae"])
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG),
        add_watermarker=False)


def build_sdxl_random_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """SDXL base 1.0's architecture (1024 px, 128x128x4 latents) with random weights, for benchmarks (~14 GB fp32)."""
    return build_random_sdxl_pipeline(SDXL_ARCHITECTURE, seed)


def build_tiny_sdxl_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """SDXL's architecture at toy size (two text encoders, text_time conditioning; 32 px), random weights."""
    return build_random_sdxl_pipeline(TINY_SDXL_ARCHITECTURE, seed)


# SD3/3.5: the MMDiT reads CLIP-L's and CLIP-G's penultimate hidden states side by side, zero-padded to T5's width
# (joint_attention_dim = T5's d_model), then T5's; pooled_projection_dim = the two CLIP projections together.
TINY_SD3_ARCHITECTURE = {  # 32 px images, 16x16x16 latents in 2x2 patches; SD3.5 Medium's block kinds at toy size
    "text_encoder": dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                         projection_dim=32, hidden_act="gelu"),
    "text_encoder_2": dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           projection_dim=32, hidden_act="gelu"),
    "text_encoder_3": dict(d_model=128, d_kv=32, d_ff=64, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu"),
    # block 0 a dual-attention block with QK norm (SD3.5), block 1 a plain SD3 block that also ends the text stream
    "transformer": dict(sample_size=16, patch_size=2, num_layers=2, attention_head_dim=16, num_attention_heads=2,
                        joint_attention_dim=128, caption_projection_dim=32, pooled_projection_dim=32 + 32,
                        pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm"),
    "vae": dict(sample_size=32, block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=8,
                scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False),
}
# stabilityai/stable-diffusion-3.5-medium's configs (1024 px, 128x128x16 latents).
SD35_MEDIUM_ARCHITECTURE = {
    "text_encoder": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                         projection_dim=768, hidden_act="quick_gelu"),                      # CLIP ViT-L/14
    "text_encoder_2": dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                           projection_dim=1280, hidden_act="gelu"),                         # OpenCLIP ViT-bigG/14
    "text_encoder_3": dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,  # T5 v1.1 XXL's encoder
                           feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
                           relative_attention_max_distance=128, layer_norm_epsilon=1e-6, dropout_rate=0.1),
    "transformer": dict(sample_size=128, patch_size=2, num_layers=24, attention_head_dim=64, num_attention_heads=24,
                        joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=768 + 1280,
                        pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm"),
    "vae": dict(sample_size=1024, block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, scaling_factor=1.5305,
                shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False),
}
# SD3's and SD3.5 Medium's scheduler config: rectified flow with the fixed timestep shift 3 (no dynamic shifting).
SD3_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)


def build_t5_tokenizer(model_max_length: int = 512):
    """An offline T5 tokenizer (a Unigram model like T5's SentencePiece one) over the tiny tokenizer's corpus: whole
    words with a leading "▁" when the corpus has them, single characters otherwise. T5's special tokens take its ids
    (<pad> 0, </s> 1, <unk> 2); no sentinel tokens."""
    import string

    from transformers import T5Tokenizer

    from diffrl.tiny_tokenizer import CORPUS

    word_start = "\u2581"   # SentencePiece's "▁", which the tokenizer puts before every word
    # Unigram scores are log-probabilities: a known word (-3) beats spelling it out (-10 a character)
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), (word_start, -2.0)]
    vocab += [(word_start + word, -3.0) for word in sorted(set(CORPUS))]
    vocab += [(char, -10.0) for char in string.ascii_letters + string.digits + string.punctuation]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


def build_random_sd3_pipeline(architecture: dict, seed: int = 0) -> StableDiffusion3Pipeline:
    """A StableDiffusion3Pipeline of the given architecture with seeded random weights and SD3's scheduler config.

    Built in float32 without downloads and without touching the global RNG, every model in eval mode as
    from_pretrained leaves it (T5's dropout off); the text encoders' vocabularies are the offline tokenizers' (the
    real ones cannot be downloaded here); its images mean nothing.
    """
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from diffrl.tiny_tokenizer import build_tiny_tokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer, tokenizer_2, tokenizer_3 = build_tiny_tokenizer(), build_tiny_tokenizer(), build_t5_tokenizer()
        text_encoder = CLIPTextModelWithProjection(_clip_text_config(tokenizer, architecture["text_encoder"]))
        text_encoder_2 = CLIPTextModelWithProjection(_clip_text_config(tokenizer_2, architecture["text_encoder_2"]))
        text_encoder_3 = T5EncoderModel(T5Config(
            vocab_size=len(tokenizer_3), pad_token_id=tokenizer_3.pad_token_id, eos_token_id=tokenizer_3.eos_token_id,
            decoder_start_token_id=tokenizer_3.pad_token_id, **architecture["text_encoder_3"]))
        transformer = SD3Transformer2DModel(in_channels=16, out_channels=16, **architecture["transformer"])
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, **architecture["vae"])
    for model in (text_encoder, text_encoder_2, text_encoder_3, transformer, vae):
        model.eval()
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler.from_config(SD3_SCHEDULER_CONFIG), vae=vae,
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)


def build_tiny_sd3_pipeline(seed: int = 0) -> StableDiffusion3Pipeline:
    """SD3's architecture at toy size (MMDiT with SD3.5's dual attention and QK norm, CLIP-L + CLIP-G + T5, flow
    matching; 32 px), random weights."""
    return build_random_sd3_pipeline(TINY_SD3_ARCHITECTURE, seed)


def build_sd35_medium_random_pipeline(seed: int = 0) -> StableDiffusion3Pipeline:
    """SD 3.5 Medium's architecture (1024 px, 128x128x16 latents) with random weights, for benchmarks: transformer
    2.24 B parameters, T5-XXL's encoder 4.63 B, 7.68 B altogether (~31 GB in fp32). The offline tokenizers' small
    vocabularies leave 0.23 B of the real embedding tables out (T5's 32,128 rows, CLIP's 49,408)."""
    return build_random_sd3_pipeline(SD35_MEDIUM_ARCHITECTURE, seed)


# FLUX.1: the transformer reads T5's hidden states (joint_attention_dim = T5's d_model) and CLIP-L's pooled output
# (pooled_projection_dim = CLIP's hidden size: CLIPTextModel, no projection); its rotary axes split the head dimension
# (axes_dims_rope sums to attention_head_dim). in_channels = 16 latent channels x the 2x2 packing.
TINY_FLUX_ARCHITECTURE = {  # FLUX.1-dev at toy size: 32 px images, 16x16x16 latents packed as 64 tokens of 64 channels
    "text_encoder": dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                         projection_dim=32, hidden_act="gelu"),
    "text_encoder_2": dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu"),
    # two double-stream and two single-stream blocks, guidance embedding as in FLUX.1-dev
    "transformer": dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16,
                        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
                        axes_dims_rope=(4, 6, 6)),
    "vae": dict(sample_size=32, block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=8,
                scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False),
    "default_sample_size": 16,   # latent pixels of FluxPipeline's default image (FLUX.1: 128, 1024 px): 32 px
}
# black-forest-labs/FLUX.1-dev's configs (1024 px, 128x128x16 latents packed into 4096 tokens of 64 channels).
FLUX_DEV_ARCHITECTURE = {
    "text_encoder": SD35_MEDIUM_ARCHITECTURE["text_encoder"],       # CLIP ViT-L/14's text model
    "text_encoder_2": SD35_MEDIUM_ARCHITECTURE["text_encoder_3"],   # T5 v1.1 XXL's encoder
    "transformer": dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                        guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
    "vae": dict(sample_size=1024, block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, scaling_factor=0.3611,
                shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False),
    "default_sample_size": 128,  # FluxPipeline's own default
}
# FLUX.1-dev's scheduler config: rectified flow with the resolution-dependent shift μ (256 tokens: 0.5, 4096: 1.15).
FLUX_DEV_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                 max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)


def build_random_flux_pipeline(architecture: dict, seed: int = 0) -> FluxPipeline:
    """A FluxPipeline of the given architecture with seeded random weights and FLUX.1-dev's scheduler config.

    Built in float32 without downloads and without touching the global RNG, every model in eval mode as
    from_pretrained leaves it (T5's dropout off); the text encoders' vocabularies are the offline tokenizers' (the
    real ones cannot be downloaded here); its images mean nothing. ``default_sample_size`` (FluxPipeline's default
    image side in latent pixels, not saved with the pipeline) is set from the architecture.
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    from diffrl.tiny_tokenizer import build_tiny_tokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer, tokenizer_2 = build_tiny_tokenizer(), build_t5_tokenizer()
        text_encoder = CLIPTextModel(_clip_text_config(tokenizer, architecture["text_encoder"]))
        text_encoder_2 = T5EncoderModel(T5Config(
            vocab_size=len(tokenizer_2), pad_token_id=tokenizer_2.pad_token_id, eos_token_id=tokenizer_2.eos_token_id,
            decoder_start_token_id=tokenizer_2.pad_token_id, **architecture["text_encoder_2"]))
        transformer = FluxTransformer2DModel(**architecture["transformer"])
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, **architecture["vae"])
    for model in (text_encoder, text_encoder_2, transformer, vae):
        model.eval()
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(FLUX_DEV_SCHEDULER_CONFIG), vae=vae,
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
        transformer=transformer)
    pipe.default_sample_size = architecture["default_sample_size"]
    return pipe


def build_tiny_flux_pipeline(seed: int = 0) -> FluxPipeline:
    """FLUX.1-dev's architecture at toy size (double- and single-stream blocks, guidance embedding, CLIP-L pooled +
    T5, flow matching with dynamic shift; 32 px), random weights."""
    return build_random_flux_pipeline(TINY_FLUX_ARCHITECTURE, seed)


def build_flux_dev_random_pipeline(seed: int = 0) -> FluxPipeline:
    """FLUX.1-dev's architecture (1024 px, 4096 packed latent tokens) with random weights, for benchmarks:
    transformer 11.9 B parameters, T5-XXL's encoder 4.63 B (the offline tokenizer's small vocabulary leaves 0.13 B of
    T5's embedding table out), ~16.7 B altogether (~67 GB in fp32)."""
    return build_random_flux_pipeline(FLUX_DEV_ARCHITECTURE, seed)


# Z-Image: the transformer reads Qwen3's hidden states (cap_feat_dim = its hidden size); the rotary axes split the head
# dimension (axes_dims sums to dim / n_heads), the first axis numbering caption positions, then the image's frame.
TINY_ZIMAGE_ARCHITECTURE = {  # Z-Image at toy size: 32 px images, 16x16x16 latents in 64 patches of 2x2
    "text_encoder": dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=8),   # grouped-query attention, as Qwen3-4B's
    # one noise-refiner and one context-refiner block, then two main blocks
    "transformer": dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=64, n_layers=2,
                        n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=32, axes_dims=[8, 12, 12],
                        axes_lens=[1024, 512, 512]),
    "vae": TINY_FLUX_ARCHITECTURE["vae"],   # Z-Image decodes with FLUX.1's VAE
    "default_sample_size": 16,   # latent pixels of the default image: 32 px (ZImagePipeline itself fixes 1024 px)
}
# Tongyi-MAI/Z-Image-Turbo's scheduler config: rectified flow with the static shift 3 (no dynamic shifting).
ZIMAGE_TURBO_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
# Qwen3's chat template as ZImagePipeline renders it (one user message, add_generation_prompt=True,
# enable_thinking=True): "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n".
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}")
QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")


def build_qwen_tokenizer(model_max_length: int = 512) -> Qwen2Tokenizer:
    """An offline Qwen2Tokenizer (byte-level BPE with Qwen's pre-tokenizer, as Qwen3's) whose merges are learned from
    the tiny tokenizer's corpus and the chat template's words, each bare and after a space ("Ġ"), until every such
    word is one token; every byte is a token too, so any text encodes. Qwen3's special tokens (<|endoftext|> pads,
    <|im_end|> ends) and a chat template of Qwen3's form."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    from diffrl.tiny_tokenizer import CORPUS, bytes_to_unicode

    byte_chars = bytes_to_unicode()
    words = sorted(set(CORPUS) | {"user", "assistant"})
    merges = _learn_byte_level_merges(words + [byte_chars[ord(" ")] + word for word in words])
    vocab = {char: index for index, char in enumerate(byte_chars.values())}
    for token in ["".join(pair) for pair in merges] + list(QWEN_SPECIAL_TOKENS):
        vocab.setdefault(token, len(vocab))
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                               unk_token=None, model_max_length=model_max_length, chat_template=QWEN_CHAT_TEMPLATE)
    tokenizer.add_tokens([AddedToken(token, special=True) for token in QWEN_SPECIAL_TOKENS])
    return tokenizer


def _learn_byte_level_merges(words: list[str]) -> list[tuple[str, str]]:
    """Classic BPE without an end-of-word marker: merge the most frequent adjacent pair (ties lexicographically)
    until every word is one symbol."""
    spelled = [tuple(word) for word in words]
    merges = []
    while True:
        counts = collections.Counter(pair for symbols in spelled for pair in zip(symbols, symbols[1:]))
        if not counts:
            return merges
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        spelled = [_merge_pair(symbols, best) for symbols in spelled]


def _merge_pair(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    merged, i = [], 0
    while i < len(symbols):
        if symbols[i:i + 2] == pair:
            merged.append(pair[0] + pair[1])
            i += 2
        else:
            merged.append(symbols[i])
            i += 1
    return tuple(merged)


def build_random_zimage_pipeline(architecture: dict, seed: int = 0) -> ZImagePipeline:
    """A ZImagePipeline of the given architecture with seeded random weights and Z-Image-Turbo's scheduler config.

    Built in float32 without downloads and without touching the global RNG, every model in eval mode as
    from_pretrained leaves it; the text encoder's vocabulary is the offline tokenizer's (Qwen's cannot be downloaded
    here); its images mean nothing. ``default_sample_size`` (latent pixels of the family's default image, not saved
    with the pipeline) is set from the architecture.
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = build_qwen_tokenizer()
        text_encoder = Qwen3Model(Qwen3Config(
            vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            max_position_embeddings=tokenizer.model_max_length, **architecture["text_encoder"]))
        transformer = ZImageTransformer2DModel(**architecture["transformer"])
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, **architecture["vae"])
    for model in (text_encoder, transformer, vae):
        model.eval()
    pipe = ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler.from_config(ZIMAGE_TURBO_SCHEDULER_CONFIG),
                          vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer)
    pipe.default_sample_size = architecture["default_sample_size"]
    return pipe


def build_tiny_zimage_pipeline(seed: int = 0) -> ZImagePipeline:
    """Z-Image's architecture at toy size (noise and context refiners, single-stream blocks, Qwen3 text encoder with
    its chat template, flow matching with Z-Image-Turbo's shift; 32 px), random weights."""
    return build_random_zimage_pipeline(TINY_ZIMAGE_ARCHITECTURE, seed)


def _clip_text_config(tokenizer, settings: dict):
    """A CLIP text encoder's config over the offline tokenizer's vocabulary and special tokens."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=len(tokenizer), max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **settings)


# The ShapesWorld model the project trains itself; a folder in the checkout, not in the wheel.
SHAPES_MODEL_DIR = Path(__file__).resolve().parents[1] / "assets" / "models" / "shapes"
SHAPES_BUILD_COMMAND = "python3 scripts/pretrain_shapesworld.py"


def load_shapes_pipeline() -> StableDiffusionPipeline:
    """The pretrained ShapesWorld model (64 px, coloured shapes) from SHAPES_MODEL_DIR, offline."""
    if not (SHAPES_MODEL_DIR / "model_index.json").is_file():
        raise UserInputError(f"the built-in model 'shapes' is missing: {SHAPES_MODEL_DIR} holds no diffusers "
                             f"pipeline; build it from the repository root with `{SHAPES_BUILD_COMMAND}`")
    return _from_pretrained(str(SHAPES_MODEL_DIR), torch.float32)


BUILTIN_MODELS = {
    "tiny": (build_tiny_pipeline, "SD-1.x architecture at toy size with random weights (32 px, for tests and demos)"),
    "shapes": (load_shapes_pipeline, "ShapesWorld text-to-image model trained by the project (64 px coloured "
                                     f"shapes; built by {SHAPES_BUILD_COMMAND})"),
    "sd15-random": (build_sd15_random_pipeline,
                    "SD 1.5 architecture with random weights (benchmarks; ~1.0 B params, no download)"),
    "sdxl-random": (build_sdxl_random_pipeline,
                    "SDXL base 1.0 architecture with random weights (benchmarks; ~3.4 B params, no download)"),
    "tiny-sdxl": (build_tiny_sdxl_pipeline,
                  "SDXL architecture at toy size with random weights (two text encoders, pooled + time-id "
                  "conditioning; 32 px, for tests and demos)"),
    "tiny-sd3": (build_tiny_sd3_pipeline,
                 "SD3/3.5 architecture at toy size with random weights (MMDiT, CLIP-L + CLIP-G + T5, flow matching; "
                 "32 px, for tests and demos)"),
    "sd35-medium-random": (build_sd35_medium_random_pipeline,
                           "SD 3.5 Medium architecture with random weights (benchmarks; ~7.7 B params with T5-XXL, "
                           "no download)"),
    "tiny-flux": (build_tiny_flux_pipeline,
                  "FLUX.1-dev architecture at toy size with random weights (double/single-stream transformer, "
                  "guidance embedding, CLIP-L + T5, flow matching; 32 px, for tests and demos)"),
    "flux-dev-random": (build_flux_dev_random_pipeline,
                        "FLUX.1-dev architecture with random weights (benchmarks; ~16.7 B params with T5-XXL, "
                        "no download)"),
    "tiny-zimage": (build_tiny_zimage_pipeline,
                    "Z-Image architecture at toy size with random weights (single-stream transformer with refiners, "
                    "Qwen3 text encoder, flow matching; 32 px, for tests and demos)"),
}


def load_pipeline(name_or_path: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                  ) -> StableDiffusionPipeline | StableDiffusionXLPipeline | StableDiffusion3Pipeline | FluxPipeline:
    """Load a Stable Diffusion (1.x, 2.x, Turbo), SDXL (base, Turbo), SD3/3.5, FLUX.1 or Z-Image text-to-image
    pipeline.

    ``name_or_path`` is a built-in name (see ``BUILTIN_MODELS``), a local diffusers folder, a single-file checkpoint
    (``.safetensors``/``.ckpt``), or a Hugging Face hub id (read from the local cache or downloaded). The family comes
    from the folder's ``model_index.json`` or, for a single file, from its tensor names. Only safetensors weights are
    accepted; a safety checker or watermarker is never loaded.
    """
    path = Path(os.path.expanduser(name_or_path))
    if name_or_path in BUILTIN_MODELS:
        pipe = BUILTIN_MODELS[name_or_path][0]()
    elif path.is_dir():
        pipe = _from_pretrained(str(path), dtype)
    elif path.suffix in SINGLE_FILE_SUFFIXES:
        pipe = _from_single_file(path, dtype)
    elif _looks_like_hub_id(name_or_path):
        pipe = _from_pretrained(name_or_path, dtype)
    else:
        raise unknown_name("model", name_or_path, list(BUILTIN_MODELS) + ["<hub id>", "<local folder>",
                                                                        "<file.safetensors>"])
    from diffrl.families import family_of

    pipe.set_progress_bar_config(disable=True)
    if family_of(pipe).denoiser.dtype != dtype:  # hub and local loads already arrive in ``dtype``
        pipe.to(dtype=dtype)
    return pipe.to(device)


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


# The text-to-image pipeline classes diffrl samples, with what keeps them from loading extras it never uses.
PIPELINE_OPTIONS = {
    "StableDiffusionPipeline": dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False),
    "StableDiffusionXLPipeline": dict(add_watermarker=False),
    "StableDiffusion3Pipeline": dict(image_encoder=None, feature_extractor=None),   # IP-Adapter's, when present
    "FluxPipeline": dict(image_encoder=None, feature_extractor=None),               # IP-Adapter's, when present
    "ZImagePipeline": dict(),                                                       # no optional components
}


def _from_pretrained(name_or_path: str, dtype: torch.dtype
                     ) -> StableDiffusionPipeline | StableDiffusionXLPipeline | StableDiffusion3Pipeline | FluxPipeline:
    import diffusers

    try:
        class_name = _pipeline_class_name(name_or_path)
    except (OSError, ValueError) as error:
        raise UserInputError(_load_failure_sentence(name_or_path, error)) from error
    if class_name not in PIPELINE_OPTIONS:
        *others, last = PIPELINE_OPTIONS
        raise UserInputError(f"model {name_or_path!r} is a {class_name}; diffrl fine-tunes text-to-image "
                             f"{', '.join(others)} and {last} models")
    try:
        return getattr(diffusers, class_name).from_pretrained(
            name_or_path, **dtype_argument(dtype), use_safetensors=True, **PIPELINE_OPTIONS[class_name])
    except (OSError, ValueError, EnvironmentError) as error:
        raise UserInputError(_load_failure_sentence(name_or_path, error)) from error


def dtype_argument(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """The weight dtype as diffusers' loaders take it: diffusers 0.40 renamed their ``torch_dtype`` to ``dtype`` and
    warns about the old name on every load; the older releases that pyproject.toml allows know only ``torch_dtype``."""
    import diffusers
    from packaging.version import Version

    return {"dtype" if Version(diffusers.__version__) >= Version("0.40.0.dev0") else "torch_dtype": dtype}


def _pipeline_class_name(name_or_path: str) -> str:
    """``_class_name`` of a folder's or hub repository's model_index.json (the hub's from the cache, or fetched)."""
    index = Path(name_or_path) / "model_index.json"
    if not index.is_file():
        from huggingface_hub import hf_hub_download

        index = Path(hf_hub_download(name_or_path, "model_index.json"))
    return json.loads(index.read_text(encoding="utf-8")).get("_class_name", "<no _class_name>")


# diffusers' name of a single-file checkpoint's model type -> the pipeline diffrl trains it with
SINGLE_FILE_PIPELINES = {
    "v1": "StableDiffusionPipeline", "v2": "StableDiffusionPipeline", "xl_base": "StableDiffusionXLPipeline",
    "playground-v2-5": "StableDiffusionXLPipeline", "sd3": "StableDiffusion3Pipeline",
    "sd35_medium": "StableDiffusion3Pipeline", "sd35_large": "StableDiffusion3Pipeline", "flux-dev": "FluxPipeline",
    "flux-schnell": "FluxPipeline",
}


class _TensorShapes(Mapping):
    """A safetensors file's tensor names and shapes, read from its header only (no tensor data is loaded): enough for
    diffusers' `infer_diffusers_model_type`, which asks ``key in checkpoint`` and ``checkpoint[key].shape``."""

    def __init__(self, shapes: dict[str, torch.Size]):
        self.shapes = shapes

    def __getitem__(self, key: str) -> SimpleNamespace:
        return SimpleNamespace(shape=self.shapes[key])

    def __iter__(self):
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


def single_file_pipeline_class(path: str | Path) -> str:
    """The pipeline class of a single-file checkpoint (the original Stability / Black Forest Labs layouts), from its
    tensor names and shapes as diffusers' own ``infer_diffusers_model_type`` reads them; a model type diffrl does not
    train (a refiner, an inpainting or video model, ...) is refused with its name."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as weights:
        shapes = {key: torch.Size(weights.get_slice(key).get_shape()) for key in weights.keys()}
    model_type = infer_diffusers_model_type(_TensorShapes(shapes))
    if model_type not in SINGLE_FILE_PIPELINES:
        raise UserInputError(f"model file {str(path)!r} holds a {model_type!r} checkpoint (as diffusers reads its "
                             f"tensor names); diffrl trains single files of these kinds: "
                             f"{', '.join(SINGLE_FILE_PIPELINES)}")
    return SINGLE_FILE_PIPELINES[model_type]


def _from_single_file(path: Path, dtype: torch.dtype) -> DiffusionPipeline:
    if not path.is_file():
        raise UserInputError(f"model file {str(path)!r} does not exist")
    if path.suffix == ".ckpt":
        raise UserInputError(f"{path} is a pickled .ckpt checkpoint, which diffrl does not load because unpickling "
                             "can run arbitrary code; convert it to .safetensors first")
    import diffusers

    try:
        class_name = single_file_pipeline_class(path)
    except UserInputError:
        raise
    except Exception as error:  # safetensors raises its own SafetensorError for a file that is not safetensors
        raise UserInputError(f"model file {str(path)!r} is not a readable safetensors file ({_first_line(error)})"
                             ) from error
    try:
        return getattr(diffusers, class_name).from_single_file(str(path), **dtype_argument(dtype))
    except (OSError, ValueError) as error:
        raise UserInputError(_load_failure_sentence(str(path), error)) from error


def _load_failure_sentence(name: str, error: Exception) -> str:
    cache = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")), "hub")
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return (f"could not load model {name!r}: it is not a complete diffusers pipeline with safetensors weights in the "
            f"local Hugging Face cache ({cache}, set by HF_HOME) and could not be downloaded ({first_line})")


# -- what a run loads besides the pipeline ---------------------------------------------------------------------------
def load_model(model: str, *, base_lora: str | None = None, base_lora_scale: float = 1.0, vae: str | None = None,
               vae_float32: bool | None = None, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu"):
    """The pipeline a run trains: ``load_pipeline`` plus its config's fused student LoRA and VAE choices.

    ``vae_float32=None`` keeps the VAE in float32 exactly when diffusers' SDXL pipeline would upcast it: an SDXL
    model in fp16 with a VAE whose config sets ``force_upcast`` (SDXL's VAE overflows in fp16; the fp16-fixed one
    does not; SD 1.x's pipeline never upcasts).
    """
    from diffrl.families import family_of

    pipe = load_pipeline(model, dtype=dtype, device=device)
    if base_lora:
        fuse_base_lora(pipe, base_lora, base_lora_scale)
    if vae:
        pipe.vae = load_vae(vae, dtype=dtype, device=device)
    if vae_float32 is None:
        vae_float32 = (dtype == torch.float16 and family_of(pipe).upcasts_fp16_vae
                       and bool(getattr(pipe.vae.config, "force_upcast", False)))
    if vae_float32:
        pipe.vae.to(torch.float32)
    return pipe


def fuse_base_lora(pipe, spec: str, scale: float = 1.0) -> None:
    """Fuse a LoRA into the UNet (and text encoders it carries) and drop the adapter: the fused model is the student
    that training starts from and compares with (LCM-LoRA, DMD2's LoRA).

    ``spec`` is a local ``.safetensors`` file, a local folder holding ``pytorch_lora_weights.safetensors``, or a hub
    reference: ``owner/repo`` (its ``pytorch_lora_weights.safetensors``) or ``owner/repo/path/file.safetensors``.
    """
    from diffrl.lora import load_pipeline_lora

    path = Path(os.path.expanduser(spec))
    if path.is_file():
        source, weight_name = str(path.parent), path.name
    elif path.is_dir():
        source, weight_name = str(path), None
    elif spec.startswith((".", "/", "~")) or path.suffix == ".safetensors" and len(spec.split("/")) < 3:
        raise UserInputError(f"base_lora {spec!r} does not exist: give a .safetensors file, a folder holding "
                             "pytorch_lora_weights.safetensors, or a hub reference owner/repo[/file.safetensors]")
    else:
        parts = spec.split("/")
        source, weight_name = "/".join(parts[:2]), "/".join(parts[2:]) or None
    try:
        load_pipeline_lora(pipe, source, weight_name=weight_name, adapter_name="base_lora")
    except (OSError, ValueError) as error:
        raise UserInputError(f"could not load base_lora {spec!r}: download the LoRA file (e.g. huggingface-cli "
                             f"download {source}{' ' + weight_name if weight_name else ''}) into the Hugging Face "
                             f"cache or give its local path ({_first_line(error)})") from error
    pipe.fuse_lora(lora_scale=scale, adapter_names=["base_lora"])
    pipe.unload_lora_weights()   # the weights stay fused; the adapter modules go, so "adapters off" is the student


def load_vae(name_or_path: str, *, dtype: torch.dtype, device: str | torch.device):
    """A replacement AutoencoderKL (hub id or local diffusers folder), safetensors only."""
    from diffusers import AutoencoderKL

    try:
        vae = AutoencoderKL.from_pretrained(os.path.expanduser(name_or_path), **dtype_argument(dtype),
                                            use_safetensors=True)
    except (OSError, ValueError) as error:
        raise UserInputError(_load_failure_sentence(name_or_path, error).replace("diffusers pipeline",
                                                                                  "diffusers VAE")) from error
    return vae.to(device)


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
