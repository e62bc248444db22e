"""The implicit preference margin of a trained model on fresh noise: how the preference trainers' learning tests
see whether the policy moved toward the winners."""

from __future__ import annotations

import contextlib

import torch

from diffrl.preference import denoising_errors


@torch.no_grad()
def implicit_margins(run, losers: torch.Tensor, *, timesteps: torch.Tensor, reference, seed: int = 99):
    """[N] −[(e_θ(w) − e_ref(w)) − (e_θ(l) − e_ref(l))] over the trainer's dataset (winners) and ``losers``, each
    pair noised with one fresh ε to a timestep drawn from ``timesteps``; ``reference`` is a context giving the
    reference model (None: adapters off). Positive: the policy prefers the dataset image more than the reference."""
    sampler, dataset = run.sampler, run.trainer.dataset
    generator = torch.Generator().manual_seed(seed)
    n = len(dataset.prompts)
    t = timesteps[torch.randint(len(timesteps), (n,), generator=generator)]
    noise = torch.randn(dataset.latents.shape, generator=generator)
    alpha = sampler.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    embeds = sampler.encode_prompts(dataset.prompts)[0]

    def errors(clean, as_reference):
        noisy = alpha.sqrt() * clean + (1 - alpha).sqrt() * noise
        context = (reference() if reference else sampler.base_model()) if as_reference else contextlib.nullcontext()
        with context:
            return denoising_errors(noise, sampler.predict_noise(noisy, t, embeds))

    winners = errors(dataset.latents, False) - errors(dataset.latents, True)
    beaten = errors(losers, False) - errors(losers, True)
    return -(winners - beaten)
