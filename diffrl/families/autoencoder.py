"""Images to latents and back through a diffusers AutoencoderKL, as the Stable Diffusion pipelines do: latents are
(z − latents_mean)·scaling_factor/latents_std when the VAE's config gives a mean and std, else z·scaling_factor."""

from __future__ import annotations

from torch import Tensor


def _mean_std(vae, like: Tensor) -> tuple[Tensor, Tensor] | None:
    config = vae.config
    if getattr(config, "latents_mean", None) is None or getattr(config, "latents_std", None) is None:
        return None
    return tuple(like.new_tensor(values).view(1, -1, 1, 1) for values in (config.latents_mean, config.latents_std))


def decode_latents(vae, latents: Tensor) -> Tensor:
    """Latents -> images in [0, 1], float32, differentiable. The latents are cast to the VAE's dtype: a float32 VAE
    under fp16 weights (SDXL's VAE overflows in fp16)."""
    latents = latents.to(vae.dtype)
    mean_std = _mean_std(vae, latents)
    if mean_std is None:
        latents = latents / vae.config.scaling_factor
    else:
        latents = latents * mean_std[1] / vae.config.scaling_factor + mean_std[0]
    images = vae.decode(latents, return_dict=False)[0]
    return (images.float() / 2 + 0.5).clamp(0, 1)


def encode_pixels(vae, pixels: Tensor) -> Tensor:
    """[B, 3, H, W] in [-1, 1] -> float32 latents: the posterior mean, scaled as decode_latents unscales it."""
    z = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mean
    mean_std = _mean_std(vae, z)
    if mean_std is None:
        return (z * vae.config.scaling_factor).float()
    return ((z - mean_std[0]) * vae.config.scaling_factor / mean_std[1]).float()
