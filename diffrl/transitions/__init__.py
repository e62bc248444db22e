"""Transition kernels: one kind of denoising step per file (diffusers' rule: one scheduler algorithm per file).

A kernel owns the tables of its schedule and answers, for step index i (an int while sampling, a [B] tensor of
per-sample indices when a trainer recomputes steps): how the denoiser's input is scaled, the step's Gaussian
N(mean, std² I) from the denoiser's output, the predicted clean latent, and the forward process to step i's noise
level. The sampler runs the denoiser and the loop; the kernel does the arithmetic; the pure math lives in small
modules behind the kernels (diffrl.gaussian, diffrl.few_step) with its notation and equation numbers.

Adding a kind of step: one file here with a class following `TransitionKernel`, and one line in KERNELS.
"""

from __future__ import annotations

from diffrl.transitions.ddim import DDIMKernel
from diffrl.transitions.euler_ancestral import EulerAncestralKernel
from diffrl.transitions.flow_cps import FlowCPSKernel
from diffrl.transitions.flow_euler import FlowEulerKernel
from diffrl.transitions.flow_sde import FlowSDEKernel
from diffrl.transitions.kernel import KernelSettings, TransitionKernel, per_step
from diffrl.transitions.lcm import LCMKernel
from diffrl.transitions.scheduler import SchedulerKernel

# sample.scheduler name -> kernel with a density; any other diffusers scheduler class name samples through
# SchedulerKernel (plain sampling: grids, evaluation, DRaFT).
KERNELS: dict[str, type] = {
    "ddim": DDIMKernel, "euler_ancestral": EulerAncestralKernel, "lcm": LCMKernel,   # diffusion (ε/v) models
    "flow_euler": FlowEulerKernel, "flow_sde": FlowSDEKernel, "flow_cps": FlowCPSKernel,   # flow-matching models
}

__all__ = ["KERNELS", "DDIMKernel", "EulerAncestralKernel", "FlowCPSKernel", "FlowEulerKernel", "FlowSDEKernel",
           "KernelSettings", "LCMKernel", "SchedulerKernel", "TransitionKernel", "per_step"]
