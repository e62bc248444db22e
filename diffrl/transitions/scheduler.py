"""Any diffusers scheduler, stepped through its own `scale_model_input` and `step`: plain sampling (grids,
evaluation, DRaFT through the sampling chain), with no per-step density for the trainers that need one."""

from __future__ import annotations

from torch import Tensor

from diffrl.transitions.kernel import KernelSettings
from diffrl.transitions.process import RectifiedFlow, VariancePreserving


class SchedulerKernel:
    name = "scheduler"
    description = "a diffusers scheduler class for plain sampling, e.g. DPMSolverMultistepScheduler"
    has_density = False
    stds = None
    stochastic_steps: list[int] = []
    is_memoryless = False

    def __init__(self, scheduler, settings: KernelSettings):
        self.scheduler, self.timesteps = scheduler, scheduler.timesteps
        self.flow_matching = not hasattr(scheduler, "alphas_cumprod")   # the flow schedulers keep only sigmas
        self.process = RectifiedFlow(scheduler) if self.flow_matching else VariancePreserving(scheduler)

    def draws_noise(self, i: int) -> bool:
        return False    # the scheduler draws, or not, inside its own step

    def model_input(self, latents: Tensor, i: int | Tensor) -> Tensor:
        return self.scheduler.scale_model_input(latents, self.timesteps[i])

    def _no_density(self, *args):
        raise ValueError(f"{type(self.scheduler).__name__} is stepped by diffusers: it has no per-step Gaussian")

    gaussian = predicted_x0 = add_noise = _no_density
