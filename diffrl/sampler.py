"""The Sampler protocol and SDSampler: DDIM and few-step samplers over a diffusers pipeline of any supported model
family (diffrl.families: Stable Diffusion 1.x/2.x, SDXL), exposing the trajectory.

SDSampler runs its own denoising loop over the pipeline's components (no copied pipeline ``__call__``) so that it can
record every latent and per-step log-probability, build the autograd graph through only the last K steps, and recompute
any step under the current weights. With the same initial latents and generator its images equal the pipeline's with
the same scheduler (DDIMScheduler at any eta, EulerAncestralDiscreteScheduler, LCMScheduler), because every step is
computed as diffusers computes it and the random draws come in the same order. The arithmetic of each kind of step
lives in its transition kernel (diffrl.transitions), and what differs between model families (the denoiser network,
prompt encoding, the denoiser's call, decoding) in the family's adapter (diffrl.families); this module runs guidance
and the loop. The family's conditioning object (SDXL's: text embeddings, pooled embedding, time ids) travels through
batched classifier-free guidance and every recomputed step, so trainers are the same code for every family.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Protocol

import torch
from diffusers import DiffusionPipeline
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from diffrl.errors import UserInputError, unknown_name
from diffrl.families import family_of
from diffrl.gaussian import gaussian_log_prob
from diffrl.lora import has_lora
from diffrl.sample_settings import MIDPOINT_FINAL_ALPHA, SCHEDULE_PRESETS, check_settings
from diffrl.trajectory import Conditioning, Trajectory
from diffrl.transitions import KERNELS, KernelSettings, SchedulerKernel, TransitionKernel


class Sampler(Protocol):
    def sample(self, prompts: list[str], *, grad_last_k: int = 0, generator=None) -> Trajectory: ...
    def log_prob(self, traj: Trajectory, i: int | Tensor) -> Tensor: ...
    def predict_noise(self, latents: Tensor, t: Tensor, prompt_embeds: Conditioning | Tensor, *,
                      reference: bool = False) -> Tensor: ...
    def decode(self, latents: Tensor) -> Tensor: ...


@dataclass
class TransitionStep:
    """One transition x_t -> x_{t'} ~ N(mean, std² I), of any kernel (DDIM, Euler ancestral, LCM)."""

    prev_latents: Tensor   # x_{t'}, in the latents' dtype (the denoiser's)
    mean: Tensor           # μ, float32
    std: Tensor            # σ_t(η), float32, broadcastable to the latents
    noise_pred: Tensor     # guided ε̂ (converted from v for v-prediction models), float32


# The samplers whose every step is a Gaussian transition the sampler can recompute (diffrl.transitions): they have
# log-probs and serve every trainer. Any other diffusers scheduler class name samples through its own `step`.
KERNEL_DESCRIPTIONS = {name: kernel.description for name, kernel in KERNELS.items()}


def scheduler_class(name: str) -> type:
    """The diffusers scheduler class of a `sample.scheduler` name; unknown names list the valid ones."""
    import diffusers
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

    cls = KERNELS[name].scheduler_class if name in KERNELS else getattr(diffusers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise unknown_name("sample.scheduler", name, list(KERNEL_DESCRIPTIONS) + [
            "<a diffusers scheduler class for plain sampling, e.g. DPMSolverMultistepScheduler>"])
    return cls


class SDSampler:
    """Batched classifier-free guidance over the pipeline of any model family in diffrl.families (SD 1.x/2.x, SDXL)
    with DDIM (η in [0, 1]), the few-step samplers Euler ancestral and LCM, or any diffusers scheduler for plain
    sampling.

    The pipeline's scheduler config (betas, spacing, offset, prediction type) is reused through a private scheduler of
    the kind ``scheduler`` names, so the pipeline itself is not modified; ``schedule`` names one of SCHEDULE_PRESETS,
    applied on top. Whatever adapters the denoiser carries are used; ``reference=True`` disables them to give the base
    model. Latents are the scheduler's own: σ-scaled (x0 + σε) for Euler ancestral, √ᾱ-scaled otherwise.
    ``timesteps`` replaces the spaced grid with explicit values (LCM only; DMD2's 4-step [999, 749, 499, 249]).
    """

    def __init__(self, pipe: DiffusionPipeline, num_steps: int = 50, guidance_scale: float = 7.5,
                 eta: float = 1.0, resolution: int | None = None, *, negative_prompt: str = "",
                 gradient_checkpointing: bool = True, schedule: str = "model", scheduler: str | None = None,
                 timesteps: list[int] | None = None, noise_level: float = 0.7):
        self.pipe, self.family = pipe, family_of(pipe)
        scheduler = scheduler or self.family.default_scheduler
        num_steps = num_steps if timesteps is None else len(timesteps)
        check_settings(num_steps, eta, schedule, scheduler, timesteps, noise_level)
        self.custom_timesteps = None if timesteps is None else list(timesteps)
        self.noise_level = noise_level
        self.network, self.vae = self.family.denoiser, self.family.vae   # the UNet or transformer, and its VAE
        self.denoiser = self.network  # what forward calls go through; the training loop may swap in a DDP wrapper
        self.num_steps, self.guidance_scale, self.eta = num_steps, guidance_scale, eta
        self.negative_prompt, self.gradient_checkpointing = negative_prompt, gradient_checkpointing
        if gradient_checkpointing:
            # The VAE decoder's backward at full image resolution is DRaFT's memory peak; the VAE's own per-block
            # checkpointing cut it from 22.1 to 13.0 GB where checkpointing the whole decode did not (SD 1.5, bf16,
            # batch 4, 512 px, H100). It acts only when grad is enabled, so no-grad decoding is unchanged, and it
            # stays on: switching it off between forward and backward would change what backward recomputes.
            self.vae.enable_gradient_checkpointing()
        self.schedule, self.scheduler_name = schedule, scheduler
        # A private scheduler from the pipeline's config (betas, prediction type, ...); the pipeline keeps its own.
        self.scheduler = scheduler_class(scheduler).from_config(pipe.scheduler.config, **SCHEDULE_PRESETS[schedule])
        if getattr(self.scheduler.config, "thresholding", False):
            raise UserInputError("dynamic thresholding is for pixel-space models; disable it in the scheduler config")
        if scheduler == "lcm" and getattr(self.network.config, "time_cond_proj_dim", None) is not None:
            raise UserInputError("this UNet is a guidance-embedded LCM (time_cond_proj_dim is set), which diffrl does "
                                 "not sample yet; use LCM-LoRA on its base model with sample.scheduler=lcm")
        self._check_kernel_fits_model(scheduler)
        self.resolution = resolution or self.family.default_resolution()
        self.family.latent_shape(1, self.resolution)   # refuses a resolution the latent grid cannot hold
        self._set_schedule()
        self.images_sampled = 0   # by sample(), all calls together: the training loop's samples_per_second

    @classmethod
    def from_config(cls, pipe: DiffusionPipeline, sample, *, gradient_checkpointing: bool) -> SDSampler:
        """The sampler a run config's ``sample`` section (diffrl.config.SampleConfig) describes: training and
        evaluation build theirs here, so both sample alike."""
        return cls(pipe, sample.num_steps, sample.guidance_scale, sample.eta, sample.resolution,
                   negative_prompt=sample.negative_prompt, gradient_checkpointing=gradient_checkpointing,
                   schedule=sample.schedule, scheduler=sample.scheduler, timesteps=sample.timesteps,
                   noise_level=sample.noise_level)

    def _check_kernel_fits_model(self, name: str) -> None:
        """A flow-matching kernel on a diffusion model (or the reverse) would read the wrong schedule tables."""
        kernel = KERNELS.get(name)
        if kernel is not None and kernel.flow_matching != self.is_flow_model:
            kind = "a flow-matching" if self.is_flow_model else "a diffusion (ε/v-prediction)"
            raise UserInputError(f"sample.scheduler={name} does not fit this model, which is {kind} model "
                                 f"({self.family.name}); use one of {', '.join(self._fitting_kernels())}")

    @property
    def is_flow_model(self) -> bool:
        return not hasattr(self.pipe.scheduler, "alphas_cumprod")   # flow schedulers keep only sigmas

    def _fitting_kernels(self) -> list[str]:
        return [name for name, kernel in KERNELS.items() if kernel.flow_matching == self.is_flow_model]

    @property
    def has_transitions(self) -> bool:
        """Whether every step is a Gaussian transition this sampler recomputes (step, log_prob)."""
        return self.kernel.has_density

    @property
    def is_memoryless(self) -> bool:
        """Whether the schedule is DDPM's ancestral one at every step (Adjoint Matching's requirement)."""
        return self.kernel.is_memoryless

    @property
    def stds(self) -> Tensor | None:
        """[T] σ of each step's Gaussian (0 at a deterministic step); None for plain diffusers sampling."""
        return self.kernel.stds

    def add_noise(self, x0: Tensor, noise: Tensor, i: int | Tensor) -> Tensor:
        """The forward process to step i's noise level, in this sampler's latent space (DRaFT-LV's re-noising)."""
        return self.kernel.add_noise(x0, noise, i)

    @property
    def num_train_timesteps(self) -> int:
        return self.scheduler.config.num_train_timesteps

    def add_training_noise(self, x0: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """The denoiser's training forward process at timestep values t (any of num_train_timesteps, not only
        the sampling grid): x_t = √ᾱ_t x0 + √(1 − ᾱ_t) ε, the input predict_noise(x_t, t) takes (Diffusion-DPO)."""
        return self.kernel.process.add_noise(x0, noise, timesteps)

    def require_transitions(self, method: str) -> None:
        if not self.has_transitions:
            raise UserInputError(f"{method} needs single denoising steps recomputed, which sample.scheduler="
                                 f"{self.scheduler_name} does not expose; use one of {', '.join(self._fitting_kernels())}")

    def _reset_scheduler(self, device) -> None:
        if self.custom_timesteps is None:
            self.scheduler.set_timesteps(self.num_steps, device=device,
                                         **self.family.timestep_kwargs(self.num_steps, self.resolution))
        else:
            self.scheduler.set_timesteps(device=device, timesteps=self.custom_timesteps)

    def _set_schedule(self) -> None:
        self._reset_scheduler(self.network.device)
        self.timesteps = self.scheduler.timesteps                       # [T], the pipeline's own values and dtype
        settings = KernelSettings(eta=self.eta, midpoint_final_alpha=self.schedule in MIDPOINT_FINAL_ALPHA,
                                  noise_level=self.noise_level)
        self.kernel: TransitionKernel = KERNELS.get(self.scheduler_name, SchedulerKernel)(self.scheduler, settings)
        self.stochastic_steps = self.kernel.stochastic_steps   # the steps with a density (and a likelihood ratio)

    @property
    def device(self) -> torch.device:
        return self.network.device

    @property
    def dtype(self) -> torch.dtype:
        """The denoiser's weight dtype, which latents are kept in."""
        return self.network.dtype

    def latent_shape(self, batch_size: int) -> tuple[int, ...]:
        return self.family.latent_shape(batch_size, self.resolution)

    @property
    def do_cfg(self) -> bool:
        """Whether sampling runs classifier-free guidance (two batched halves); a guidance-distilled family takes
        the scale as a denoiser input instead."""
        return self.guidance_scale > 1.0 and self.family.guidance == "cfg"

    # -- conditioning ---------------------------------------------------------------------------------------------
    def encode_prompts(self, prompts: list[str]) -> tuple[Conditioning, Conditioning | None]:
        """Conditional and (with CFG) unconditional conditioning of a batch, as the family's pipeline builds it."""
        return self.family.encode_prompts(list(prompts), self.negative_prompt, self.guidance_scale, self.resolution)

    def as_conditioning(self, value: Conditioning | Tensor | None) -> Conditioning | None:
        """The family's conditioning object from what a caller passes (SD 1.x/2.x: also bare text embeddings)."""
        return None if value is None else self.family.as_conditioning(value)

    # -- one denoiser evaluation ---------------------------------------------------------------------------------
    def _guided_output(self, latents: Tensor, t: Tensor, conditioning: Conditioning,
                       negative_conditioning: Conditioning | None, guidance_scale: float, reference: bool = False
                       ) -> Tensor:
        """The model output (ε or v) with classifier-free guidance as ONE batched denoiser call."""
        # The base model trains nothing, so it bypasses a DDP wrapper: a forward through DDP with grad enabled (Adjoint
        # Matching's vector-Jacobian products) would wait for gradient reduction that never comes.
        denoiser = self.network if reference else self.denoiser
        if negative_conditioning is None or guidance_scale <= 1.0:
            return self.family.denoise(denoiser, latents, t, conditioning)
        t_both = torch.cat([t, t]) if t.ndim == 1 else t
        both = type(conditioning).cat([negative_conditioning, conditioning])  # unconditional half first, as diffusers
        output = self.family.denoise(denoiser, torch.cat([latents, latents]), t_both, both)
        uncond, cond = output.chunk(2)
        return uncond + guidance_scale * (cond - uncond)

    def _model_output(self, latents, t, conditioning, negative_conditioning, guidance_scale, reference=False
                      ) -> Tensor:
        args = (latents, t, conditioning, negative_conditioning, guidance_scale, reference)
        # Recompute the denoiser's activations in backward: memory per differentiable step is one latent. Not for the base
        # model: its backward (Adjoint Matching's VJP) follows at once and runs after the adapters are back on.
        if self.gradient_checkpointing and torch.is_grad_enabled() and not reference:
            return checkpoint(self._guided_output, *args, use_reentrant=False)
        return self._guided_output(*args)

    @contextlib.contextmanager
    def _adapters(self, enabled: bool):
        network = self.network
        if enabled or not has_lora(network):
            yield  # without adapters the model is its own reference
            return
        network.disable_adapters()
        try:
            yield
        finally:
            network.enable_adapters()

    @contextlib.contextmanager
    def guidance(self, scale: float | None):
        """A context in which sampling uses another guidance scale (None: unchanged): grids and evaluation of a run
        trained without CFG."""
        kept = self.guidance_scale
        self.guidance_scale = kept if scale is None else scale
        try:
            yield
        finally:
            self.guidance_scale = kept

    def base_model(self):
        """A context in which every denoiser call (sampling included) runs the base model, its LoRA adapters off."""
        return self._adapters(enabled=False)

    def predict_noise(self, latents: Tensor, t: Tensor | int, prompt_embeds: Conditioning | Tensor, *,
                      negative_prompt_embeds: Conditioning | Tensor | None = None, guidance_scale: float | None = None,
                      reference: bool = False) -> Tensor:
        """ε̂(x_t, t) at timestep value(s) t (0-dim or [B]); with CFG when negative_prompt_embeds are given.

        The conditioning is the family's conditioning object (``traj.conditioning``; required for SDXL) or, for
        SD 1.x/2.x, the bare text embeddings. ``reference=True`` runs the base model (LoRA adapters disabled). v-prediction outputs
        are converted to ε.
        """
        t = torch.as_tensor(t, device=latents.device)
        output = self._output_at(latents, t, prompt_embeds, negative_prompt_embeds, guidance_scale, reference)
        return self.kernel.process.noise_prediction(output, latents, t)

    def predict_training_target(self, latents: Tensor, t: Tensor | int, conditioning: Conditioning | Tensor, *,
                                reference: bool = False) -> Tensor:
        """The denoiser's prediction of ``training_target`` at timestep value(s) t, without CFG: ε̂ for diffusion
        models, the velocity v̂ for flow-matching ones (what Diffusion-DPO's denoising errors compare)."""
        t = torch.as_tensor(t, device=latents.device)
        output = self._output_at(latents, t, conditioning, None, 1.0, reference)
        return self.kernel.process.training_prediction(output, latents, t)

    def training_target(self, x0: Tensor, noise: Tensor) -> Tensor:
        """What the model family is trained to predict from add_training_noise(x0, noise, t): ε, or ε − x0 (flow)."""
        return self.kernel.process.training_target(x0, noise)

    def training_x0(self, prediction: Tensor, latents: Tensor, t: Tensor | int) -> Tensor:
        """The clean latent a ``predict_training_target`` output implies at timestep value(s) t: x_t − σ v̂ (flow),
        (x_t − √(1 − ᾱ_t) ε̂) / √ᾱ_t (diffusion). Affine in the prediction, with coefficients that depend on t only."""
        t = torch.as_tensor(t, device=latents.device)
        return self.kernel.process.x0_from_training_prediction(prediction, latents, t)

    def _output_at(self, latents, t, conditioning, negative_conditioning, guidance_scale, reference) -> Tensor:
        scale = self.guidance_scale if guidance_scale is None else guidance_scale
        conditioning, negative = self.as_conditioning(conditioning), self.as_conditioning(negative_conditioning)
        with self._adapters(enabled=not reference):
            return self._model_output(latents, t, conditioning, negative, scale, reference)

    # -- one transition ------------------------------------------------------------------------------------------
    def step(self, latents: Tensor, i: int | Tensor, conditioning: Conditioning,
             negative_conditioning: Conditioning | None = None, *, generator=None, reference: bool = False,
             add_noise: bool = True) -> TransitionStep:
        """The transition from step index i (an int, or a [B] tensor of per-sample indices).

        ``add_noise=False`` returns the mean as the next latent without drawing noise (Adjoint Matching's drift)."""
        self.require_transitions("SDSampler.step")
        if torch.is_tensor(i):
            i = i.to(self.timesteps.device)
        t = self.timesteps[i]
        conditioning, negative = self.as_conditioning(conditioning), self.as_conditioning(negative_conditioning)
        with self._adapters(enabled=not reference):
            output = self._model_output(self.kernel.model_input(latents, i), t, conditioning, negative,
                                        self.guidance_scale, reference)
        # The step's Gaussian in float32 whatever the denoiser's dtype, for an int i (0-dim coefficients, sampling) and a
        # tensor i ([B, 1, 1, 1] coefficients, recomputation) alike: type promotion would otherwise compute the first
        # in bf16/fp16 and the second in float32, and the ratio of the two would not be 1 before an update.
        mean, std, eps = self.kernel.gaussian(output.float(), latents.float(), i)
        draws = self.kernel.draws_noise(i) if isinstance(i, int) else bool(self.stochastic_steps)
        if not (add_noise and draws):
            return TransitionStep(mean.to(latents.dtype), mean, std, eps)
        # noise drawn in the denoiser's dtype, as diffusers draws it (the same numbers for the same generator)
        noise = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=latents.dtype)
        return TransitionStep((mean + std * noise.float()).to(latents.dtype), mean, std, eps)

    # -- whole trajectories ---------------------------------------------------------------------------------------
    def initial_latents(self, batch_size: int, generator=None) -> Tensor:
        latents = self.family.initial_latents(batch_size, self.resolution, generator, self.device, self.dtype)
        # flow-matching schedulers start from unscaled noise and have no init_noise_sigma
        return latents * getattr(self.scheduler, "init_noise_sigma", 1.0)

    def sample(self, prompts: list[str], *, grad_last_k: int = 0, generator=None,
               initial_latents: Tensor | None = None) -> Trajectory:
        """Sample a batch; the graph runs through the last ``grad_last_k`` denoiser calls and the decode only."""
        if not 0 <= grad_last_k <= self.num_steps:
            raise ValueError(f"grad_last_k must be in [0, {self.num_steps}], got {grad_last_k}")
        self.images_sampled += len(prompts)
        conditioning, negative = self.encode_prompts(prompts)
        latents = (self.initial_latents(len(prompts), generator) if initial_latents is None
                   else initial_latents.to(self.device, self.dtype))
        steps = self._transitions if self.has_transitions else self._scheduler_steps
        first_grad_step = self.num_steps - grad_last_k
        all_latents, log_probs, noise_preds = [latents], [], []
        stochastic = set(self.stochastic_steps)
        for i, step in enumerate(steps(latents, first_grad_step, conditioning, negative, generator)):
            latents = step.prev_latents
            all_latents.append(latents.detach())
            if self.stochastic_steps:   # a deterministic step has no density: 0, nothing to a likelihood ratio
                log_probs.append(gaussian_log_prob(latents.detach(), step.mean.detach(), step.std)
                                 if i in stochastic else latents.new_zeros(len(prompts), dtype=torch.float32))
            if i >= first_grad_step:
                noise_preds.append(step.noise_pred)
        with torch.enable_grad() if grad_last_k else torch.no_grad():
            images = self.decode(latents)
        return Trajectory(
            prompts=list(prompts), conditioning=conditioning, latents=torch.stack(all_latents, dim=1),
            timesteps=self.timesteps, log_probs=torch.stack(log_probs, dim=1) if log_probs else None, images=images,
            negative_conditioning=negative, noise_preds=torch.stack(noise_preds, dim=1) if noise_preds else None)

    def _transitions(self, latents, first_grad_step, conditioning, negative_conditioning, generator):
        for i in range(self.num_steps):
            with torch.enable_grad() if i >= first_grad_step else torch.no_grad():
                step = self.step(latents.detach() if i == first_grad_step else latents, i, conditioning,
                                 negative_conditioning, generator=generator)
            latents = step.prev_latents
            yield step

    def _scheduler_steps(self, latents, first_grad_step, conditioning, negative_conditioning, generator):
        """Any diffusers scheduler through its own scale_model_input and step (stateful: reset for each batch)."""
        self._reset_scheduler(self.device)
        for i, t in enumerate(self.scheduler.timesteps):
            with torch.enable_grad() if i >= first_grad_step else torch.no_grad():
                if i == first_grad_step:
                    latents = latents.detach()
                model_input = self.scheduler.scale_model_input(latents, t)
                output = self._model_output(model_input, t, conditioning, negative_conditioning,
                                            self.guidance_scale)
                latents = self.scheduler.step(output, t, latents, generator=generator, return_dict=False)[0]
            yield TransitionStep(latents, latents, latents.new_zeros(()), output)

    def log_prob(self, traj: Trajectory, i: int | Tensor) -> Tensor:
        """[B] float32 log p(latents[:, i+1] | latents[:, i]) under the current weights, with grad."""
        rows = torch.arange(len(traj), device=traj.latents.device)
        return self.transition_log_prob(traj.latents[rows, i], traj.latents[rows, i + 1], i, traj.conditioning,
                                        traj.negative_conditioning)[0]

    def transition_log_prob(self, latents: Tensor, next_latents: Tensor, i: int | Tensor, conditioning: Conditioning,
                            negative_conditioning: Conditioning | None = None, *, reference: bool = False
                            ) -> tuple[Tensor, TransitionStep]:
        """[B] float32 log p(next_latents | latents) of step index i (int or [B], each one of ``stochastic_steps``)
        under the current weights (``reference=True``: the base model, adapters off), with grad, and the step itself
        (its guided ε̂ is what DPOK's KL term compares with the reference model's)."""
        self.require_transitions("a log-prob")
        if not self.stochastic_steps:
            raise ValueError("log-probs need a stochastic sampler (DDIM with eta > 0, euler_ancestral or lcm with "
                             "at least 2 steps); every step of this one is deterministic")
        step = self.step(latents, i, conditioning, negative_conditioning, reference=reference)
        return gaussian_log_prob(next_latents, step.mean, step.std), step

    def decode(self, latents: Tensor) -> Tensor:
        """Latents -> images in [0, 1], float32, differentiable (per-block checkpointed when building a graph)."""
        return self.family.decode(latents)
