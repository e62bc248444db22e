"""Pretrain the ShapesWorld text-to-image model from scratch and write it as a diffusers StableDiffusionPipeline.

    OMP_NUM_THREADS=1 python3 scripts/pretrain_shapesworld.py    # defaults: assets/models/shapes, seed 0, ~42 min

Three parts, as in Stable Diffusion: a frozen text encoder (a tiny CLIPTextModel with seeded random weights over a
real CLIP BPE tokenizer of the world's vocabulary), an AutoencoderKL trained on reconstruction (64 px images ->
4x16x16 latents), then a UNet2DConditionModel trained with the DDPM ε-prediction loss on the VAE's scaled latents,
with 10% of prompts replaced by "" so classifier-free guidance works. Every batch, noise draw and timestep is a
function of (seed, step), so a run given step budgets is reproducible and an interrupted run resumes exactly from
its last checkpoint in --state-dir. Minute budgets (--vae-minutes/--unet-minutes) stop a phase early; they make a run
machine-dependent. The output folder holds fp16 safetensors weights and `pretrain_metrics.json` (losses, times, and
the exact scorer's accuracy on data, VAE reconstructions and model samples, per prompt family).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a plain script from a checkout
    sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")   # loading/casting chatter would bury the progress bars
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import diffrl  # noqa: E402,F401  first: installs the torchvision fix before diffusers can import torchvision
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from tqdm import tqdm  # noqa: E402

from diffrl.shapesworld import COLOURS, FAMILIES, NUMBER_WORDS, RELATIONS, SHAPES, sample_batch  # noqa: E402
from diffrl.tiny_tokenizer import build_bpe_tokenizer  # noqa: E402

# Every word a ShapesWorld prompt can use (plurals included), repeated so that BPE merges each into one token.
VOCABULARY = (["a", "an", "and"] + list(NUMBER_WORDS) + list(COLOURS) + list(SHAPES) + [s + "s" for s in SHAPES]
              + [word for relation in RELATIONS for word in relation.split()])
MAX_PROMPT_TOKENS = 16   # the longest prompt is 8 words + start/end tokens; SD's 77 would only slow cross-attention
TEXT_ENCODER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    projection_dim=64)
# 64 px -> 4x16x16 latents (two downsamplings). Measured on one core, batch 16: (32, 64, 64) 2.6 s/step, these
# narrow full-resolution channels 0.8 s/step; a third downsampling (8x8 latents) saves little in the VAE.
VAE = dict(block_out_channels=(16, 32, 64), down_block_types=("DownEncoderBlock2D",) * 3,
           up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1, norm_num_groups=8, latent_channels=4)
# Attention only at 8x8 and 4x4: self-attention over the 16x16 level cost 3x the step time (1.7 vs 0.44 s/step,
# batch 32, one core) and objects span 2-3 cells of the 8x8 level, enough to bind colours to shapes.
UNET = dict(layers_per_block=1, block_out_channels=(32, 64, 96), norm_num_groups=16, attention_head_dim=8,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
SD_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
EVAL_FAMILY_SEED = 10_000   # evaluation prompts/data come from a seed the training stream never uses


@dataclass
class PhaseBudget:
    """How long one phase trains: it stops at whichever limit comes first (None: no limit of that kind)."""
    steps: int | None
    minutes: float | None
    batch_size: int
    learning_rate: float
    warmup_steps: int = 100


@dataclass
class PhaseResult:
    steps: int = 0
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)   # mean loss of each LOG_EVERY window


LOG_EVERY = 50
CHECKPOINT_SECONDS = 60.0


# ---------------------------------------------------------------- models

def build_tokenizer():
    return build_bpe_tokenizer(VOCABULARY * 4, num_merges=300, model_max_length=MAX_PROMPT_TOKENS)


def build_models(resolution: int, seed: int):
    """Tokenizer, text encoder (frozen), VAE and UNet with seeded random weights; leaves the global RNG alone."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), max_position_embeddings=MAX_PROMPT_TOKENS, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **TEXT_ENCODER))
        vae = AutoencoderKL(in_channels=3, out_channels=3, sample_size=resolution, **VAE)
        latent_size = resolution // 2 ** (len(VAE["block_out_channels"]) - 1)
        unet = UNet2DConditionModel(in_channels=4, out_channels=4, sample_size=latent_size,
                                    cross_attention_dim=TEXT_ENCODER["hidden_size"], **UNET)
    text_encoder.requires_grad_(False).eval()
    return tokenizer, text_encoder, vae, unet


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def assemble_pipeline(tokenizer, text_encoder, vae, unet):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    scheduler = DDIMScheduler(**SD_BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1)  # SD v1's
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------- losses

def step_generator(seed: int, phase: int, step: int) -> torch.Generator:
    """The RNG of one training step: a pure function of (seed, phase, step), so resuming redraws the same noise."""
    return torch.Generator().manual_seed((seed * 1_000_003 + phase) * 10_000_019 + step)


def training_images(step: int, batch_size: int, seed: int, resolution: int):
    """Batch `step` of the endless mixed-family stream, images in [-1, 1] as the VAE expects."""
    batch = sample_batch("mixed", batch_size, seed, resolution, start=step * batch_size)
    return batch.images * 2 - 1, batch.prompts


def vae_loss(vae, images: torch.Tensor, generator: torch.Generator, kl_weight: float) -> torch.Tensor:
    """L1 + MSE reconstruction of a posterior sample, plus a small KL to N(0, I) that keeps latents bounded."""
    posterior = vae.encode(images).latent_dist
    reconstruction = vae.decode(posterior.sample(generator)).sample
    kl = posterior.kl().mean() / posterior.mean[0].numel()   # per latent element
    return F.l1_loss(reconstruction, images) + F.mse_loss(reconstruction, images) + kl_weight * kl


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return text_encoder(ids)[0]


def diffusion_loss(unet, latents: torch.Tensor, prompt_embeds: torch.Tensor, noise_scheduler,
                   generator: torch.Generator) -> torch.Tensor:
    """DDPM ε-prediction loss (Ho et al. 2020, eq. 14): ‖ε − ε_θ(√ᾱ_t x_0 + √(1−ᾱ_t) ε, t, c)‖²."""
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(latents),), generator=generator)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    return F.mse_loss(unet(noisy, timesteps, prompt_embeds).sample, noise)


def drop_prompts(prompts: list[str], probability: float, generator: torch.Generator) -> list[str]:
    """Replace prompts by "" with `probability`: the unconditional model that classifier-free guidance needs."""
    keep = torch.rand(len(prompts), generator=generator) >= probability
    return [p if k else "" for p, k in zip(prompts, keep.tolist())]


# ---------------------------------------------------------------- one training phase, resumable

def train_phase(name: str, model: torch.nn.Module, loss_of_step: Callable[[int], torch.Tensor],
                budget: PhaseBudget, state_dir: Path, ema_decay: float | None = None, quiet: bool = False,
                ) -> PhaseResult:
    """AdamW with linear warm-up and gradient clipping until the budget is spent; checkpoints to state_dir/name
    every CHECKPOINT_SECONDS and at the end, and resumes from there. With `ema_decay`, the model ends holding the
    exponential moving average of its weights (the weights that are sampled from)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=budget.learning_rate, weight_decay=0.01)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / budget.warmup_steps))
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()} if ema_decay else None
    result = load_phase_state(state_dir / name, model, optimizer, warmup, ema)
    if not budget_spent(result, budget):   # a rerun with a larger budget continues the phase
        _run_steps(name, model, params, optimizer, warmup, ema, ema_decay, loss_of_step, budget, state_dir, result,
                   quiet)
    if ema is not None:
        model.load_state_dict(ema)
    return result


def _run_steps(name, model, params, optimizer, warmup, ema, ema_decay, loss_of_step, budget, state_dir, result,
               quiet) -> None:
    bar = tqdm(desc=name, initial=result.steps, total=budget.steps, disable=quiet, dynamic_ncols=True)
    window: list[float] = []
    start, last_save = time.monotonic() - result.seconds, time.monotonic()
    while not budget_spent(result, budget):
        loss = loss_of_step(result.steps)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        warmup.step()
        if ema is not None:   # decay warms up as in diffusers' EMAModel, so early random weights fade out fast
            update_ema(ema, model, min(ema_decay, (1 + result.steps) / (10 + result.steps)))
        result.steps, result.seconds = result.steps + 1, time.monotonic() - start
        window.append(loss.item())
        if len(window) == LOG_EVERY:
            result.losses.append(sum(window) / len(window))
            bar.set_postfix(loss=f"{result.losses[-1]:.4f}")
            window = []
        bar.update()
        if time.monotonic() - last_save > CHECKPOINT_SECONDS:
            save_phase_state(state_dir / name, model, optimizer, warmup, ema, result)
            last_save = time.monotonic()
    bar.close()
    save_phase_state(state_dir / name, model, optimizer, warmup, ema, result)


def budget_spent(result: PhaseResult, budget: PhaseBudget) -> bool:
    return ((budget.steps is not None and result.steps >= budget.steps)
            or (budget.minutes is not None and result.seconds >= budget.minutes * 60))


@torch.no_grad()
def update_ema(ema: dict[str, torch.Tensor], model: torch.nn.Module, decay: float) -> None:
    for key, value in model.state_dict().items():
        if value.dtype.is_floating_point:
            ema[key].lerp_(value, 1 - decay)


def save_phase_state(folder: Path, model, optimizer, warmup, ema, result: PhaseResult) -> None:
    """Weights as safetensors, optimizer/scheduler tensors via torch.save (loaded weights_only), progress as JSON;
    written to a temporary folder that then replaces the old one, so a kill never leaves a half-written state."""
    tmp, old = folder.with_name(f".tmp-{folder.name}"), folder.with_name(f".old-{folder.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
    if ema is not None:
        save_file({k: v.contiguous() for k, v in ema.items()}, tmp / "ema.safetensors")
    torch.save({"optimizer": optimizer.state_dict(), "warmup": warmup.state_dict()}, tmp / "optimizer.pt")
    (tmp / "progress.json").write_text(json.dumps(result.__dict__))
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def load_phase_state(folder: Path, model, optimizer, warmup, ema) -> PhaseResult:
    if not (folder / "progress.json").exists():
        return PhaseResult()
    model.load_state_dict(load_file(folder / "model.safetensors"))
    if ema is not None:
        ema.update(load_file(folder / "ema.safetensors"))
    states = torch.load(folder / "optimizer.pt", weights_only=True)
    optimizer.load_state_dict(states["optimizer"])
    warmup.load_state_dict(states["warmup"])
    return PhaseResult(**json.loads((folder / "progress.json").read_text()))


# ---------------------------------------------------------------- VAE latents

@torch.no_grad()
def latent_scaling_factor(vae, seed: int, resolution: int, count: int = 256) -> float:
    """1 / std of posterior samples, as Stable Diffusion chose its 0.18215: the UNet then sees unit-variance latents."""
    images, _ = training_images(0, count, EVAL_FAMILY_SEED + seed, resolution)
    latents = vae.encode(images).latent_dist.sample(torch.Generator().manual_seed(seed))
    return float(1 / latents.std())


def unet_loss_of_step(unet, vae, tokenizer, text_encoder, noise_scheduler, seed: int, batch_size: int,
                      resolution: int, prompt_dropout: float) -> Callable[[int], torch.Tensor]:
    def loss_of_step(step: int) -> torch.Tensor:
        generator = step_generator(seed, 1, step)
        images, prompts = training_images(step, batch_size, seed, resolution)
        with torch.no_grad():
            latents = vae.encode(images).latent_dist.sample(generator) * vae.config.scaling_factor
        prompt_embeds = encode_prompts(tokenizer, text_encoder, drop_prompts(prompts, prompt_dropout, generator))
        return diffusion_loss(unet, latents, prompt_embeds, noise_scheduler, generator)
    return loss_of_step


# ---------------------------------------------------------------- evaluation with the exact scorer

def exact_scores(images: torch.Tensor, prompts: list[str]) -> dict[str, float]:
    """shapes_accuracy's mean (fraction of checks passed) and the share of images passing every check."""
    from diffrl.shapesworld import parse_prompt
    from rewards.shapes import ShapesAccuracyReward, check, detect

    scenes = detect(images.float().clamp(0, 1))
    all_passed = [check(parse_prompt(p), s)["all"] for p, s in zip(prompts, scenes)]
    return {"shapes_accuracy": round(float(ShapesAccuracyReward()(images, prompts).mean()), 4),
            "all_checks": round(sum(all_passed) / len(all_passed), 4)}


@torch.no_grad()
def evaluate_data_and_reconstructions(vae, per_family: int, seed: int, resolution: int) -> dict:
    """Per family: the scorer on held-out data images, and on their VAE reconstructions (posterior mean)."""
    report = {}
    for family in FAMILIES:
        batch = sample_batch(family, per_family, EVAL_FAMILY_SEED + seed, resolution)
        reconstruction = vae.decode(vae.encode(batch.images * 2 - 1).latent_dist.mode()).sample
        report[family] = {"data": exact_scores(batch.images, batch.prompts),
                          "reconstruction": exact_scores((reconstruction + 1) / 2, batch.prompts)}
    return report


@torch.no_grad()
def evaluate_samples(pipe, per_family: int, seed: int, num_steps: int, guidance_scale: float):
    """Per family: the scorer on model samples of held-out prompts (DDIM, eta 0); also the images, for a grid."""
    from diffrl import SDSampler

    sampler = SDSampler(pipe, num_steps=num_steps, guidance_scale=guidance_scale, eta=0.0)
    report, images, prompts = {}, [], []
    for family in FAMILIES:
        family_prompts = sample_batch(family, per_family, EVAL_FAMILY_SEED + seed, 8).prompts
        samples = sampler.sample(family_prompts, generator=torch.Generator().manual_seed(seed)).images
        report[family] = exact_scores(samples, family_prompts)
        images.append(samples)
        prompts += family_prompts
    return report, torch.cat(images), prompts


# ---------------------------------------------------------------- the whole run

def save_pipeline(pipe, output: Path) -> None:
    """fp16 safetensors (half the bytes; loaded back as float32 by load_pipeline), swapped in atomically."""
    tmp = output.with_name(f".tmp-{output.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.to(dtype=torch.float16).save_pretrained(tmp, safe_serialization=True)
    pipe.to(dtype=torch.float32)
    shutil.rmtree(output, ignore_errors=True)
    tmp.rename(output)


def pretrain(args: argparse.Namespace) -> dict:
    """Both phases, then the folder at args.output and its measurements (also returned)."""
    from diffusers import DDPMScheduler

    tokenizer, text_encoder, vae, unet = build_models(args.resolution, args.seed)
    vae_budget = PhaseBudget(args.vae_steps, args.vae_minutes, args.vae_batch_size, args.vae_learning_rate)
    vae_result = train_phase("vae", vae, lambda step: vae_loss(
        vae, training_images(step, vae_budget.batch_size, args.seed, args.resolution)[0],
        step_generator(args.seed, 0, step), args.kl_weight), vae_budget, args.state_dir, quiet=args.quiet)
    vae.requires_grad_(False).eval()
    vae.register_to_config(scaling_factor=latent_scaling_factor(vae, args.seed, args.resolution))
    unet_budget = PhaseBudget(args.unet_steps, args.unet_minutes, args.unet_batch_size, args.unet_learning_rate)
    loss_of_step = unet_loss_of_step(unet, vae, tokenizer, text_encoder, DDPMScheduler(**SD_BETAS), args.seed,
                                     unet_budget.batch_size, args.resolution, args.prompt_dropout)
    unet_result = train_phase("unet", unet, loss_of_step, unet_budget, args.state_dir, args.ema_decay or None,
                              quiet=args.quiet)
    save_pipeline(assemble_pipeline(tokenizer, text_encoder, vae, unet), args.output)
    metrics = {
        "seed": args.seed, "resolution": args.resolution,
        "params": {name: parameter_count(m) for name, m in
                   (("text_encoder", text_encoder), ("vae", vae), ("unet", unet))},
        "vae": {**vae_result.__dict__, "steps_per_second": vae_result.steps / max(vae_result.seconds, 1e-9),
                "scaling_factor": vae.config.scaling_factor, "batch_size": vae_budget.batch_size},
        "unet": {**unet_result.__dict__, "steps_per_second": unet_result.steps / max(unet_result.seconds, 1e-9),
                 "batch_size": unet_budget.batch_size, "ema_decay": args.ema_decay},
        "data_and_reconstructions": evaluate_data_and_reconstructions(vae, args.eval_per_family, args.seed,
                                                                      args.resolution),
    }
    metrics["samples"] = evaluate_and_grid(args)
    (args.output / "pretrain_metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics


def evaluate_and_grid(args: argparse.Namespace) -> dict:
    """Samples from the saved folder as users load it (fp16 weights, float32 compute); optionally a grid PNG."""
    from diffrl import load_pipeline
    from diffrl.grids import image_grid, save_image_atomic

    pipe = load_pipeline(str(args.output))
    report, images, prompts = evaluate_samples(pipe, args.eval_per_family, args.seed, args.eval_steps,
                                               args.guidance_scale)
    report["settings"] = {"num_steps": args.eval_steps, "guidance_scale": args.guidance_scale, "eta": 0.0,
                          "per_family": args.eval_per_family}
    if args.grid:
        columns = min(8, args.eval_per_family)
        keep = [f * args.eval_per_family + c for f in range(len(FAMILIES)) for c in range(columns)]
        save_image_atomic(image_grid(images[keep], [prompts[i] for i in keep], columns), args.grid)
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--output", type=Path, default=REPO_ROOT / "assets" / "models" / "shapes", help="pipeline folder to write")
    add("--state-dir", type=Path, default=REPO_ROOT / "runs" / "pretrain-shapesworld",
        help="resumable training state; a rerun with the same folder continues where it stopped")
    add("--seed", type=int, default=0)
    add("--resolution", type=int, default=64, help="image side in pixels (32 px loses two-object binding)")
    add("--vae-steps", type=int, default=1000, help="~15 min on one core (1.1 steps/s at batch 16)")
    add("--vae-minutes", type=float, default=None, help="also stop the VAE phase after this long")
    add("--vae-batch-size", type=int, default=16)
    add("--vae-learning-rate", type=float, default=1e-3)
    add("--kl-weight", type=float, default=1e-6, help="KL per latent element against mean reconstruction error")
    add("--unet-steps", type=int, default=2100, help="~25 min on one core (1.4 steps/s at batch 32)")
    add("--unet-minutes", type=float, default=None, help="also stop the UNet phase after this long")
    add("--unet-batch-size", type=int, default=32)
    add("--unet-learning-rate", type=float, default=1e-3)
    add("--prompt-dropout", type=float, default=0.1, help="share of prompts trained as '' (for CFG)")
    add("--ema-decay", type=float, default=0.999, help="0 disables the EMA of UNet weights")
    add("--eval-per-family", type=int, default=32, help="held-out prompts sampled per family for the metrics")
    add("--eval-steps", type=int, default=20, help="DDIM steps for the evaluation samples")
    add("--guidance-scale", type=float, default=4.0)
    add("--grid", type=Path, default=None, help="also write a sample grid PNG here (rows: families)")
    add("--quiet", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    metrics = pretrain(args)
    print(json.dumps({"vae_steps": metrics["vae"]["steps"], "unet_steps": metrics["unet"]["steps"],
                      "samples": {f: metrics["samples"][f] for f in FAMILIES}}, indent=1))
    print(f"pipeline: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
