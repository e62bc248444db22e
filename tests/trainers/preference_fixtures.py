"""The implicit preference margin of a trained model on fresh noise: how the preference trainers' learning tests
see whether the policy moved toward the winners."""

from __future__ import annotations

import contextlib

import torch

from diffrl.preference import denoising_errors


@torch.no_grad()
def implicit_margins(run, records: list[int], losers: torch.Tensor, *, timesteps: torch.Tensor, reference,
                     seed: int = 99):
    """[N] −[(e_θ(w) − e_ref(w)) − (e_θ(l) − e_ref(l))] over the trainer's dataset ``records`` (winners) and
    ``losers`` (one per record), each pair noised with one fresh ε to a timestep drawn from ``timesteps``;
    ``reference`` is a context giving the reference model (None: adapters off). Positive: the policy prefers the
    dataset image more than the reference does."""
    sampler, dataset = run.sampler, run.trainer.dataset
    generator = torch.Generator().manual_seed(seed)
    winners, prompts = dataset.latents[records], [dataset.prompts[i] for i in records]
    t = timesteps[torch.randint(len(timesteps), (len(records),), generator=generator)]
    noise = torch.randn(winners.shape, generator=generator)
    alpha = sampler.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    embeds = sampler.encode_prompts(prompts)[0]

    def errors(clean, as_reference):
        noisy = alpha.sqrt() * clean + (1 - alpha).sqrt() * noise
        context = (reference() if reference else sampler.base_model()) if as_reference else contextlib.nullcontext()
        with context:
            return denoising_errors(noise, sampler.predict_noise(noisy, t, embeds))

    preferred = errors(winners, False) - errors(winners, True)
    beaten = errors(losers, False) - errors(losers, True)
    return -(preferred - beaten)
