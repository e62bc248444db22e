"""Images to latents and back through a diffusers AutoencoderKL, as the diffusers pipelines do: latents are
(z − m)·scaling_factor/s, where m and s are the VAE config's per-channel latents_mean and latents_std when it gives
them, else m is its shift_factor (SD3: 0.0609) or 0 and s is 1 (SD 1.x/2.x and SDXL: z·scaling_factor)."""

from __future__ import annotations

from torch import Tensor


def _offset_and_std(vae, like: Tensor) -> tuple[Tensor | float, Tensor | float]:
    """(m, s) of latents = (z − m)·scaling_factor/s. With m = 0 and s = 1 the arithmetic is exact, so SD's and SDXL's
    latents are bit for bit z·scaling_factor, as their pipelines compute them."""
    config = vae.config
    if getattr(config, "latents_mean", None) is not None and getattr(config, "latents_std", None) is not None:
        return tuple(like.new_tensor(values).view(1, -1, 1, 1) for values in (config.latents_mean, config.latents_std))
    return getattr(config, "shift_factor", None) or 0.0, 1.0


def decode_latents(vae, latents: Tensor) -> Tensor:
    """Latents -> images in [0, 1], float32, differentiable. The latents are cast to the VAE's dtype: a float32 VAE
    under fp16 weights (SDXL's VAE overflows in fp16)."""
    latents = latents.to(vae.dtype)
    offset, std = _offset_and_std(vae, latents)
    latents = latents * std / vae.config.scaling_factor + offset
    images = vae.decode(latents, return_dict=False)[0]
    return (images.float() / 2 + 0.5).clamp(0, 1)


def encode_pixels(vae, pixels: Tensor) -> Tensor:
    """[B, 3, H, W] in [-1, 1] -> float32 latents: the posterior mean, scaled as decode_latents unscales it."""
    z = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mean
    offset, std = _offset_and_std(vae, z)
    return ((z - offset) * vae.config.scaling_factor / std).float()
