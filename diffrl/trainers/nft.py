"""DiffusionNFT: Online Diffusion Reinforcement with Forward Process.

Zheng, Chen, Ye, Wang, Zhang, Jiang, Su, Ermon, Zhu, Liu. ICLR 2026, arXiv 2509.16117, following the official
NVlabs/DiffusionNFT at commit 24af555 (scripts/train_nft_sd3.py, config/nft.py, config/base.py; "line N" below is
train_nft_sd3.py's). Policy improvement on the forward process: the model is trained on noised copies of its own
clean samples, pulled towards the good ones and pushed from the bad ones, so no likelihood, trajectory or SDE is needed.

Notation (paper -> code):
    x0                  the clean latent of a rollout (latents[:, -1])
    t, σ                a timestep of the sampling grid, and its noise level σ = t / 1000 on flow models
    v_θ, v_old, v_ref   predictions of the trained LoRA, the old (rollout) policy θ_old, the base model (adapters off)
    β                   beta           the implicit policies' step
    Â, r                advantages, optimality   group-normalised reward and its optimality probability in [0, 1]
    c                   adv_clip_max
Per step:
    1. Roll out G samples of each of the B prompts with θ_old and the run's sampler (any solver, deterministic ones
       included; nothing but the clean latents is kept), without CFG (lines 640-659; config/nft.py lines 64-66).
    2. Score them; Â = (R − mean of its prompt's group) / (std + 1e-4) over the batch gathered from every process,
       the std the whole batch's by default (lines 727-750, config/base.py line 57); r = clamp(½ + ½ clip(Â, −c, c)/c,
       0, 1) (lines 910-929).
    3. For each micro-batch of shuffled samples and each of K = ⌊T · timestep_fraction⌋ timesteps per sample (a random
       K of the T sampling timesteps, different for each sample; fresh noise each time; lines 569, 806-870):
           x_t = (1 − σ) x0 + σ ε
           v⁺ = β v_θ + (1 − β) v_old,   v⁻ = (1 + β) v_old − β v_θ,   x̂0^± = x_t − σ v^±        (lines 934-948)
           L^± = mean((x̂0^± − x0)²) / sg(max(mean|x̂0^± − x0|, 1e-5))  per sample (adaptive weight, lines 939-957)
           loss = mean(c (r L⁺ + (1 − r) L⁻) / β) + kl_weight · mean((v_θ − v_ref)²)      (lines 959-970)
       one backward per timestep; accelerate averages K · train.gradient_accumulation_steps of them per optimiser
       step (lines 801, 983).
    4. θ_old ← d θ_old + (1 − d) θ with d = min(rate · max(s − delay, 0), max), s the optimiser steps so far
       (return_decay, lines 169-189, applied after each rollout's training, lines 1034-1039). The official decay
       types: 1 (default) rate 0.001, max 0.5, delay 0; 2 (OCR) rate 0.0075, max 0.999, delay 75; 0 is max 0
       (θ_old = θ).
Official defaults (config/nft.py, config/base.py): G = 24, 48 groups per rollout, β = 1 (0.1 for OCR and multi-reward),
kl_weight 1e-4, c = 5, timestep_fraction 0.99 on 10 sampling steps (9 trained), global std, lr 3e-4, AdamW weight decay
1e-4, LoRA rank 32 alpha 64, grad clip 1, one optimiser step per rollout (two for OCR).

The three policies. θ is the LoRA adapter being trained ("default"); θ_old is a second peft adapter ("old") on the
same denoiser with the same config, as the official code keeps it (lines 438-445): switching adapters copies nothing,
so θ_old's forward costs exactly one denoiser call, and its tensors update in place (step 4); the reference is the
base model, every adapter off (``reference=True``). θ_old starts equal to θ and is part of ``state_dict``.

CFG. Rollouts run at guidance 1 when ``cfg_free`` (the default; official: sample.guidance_scale 1.0, its training path
for guidance > 1 would pass unconditional embeddings without doubling the latents, lines 839-851), whatever
sample.guidance_scale says; that scale then sets only the guidance of grids and `diffrl evaluate` unless
sample.eval_guidance_scale is given. The paper evaluates the trained model without CFG: set sample.guidance_scale
(or eval_guidance_scale) to 1 to look at what was trained. ``cfg_free: false`` rolls out at sample.guidance_scale
(guided samples as data; not in the paper). The loss always trains the conditional prediction. A guidance-distilled
family (FLUX.1-dev) has no CFG to drop: its guidance input stays sample.guidance_scale.

Diffusion (UNet) families. The objective carries over in its x0-parameterisation: x̂0 = (x_t − √(1−ᾱ_t) ε̂)/√ᾱ_t
(v-prediction converted to ε̂) is, like the flow's x_t − σ v̂, affine in the network output with coefficients that
depend on x_t and t only, so x̂0 of the combined outputs β o_θ + (1 − β) o_old and (1 + β) o_old − β o_θ (weights
summing to 1) is the same combination of x̂0_θ and x̂0_old. Here x̂0^± are formed that way on every family (on flow
models equal to the official x_t − σ v^±), with x_t = √ᾱ_t x0 + √(1 − ᾱ_t) ε at the DDIM grid's timesteps and the KL on
ε̂. What differs is ∂x̂0/∂output: −σ ≥ −1 on flow models, −√(1−ᾱ_t)/√ᾱ_t for ε-prediction (−13 at SD's t = 981), so
after the adaptive weight high-noise timesteps get more gradient on UNets; unverified beyond the tests here.

Step-distilled students are refused: the method trains the denoising objective at every noise level, which a few-step
student no longer solves, and its authors call it not valid for them (as DESIGN.md reports; not in the official code or
README, the paper's text was not checked). diffrl's signal: the few-step kernels (sample.scheduler lcm or
euler_ancestral, the only ways it samples SD-Turbo, SDXL-Turbo, LCM-LoRA and DMD2), the trailing schedule or explicit
sample.timesteps, and for flow students sampled with flow_euler, the model id (Turbo, schnell, Lightning, LCM, DMD).
Deviations: checkpoints hold θ, where the official code saves and evaluates an EMA of θ (decay 0.9, lines 565-567);
prompts group by their exact text, the official code by their CLIP-tokenised text; no inner epochs (official: 1) and
none of the official adv_mode variants (its configs use "all", the formula above).
"""

from __future__ import annotations

import contextlib
import copy
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from diffrl.errors import UserInputError
from diffrl.metrics import metrics_to_floats
from diffrl.policy_gradient import epsilon_kl, group_advantages
from diffrl.trainers.ppo import rollout_metrics
from rewards import Reward, score

if TYPE_CHECKING:  # the config class must import without diffusers (config parsing, `diffrl list`)
    from diffrl.optimization import Optimization
    from diffrl.sampler import SDSampler
    from diffrl.trajectory import Conditioning

OLD_ADAPTER = "old"
FEW_STEP_KERNELS = ("lcm", "euler_ancestral")
STUDENT_MODEL_MARKERS = ("turbo", "schnell", "lightning", "lcm", "dmd")   # in hub ids of step-distilled students


@dataclass
class NftConfig:
    group_size: int = 24                # G samples of each prompt per step, one group (official: 24)
    beta: float = 1.0                   # β of the implicit policies v± (official: 1.0; OCR and multi-reward: 0.1)
    kl_weight: float = 1e-4             # weight of mean((v_θ − v_ref)²) to the base model (official train.beta: 1e-4)
    adv_clip_max: float = 5.0           # c: Â clipped to ±c, r = ½ + ½ Â/c (official: 5)
    global_std: bool = True             # Â over the whole batch's reward std; false: its group's (official: true)
    timestep_fraction: float = 0.99     # K = ⌊T · this⌋ of the T sampling timesteps trained per sample (official: 0.99)
    train_batch_size: int | None = None  # samples per micro-batch (denoiser call); None: all of the step's
    cfg_free: bool = True               # roll out without CFG (official); false: at sample.guidance_scale
    old_decay_rate: float = 0.001       # θ_old ← d θ_old + (1 − d) θ, d = min(rate · max(s − delay, 0), max) at s
    #                                     optimiser steps (official decay_type 1: 0.001; type 2, OCR: 0.0075)
    old_decay_max: float = 0.5          # that d's ceiling (type 1: 0.5; type 2: 0.999; 0: θ_old = θ each step)
    old_decay_delay: int = 0            # optimiser steps with d = 0 first (type 1: 0; type 2: 75)
    seed: int = 0                       # seed of the trainer's own draws (sample order, timesteps, training noise)


class NftTrainer:
    """DiffusionNFT: flow matching on the old policy's samples towards an implicit reward-improved policy."""

    backpropagates_through_sampling = False

    def __init__(self, config: NftConfig, sampler: SDSampler, reward: Reward, optimization: Optimization, *,
                 run_dir: Path):
        check_config(config, sampler.num_steps)
        refuse_step_distilled(sampler)
        self.config, self.sampler, self.reward, self.optimization = config, sampler, reward, optimization
        # each process draws its own training noise, as it draws its own sampling noise (training.build_run)
        self.generator = torch.Generator().manual_seed(config.seed + optimization.accelerator.process_index)
        self.old_policy = OldPolicy(sampler.network)
        self.optimizer_steps = 0     # s of the θ_old schedule, the official global_step
        self.slots = trained_slots(config, sampler.num_steps)
        optimization.set_backward_passes_per_micro_batch(self.slots)
        drops_cfg = config.cfg_free and sampler.family.guidance == "cfg"
        self.rollout_guidance = 1.0 if drops_cfg else None
        if drops_cfg and sampler.do_cfg and optimization.accelerator.is_main_process:
            print(f"diffrl: note: nft rolls out without CFG (nft.cfg_free); sample.guidance_scale="
                  f"{sampler.guidance_scale} sets only the guidance of grids and evaluation", file=sys.stderr)

    @staticmethod
    def optimizer_steps_per_step(config) -> float:   # config: the run's diffrl.config.Config
        section = config.nft
        check_config(section, config.sample.num_steps)
        samples = config.sample.batch_size * section.group_size
        batch = section.train_batch_size or samples
        per_step = batch * config.train.gradient_accumulation_steps
        if samples % per_step:
            raise UserInputError(
                f"each step rolls out sample.batch_size × nft.group_size = {samples} samples, which must be a multiple "
                f"of nft.train_batch_size ({batch}) × train.gradient_accumulation_steps "
                f"({config.train.gradient_accumulation_steps}), so that every optimiser step sees whole micro-batches")
        return samples / per_step

    def step(self, prompts: list[str]) -> dict[str, float]:
        group_prompts = [prompt for prompt in prompts for _ in range(self.config.group_size)]
        x0, conditioning, rewards, components = self.rollout(group_prompts)                      # 1
        advantages = self.advantages(group_prompts, rewards)                                       # 2
        optimality = optimality_probability(advantages, self.config.adv_clip_max)
        metrics = self.train_on_samples(x0, conditioning, optimality)                              # 3
        decay = old_policy_decay(self.optimizer_steps, self.config.old_decay_rate, self.config.old_decay_max,
                                 self.config.old_decay_delay)
        self.old_policy.blend(decay)                                                               # 4
        return metrics_to_floats({**metrics, **rollout_metrics(rewards, components, advantages),
                                  "optimality_mean": optimality.mean(), "old_decay": decay})

    @torch.no_grad()
    def rollout(self, prompts: list[str]) -> tuple[Tensor, Conditioning, Tensor, dict[str, Tensor]]:
        """Step 1: clean latents sampled by θ_old, their conditioning, and float32 rewards."""
        with self.old_policy.active(), self.sampler.guidance(self.rollout_guidance):
            traj = self.sampler.sample(prompts)
        rewards, components = score(self.reward, traj.images, prompts)
        return traj.latents[:, -1], traj.conditioning, rewards.float(), components

    def advantages(self, prompts: list[str], rewards: Tensor) -> Tensor:
        """Group-normalised rewards, the groups and the std taken over every process's samples. (A reward mix
        would be normalised per component here, before weighting.)"""
        accelerator = self.optimization.accelerator
        all_prompts, all_rewards = list(prompts), rewards
        if accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            all_prompts, all_rewards = gather_object(list(prompts)), accelerator.gather(rewards)
        advantages = group_advantages(all_prompts, all_rewards, global_std=self.config.global_std)
        start = accelerator.process_index * len(prompts)
        return advantages[start:start + len(prompts)]

    def train_on_samples(self, x0: Tensor, conditioning: Conditioning, optimality: Tensor) -> dict[str, Tensor]:
        """Step 3: every micro-batch at K timesteps each, one backward per timestep."""
        n, device, timesteps = len(x0), x0.device, self.sampler.timesteps
        batch = self.config.train_batch_size or n
        order = torch.randperm(n, generator=self.generator)
        # a random K of the T grid timesteps for each sample: the first K columns of a per-row permutation
        draws = torch.rand(n, len(timesteps), generator=self.generator).argsort(dim=1)[:, :self.slots]
        totals: dict[str, list[Tensor]] = {}
        for start in range(0, n, batch):
            rows = order[start:start + batch]
            on_device = rows.to(device)
            for slot in range(self.slots):
                t = timesteps[draws[rows, slot].to(timesteps.device)]
                noise = torch.randn((len(rows), *x0.shape[1:]), generator=self.generator).to(device)
                with self.optimization.accumulate():
                    loss, parts = self.slot_loss(x0[on_device], conditioning[on_device], optimality[on_device], t,
                                                 noise)
                    grad_norm = self.optimization.step(loss)
                for name, value in {"loss": loss.detach(), **parts, "grad_norm": grad_norm}.items():
                    if value is not None:
                        totals.setdefault(name, []).append(torch.as_tensor(value, device=device).float())
        self.optimizer_steps += n // (batch * self.optimization.micro_batches_per_step)
        return {name: torch.stack(values).mean() for name, values in totals.items()}

    def slot_loss(self, x0: Tensor, conditioning: Conditioning, optimality: Tensor, t: Tensor, noise: Tensor
                  ) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss of one micro-batch at per-sample timesteps t: three denoiser calls, one with grad."""
        sampler, config = self.sampler, self.config
        x0 = x0.float()
        noisy = sampler.add_training_noise(x0, noise.float(), t)
        model_input = noisy.to(sampler.dtype)
        with torch.no_grad():
            with self.old_policy.active():
                old = sampler.predict_training_target(model_input, t, conditioning).float()
            reference = sampler.predict_training_target(model_input, t, conditioning, reference=True).float()
        prediction = sampler.predict_training_target(model_input, t, conditioning).float()
        x0_theta, x0_old = sampler.training_x0(prediction, noisy, t), sampler.training_x0(old, noisy, t)
        policy_loss = nft_policy_loss(x0_theta, x0_old, x0, optimality, config.beta, config.adv_clip_max).mean()
        kl = epsilon_kl(prediction, reference)   # on v̂ for flow models, ε̂ for diffusion ones
        parts = {"policy_loss": policy_loss.detach(), "kl": kl.detach(),
                 "old_deviation": epsilon_kl(prediction.detach(), old)}
        return policy_loss + config.kl_weight * kl, parts

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "optimizer_steps": self.optimizer_steps,
                "old_policy": self.old_policy.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.optimizer_steps = state["optimizer_steps"]
        self.old_policy.load_state_dict(state["old_policy"])


def check_config(config: NftConfig, num_steps: int) -> None:
    """Refuse settings under which the method is not DiffusionNFT, each with a sentence naming the key."""
    if config.group_size < 2:
        raise UserInputError(f"nft.group_size must be at least 2, since rewards are normalised within each prompt's "
                             f"group, got {config.group_size}")
    if config.beta <= 0 or config.adv_clip_max <= 0 or config.kl_weight < 0:
        raise UserInputError("nft.beta and nft.adv_clip_max must be positive and nft.kl_weight non-negative")
    if not 0 < config.timestep_fraction <= 1 or int(num_steps * config.timestep_fraction) < 1:
        raise UserInputError(f"nft.timestep_fraction must be in (0, 1] and leave at least one of the {num_steps} "
                             f"sampling timesteps to train, got {config.timestep_fraction}")
    if config.train_batch_size is not None and config.train_batch_size < 1:
        raise UserInputError(f"nft.train_batch_size must be at least 1 or null, got {config.train_batch_size}")
    if config.old_decay_rate < 0 or config.old_decay_delay < 0 or not 0 <= config.old_decay_max < 1:
        raise UserInputError("nft.old_decay_rate and nft.old_decay_delay must be non-negative and nft.old_decay_max "
                             "in [0, 1)")


def refuse_step_distilled(sampler: SDSampler) -> None:
    """DiffusionNFT trains the denoising objective at every noise level, which a step-distilled student no longer
    solves: refuse what marks one in diffrl (see the module docstring)."""
    model = str(getattr(sampler.pipe, "name_or_path", None) or "")
    signs = [f"sample.scheduler={sampler.scheduler_name}"] if sampler.scheduler_name in FEW_STEP_KERNELS else []
    signs += ["sample.schedule=trailing"] if sampler.schedule == "trailing" else []
    signs += ["explicit sample.timesteps"] if sampler.custom_timesteps is not None else []
    signs += [f"model {model!r}"] if any(marker in model.lower() for marker in STUDENT_MODEL_MARKERS) else []
    if signs:
        raise UserInputError(f"DiffusionNFT is not valid for step-distilled students and {signs[0]} marks this run as "
                             "one; fine-tune a few-step student with pso, or train its base model with nft")


def trained_slots(config: NftConfig, num_steps: int) -> int:
    """K = ⌊T · timestep_fraction⌋ (official num_train_timesteps, line 569)."""
    return int(num_steps * config.timestep_fraction)


def optimality_probability(advantages: Tensor, adv_clip_max: float) -> Tensor:
    """r = clamp(½ + ½ clip(Â, −c, c) / c, 0, 1) (lines 910-929; the clamp cannot bind after the clip)."""
    clipped = advantages.float().clamp(-adv_clip_max, adv_clip_max)
    return (clipped / adv_clip_max / 2.0 + 0.5).clamp(0.0, 1.0)


def implicit_policies(theta: Tensor, old: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """(β θ + (1 − β) old, (1 + β) old − β θ): v^± from v_θ and v_old (lines 934-937), or x̂0^± from x̂0_θ, x̂0_old."""
    return beta * theta + (1 - beta) * old, (1 + beta) * old - beta * theta


def adaptive_x0_loss(x0_prediction: Tensor, x0: Tensor) -> Tensor:
    """[B] mean((x̂0 − x0)² / w), w = sg(max(mean|x̂0 − x0|, 1e-5)) per sample, w in float64 (lines 939-957)."""
    dims = tuple(range(1, x0.ndim))
    error = x0_prediction - x0
    with torch.no_grad():
        weight = error.double().abs().mean(dim=dims, keepdim=True).clamp(min=1e-5)
    return (error**2 / weight).mean(dim=dims).float()


def nft_policy_loss(x0_theta: Tensor, x0_old: Tensor, x0: Tensor, optimality: Tensor, beta: float,
                    adv_clip_max: float) -> Tensor:
    """[B] c (r L⁺ + (1 − r) L⁻) / β, with L^± the adaptive x0-losses of the implicit policies (lines 959-960)."""
    positive, negative = implicit_policies(x0_theta, x0_old.detach(), beta)
    return adv_clip_max * (optimality * adaptive_x0_loss(positive, x0)
                           + (1 - optimality) * adaptive_x0_loss(negative, x0)) / beta


def old_policy_decay(optimizer_steps: int, rate: float, maximum: float, delay: int) -> float:
    """d = min(rate · max(s − delay, 0), max): the official return_decay (lines 169-189) with its three numbers."""
    return min(max(optimizer_steps - delay, 0) * rate, maximum)


class OldPolicy:
    """θ_old as a second LoRA adapter beside the trained one ("default"), same config, float32 like θ's."""

    def __init__(self, network: torch.nn.Module):
        self.network = network
        with warnings.catch_warnings():   # peft warns that a second adapter joins the first: that is the point
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            network.add_adapter(copy.deepcopy(network.peft_config["default"]), adapter_name=OLD_ADAPTER)
        network.set_adapter("default")   # add_adapter activates the new adapter; peft makes the active one trainable
        named = dict(network.named_parameters())
        self.names = [name.replace(".default.", f".{OLD_ADAPTER}.") for name in named
                      if "lora_" in name and ".default." in name]
        self.pairs = [(named[name], named[name.replace(f".{OLD_ADAPTER}.", ".default.")]) for name in self.names]
        for old, trained in self.pairs:
            old.data = old.data.to(trained.dtype)
        self.blend(0.0)   # θ_old = θ (lines 576-579)

    @contextlib.contextmanager
    def active(self):
        """Every denoiser call inside runs θ_old (the reference, adapters off, stays reachable)."""
        self.network.set_adapter(OLD_ADAPTER)
        try:
            yield
        finally:
            self.network.set_adapter("default")

    @torch.no_grad()
    def blend(self, decay: float) -> None:
        """θ_old ← d θ_old + (1 − d) θ, written as the official update (line 1039): d = 0 copies θ exactly."""
        for old, trained in self.pairs:
            old.mul_(decay).add_(trained, alpha=1.0 - decay)

    def state_dict(self) -> dict[str, Tensor]:
        return {name: old.detach() for name, (old, _) in zip(self.names, self.pairs)}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if set(state) != set(self.names):
            raise ValueError("the saved old policy does not match this run's LoRA adapter (other rank or targets)")
        for name, (old, _) in zip(self.names, self.pairs):
            old.copy_(state[name])
