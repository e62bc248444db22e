"""train(): the one loop every trainer shares: setup on accelerate, logging, grids, NaN guard, checkpoints, resume."""

from __future__ import annotations

import importlib.util
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import (DistributedType, ProjectConfiguration, is_tensorboard_available, is_wandb_available,
                              set_seed)
from diffusers.optimization import SchedulerType, get_scheduler
from tqdm.auto import tqdm

from diffrl.checkpoint import (Processes, TrainingState, checkpoint_name, list_checkpoints, load_latest_checkpoint,
                               prune_checkpoints, recover_interrupted_saves, save_checkpoint)
from diffrl.config import Config, config_to_dict, save_config
from diffrl.errors import UserInputError, unknown_name
from diffrl.families import family_of
from diffrl.grids import image_grid, save_image_atomic
from diffrl.interruption import StopRequests, TrainingInterrupted
from diffrl.lora import NoLoraTargetError
from diffrl.models import load_model
from diffrl.nonfinite import StepUndo, fp16_skipped_updates, non_finite, skip_step
from diffrl.optimization import Optimization
from diffrl.prompt_order import prompts_for_step
from diffrl.report import write_report
from diffrl.run_folder import check_run_folder, check_steps_left, rewind_logs
from diffrl.sampler import SDSampler, scheduler_class
from diffrl.tracking import append_metrics, log_grid_to_trackers, mean_over_processes, start_trackers
from diffrl.trainers import REQUIRED_METRICS, section_name, trainer_entry
from rewards import load_reward

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class RunResult:
    output_dir: Path
    steps: int
    first_metrics: dict | None
    last_metrics: dict | None
    last_checkpoint: Path | None


def load_prompts(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"prompt file {str(path)!r} does not exist; give a text file with one prompt per line")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise UserInputError(f"prompt file {str(path)!r} holds no prompts")
    return prompts


@dataclass
class Run:
    """Everything built from a config, before the loop starts."""

    config: Config
    accelerator: Accelerator
    pipe: object
    sampler: SDSampler
    reward: object
    trainer: object
    state: TrainingState
    prompts: list[str]
    optimization: Optimization
    nonfinite_skips: int = 0   # steps undone so far for a NaN/inf (train.max_nonfinite_skips); saved in checkpoints


def check_environment(config: Config) -> None:
    """Settings whose validity depends on installed packages, refused before any model is loaded."""
    schedulers = [kind.value for kind in SchedulerType]
    if config.train.lr_scheduler not in schedulers:
        raise unknown_name("lr_scheduler", config.train.lr_scheduler, schedulers)
    if config.sample.scheduler is not None:
        scheduler_class(config.sample.scheduler)
    tracker = config.log.tracker
    available = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}
    if tracker in available and not available[tracker]():
        raise UserInputError(f"log.tracker is {tracker!r} but the {tracker} package is not installed; "
                             f"pip install {tracker}, or set log.tracker=none")


def build_run(config: Config, output_dir: Path) -> Run:
    """Model, LoRA, reward, sampler, optimiser and trainer from the config, on accelerate."""
    check_environment(config)
    accelerator = _fresh_accelerator(
        mixed_precision=config.train.mixed_precision,
        gradient_accumulation_steps=config.train.gradient_accumulation_steps,
        log_with=None if config.log.tracker == "none" else config.log.tracker,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "tensorboard")))
    check_distributed_type(accelerator.distributed_type)
    set_seed(config.train.seed, device_specific=True)  # seed + process index: each process draws its own noise
    prompts = load_prompts(config.prompts)
    config_class, trainer_class = trainer_entry(config.trainer)
    optimizer_steps = max(math.ceil(config.train.steps * trainer_class.optimizer_steps_per_step(config)), 1)
    reward = load_reward(config.reward, config.reward_weights)
    if isinstance(reward, torch.nn.Module):  # reward models run in the run's weight dtype; scores stay float32
        reward.requires_grad_(False).eval().to(accelerator.device, WEIGHT_DTYPES[config.train.mixed_precision])
    pipe, params = trainable_model(config, accelerator.device)
    sampler = SDSampler.from_config(pipe, config.sample, gradient_checkpointing=uses_gradient_checkpointing(config))
    optimization = _optimization(config.train, accelerator, sampler, params, optimizer_steps)
    section = getattr(config, section_name(config.trainer)) if config_class is not None else None
    trainer = trainer_class(section, sampler, reward, optimization, run_dir=output_dir)
    state = TrainingState(optimization.optimizer, optimization.lr_scheduler, trainer, optimization)
    return Run(config, accelerator, pipe, sampler, reward, trainer, state, prompts, optimization)


def trainable_model(config: Config, device) -> tuple[object, list[torch.nn.Parameter]]:
    """The run's pipeline with everything but a fresh LoRA on its denoiser frozen, and the LoRA's parameters."""
    train_config = config.train
    pipe = load_model(config.model, base_lora=config.base_lora, base_lora_scale=config.base_lora_scale,
                      vae=config.vae, vae_float32=train_config.vae_float32,
                      dtype=WEIGHT_DTYPES[train_config.mixed_precision], device=device)
    family = family_of(pipe)
    for frozen in family.frozen_modules():
        frozen.requires_grad_(False)
    set_attention(pipe, train_config.attention, device)
    params = _add_lora(family, train_config)
    if config.sample.vae_slicing:
        pipe.vae.enable_slicing()
    if train_config.compile:   # in place: the module, its parameter names and the LoRA file stay as they are
        family.denoiser.compile()
    return pipe, params


def _optimization(train_config, accelerator: Accelerator, sampler: SDSampler, params: list[torch.nn.Parameter],
                  optimizer_steps: int) -> Optimization:
    """AdamW and the LR schedule over the LoRA parameters, prepared by accelerate with the denoiser (DDP-wrapped
    in a multi-process run; the sampler's forward calls go through the wrapper)."""
    optimizer = torch.optim.AdamW(params, lr=train_config.learning_rate, weight_decay=train_config.weight_decay,
                                  betas=(train_config.adam_beta1, train_config.adam_beta2),
                                  eps=train_config.adam_epsilon)
    # accelerate's scheduler wrapper advances once per optimizer step and process, hence these units.
    lr_scheduler = get_scheduler(
        train_config.lr_scheduler, optimizer,
        num_warmup_steps=train_config.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=optimizer_steps * accelerator.num_processes)
    denoiser, optimizer, lr_scheduler = accelerator.prepare(sampler.network, optimizer, lr_scheduler)
    sampler.denoiser = denoiser
    return Optimization(accelerator, denoiser, optimizer, lr_scheduler, params, train_config.max_grad_norm)


def check_distributed_type(distributed_type: DistributedType) -> None:
    """LoRA training keeps the frozen UNet whole on each GPU; sharding it (FSDP, DeepSpeed ZeRO) would break the
    reference calls that run the UNet's inner module and the LoRA save that reads its parameters, so refuse it."""
    if distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        name = "FSDP" if distributed_type == DistributedType.FSDP else "DeepSpeed"
        raise UserInputError(f"{name} is not supported: diffrl trains LoRA adapters, whose weights and optimiser state "
                             "are small, so launch with plain multi-GPU (DDP) and save memory with "
                             "train.gradient_checkpointing and train.mixed_precision=bf16 (docs/multi_gpu.md)")


def uses_gradient_checkpointing(config: Config) -> bool:
    """train.gradient_checkpointing, or when unset the trainer's default: on where backward runs through a chain of
    UNet calls and the VAE (activations of K steps), off where each graph is one UNet call on a micro-batch the user
    sizes (recomputing it there costs a forward per backward for little memory)."""
    if config.train.gradient_checkpointing is not None:
        return config.train.gradient_checkpointing
    return trainer_entry(config.trainer)[1].backpropagates_through_sampling


def set_attention(pipe, attention: str, device: torch.device) -> None:
    """SDPA (torch's fused attention, diffusers' default processor) or xformers' memory-efficient kernels."""
    if attention == "sdpa":
        return
    if importlib.util.find_spec("xformers") is None:
        raise UserInputError("train.attention=xformers needs the xformers package (pip install xformers, matching "
                             "your torch and CUDA); or use train.attention=sdpa, the default")
    if torch.device(device).type != "cuda":
        raise UserInputError(f"train.attention=xformers runs only on a CUDA GPU and this run is on {device}; use "
                             "train.attention=sdpa, the default")
    pipe.enable_xformers_memory_efficient_attention()


def _add_lora(family, train_config) -> list[torch.nn.Parameter]:
    targets = train_config.lora_target_modules or family.lora_target_modules
    try:
        return family.add_lora(train_config.lora_rank, train_config.lora_alpha, targets)
    except NoLoraTargetError:
        raise UserInputError(f"train.lora_target_modules {list(targets)} match no module of the "
                             f"{type(family.denoiser).__name__}; use attention projection names such as "
                             f"{', '.join(family.lora_target_modules)}") from None


def _fresh_accelerator(**settings) -> Accelerator:
    """An Accelerator with these settings even if this process built one before (a notebook, tests, train then
    evaluate). accelerate keeps mixed precision and accumulation in process-wide singletons that refuse a change;
    they are cleared here, while the distributed state (PartialState, the process group) is kept. accelerate has no
    public reset (its own tests call these same _reset_state methods)."""
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    return Accelerator(**settings)


def train(config: Config, output_dir: str | Path, *, resume: bool = False, quiet: bool = False) -> RunResult:
    """Fine-tune per ``config``; writes the run folder of docs/contracts.md into ``output_dir``.

    Ctrl-C finishes the step in progress, saves it and raises TrainingInterrupted (diffrl.interruption)."""
    output_dir = Path(output_dir)
    check_run_folder(output_dir, resume=resume)
    run = build_run(config, output_dir)
    start = _resume(run, output_dir) if resume else 0
    check_steps_left(output_dir, start, config.train.steps)
    main = run.accelerator.is_main_process
    try:
        if main:
            output_dir.mkdir(parents=True, exist_ok=True)
            save_config(config, output_dir / "config.yaml")
            start_trackers(run.accelerator, config.log.tracker, config_to_dict(config), output_dir)
            if resume:   # rows and grids logged after the checkpoint (all of them without one) come again
                print(f"diffrl: {rewind_logs(output_dir, start)}", file=sys.stderr)
            if start == 0:
                write_grid(run, output_dir, 0)
            write_report(output_dir)
        result = _loop(run, output_dir, start, quiet or not main)
        if main:
            write_report(output_dir)
    finally:  # flush and close the tracker's files even when the run stops on an error
        run.accelerator.end_training()
    return result


def _resume(run: Run, output_dir: Path) -> int:
    """Load the newest checkpoint that loads, after cleaning up an interrupted save; returns its step."""
    accelerator = run.accelerator
    main = accelerator.is_main_process
    notes = recover_interrupted_saves(output_dir) if main else []
    accelerator.wait_for_everyone()  # the other processes list checkpoints only after the clean-up
    path, info, set_aside = load_latest_checkpoint(output_dir, run.sampler.family, run.state, set_aside=main,
                                                   process_index=accelerator.process_index)
    accelerator.wait_for_everyone()
    _check_same_checkpoint(accelerator, info["step"])
    saved_processes = info.get("num_processes", 1)
    if path is not None and saved_processes != accelerator.num_processes and main:
        notes.append(f"{path.name} was written by {saved_processes} process(es) and this run has "
                     f"{accelerator.num_processes}: training continues, but its random draws differ from the "
                     "uninterrupted run's")
    for note in notes + set_aside:
        print(f"diffrl: note: {note}", file=sys.stderr)
    run.nonfinite_skips = info.get("nonfinite_skips", 0)
    return info["step"]


def _check_same_checkpoint(accelerator: Accelerator, step: int) -> None:
    """A checkpoint whose files one process could read and another could not would split the run."""
    if accelerator.num_processes == 1:
        return
    steps = accelerator.gather(torch.tensor([step], device=accelerator.device)).tolist()
    if len(set(steps)) > 1:
        raise UserInputError(f"the processes resumed from different checkpoints (steps {steps}, by process); a "
                             "process-N file of the newest checkpoint is missing or corrupt: move that checkpoint "
                             "folder away and resume again")


def _loop(run: Run, output_dir: Path, start: int, quiet: bool) -> RunResult:
    last_checkpoint = (list_checkpoints(output_dir) or [None])[-1]
    steps = run.config.train.steps
    bar = tqdm(range(start, steps), initial=start, total=steps, disable=quiet, desc="train", dynamic_ncols=True)
    with StopRequests(enabled=run.accelerator.num_processes == 1) as stop, bar:
        try:
            return _steps(run, output_dir, bar, stop, last_checkpoint)
        except KeyboardInterrupt as interrupt:   # a second Ctrl-C, or one that was not deferred: the step is lost
            if isinstance(interrupt, TrainingInterrupted):
                raise
            raise _stopped_mid_step(run, output_dir, stop.step) from None


def _steps(run: Run, output_dir: Path, bar: tqdm, stop: StopRequests, last_checkpoint: Path | None) -> RunResult:
    config, accelerator = run.config, run.accelerator
    steps, log = config.train.steps, config.log
    first = last = None
    for step in bar:
        stop.step = done = step + 1
        prompts = prompts_for_step(run.prompts, step, config.sample.batch_size, config.train.seed,
                                   accelerator.process_index, accelerator.num_processes)
        undo = StepUndo(run.state, accelerator) if config.train.max_nonfinite_skips else None
        images_before, started = run.sampler.images_sampled, time.perf_counter()
        with accelerator.autocast():
            metrics = run.trainer.step(prompts)
        if missing := [name for name in REQUIRED_METRICS if name not in metrics]:
            raise TypeError(f"trainer {config.trainer!r} returned metrics without {', '.join(missing)} (the Trainer "
                            f"protocol: every step returns {', '.join(REQUIRED_METRICS)}); it returned {list(metrics)}")
        metrics = mean_over_processes(accelerator, {**metrics, **step_speed(
            time.perf_counter() - started, run.sampler.images_sampled - images_before, accelerator.num_processes)})
        if accelerator.scaler is not None:
            metrics["fp16_skipped_updates"] = float(fp16_skipped_updates(run.optimization, done, last_checkpoint))
        if bad := non_finite(metrics):
            metrics = skip_step(undo, metrics, bad, done, run.nonfinite_skips, config.train.max_nonfinite_skips,
                                last_checkpoint, main_process=accelerator.is_main_process)
            run.nonfinite_skips = metrics["nonfinite_skips"]
        else:
            metrics = {"step": done, **metrics, "lr": run.state.lr_scheduler.get_last_lr()[0]}
            first, last = first or metrics, metrics
            bar.set_postfix(reward=f"{metrics['reward_mean']:.4g}", loss=f"{metrics['loss']:.4g}")
        if accelerator.is_main_process and (done % log.every == 0 or done == steps or bad):
            append_metrics(output_dir / "metrics.jsonl", metrics)
            accelerator.log(metrics, step=done)
        grid_due, checkpoint_due = done % log.grid_every == 0, done % log.checkpoint_every == 0
        if grid_due or done == steps:
            write_grid(run, output_dir, done)
        if checkpoint_due or done == steps:
            last_checkpoint = _save(run, output_dir, done)
        if accelerator.is_main_process and (grid_due or checkpoint_due) and done < steps:
            write_report(output_dir)  # train() writes the last one, after the loop
        if stop.requested and done < steps:   # Ctrl-C during this step: it is complete now, save it and stop
            if not checkpoint_due:
                last_checkpoint = _save(run, output_dir, done)
            bar.update()   # the bar counts a step when the next one starts, which none will
            raise TrainingInterrupted(output_dir, last_checkpoint, saved=True, step_in_progress=done)
    return RunResult(output_dir, steps, first, last, last_checkpoint)


def step_speed(seconds: float, images: int, num_processes: int) -> dict[str, float]:
    """Wall-clock seconds of the trainer's step, and the images the sampler generated in it per second; each process
    reports its own images times the process count, so the mean over processes is the run's total rate."""
    return {"step_seconds": seconds, "samples_per_second": images * num_processes / seconds if seconds > 0 else 0.0}


def _stopped_mid_step(run: Run, output_dir: Path, step: int) -> TrainingInterrupted:
    """The run stopped inside a step: nothing of that step is saved. A checkpoint save it cut short is cleaned up as
    at resume (its temporary folder removed, a checkpoint moved aside put back), so the newest complete checkpoint is
    the one named."""
    if run.accelerator.is_main_process:
        recover_interrupted_saves(output_dir)
    latest = (list_checkpoints(output_dir) or [None])[-1]
    return TrainingInterrupted(output_dir, latest, saved=False, step_in_progress=step)


def _save(run: Run, output_dir: Path, step: int) -> Path:
    accelerator = run.accelerator
    accelerator.wait_for_everyone()
    path = output_dir / "checkpoints" / checkpoint_name(step)
    processes = Processes(accelerator.process_index, accelerator.num_processes, accelerator.wait_for_everyone)
    save_checkpoint(output_dir, step, run.sampler.family, run.state,
                    info={"nonfinite_skips": run.nonfinite_skips}, processes=processes)
    if accelerator.is_main_process:
        prune_checkpoints(output_dir, run.config.log.keep_last)
    accelerator.wait_for_everyone()
    return path


@torch.no_grad()
def write_grid(run: Run, output_dir: Path, step: int) -> Path | None:
    """Fixed prompts x fixed seeds, captioned with prompt and reward; identical initial noise at every step."""
    if not run.accelerator.is_main_process:
        return None
    seeds = run.config.log.grid_seeds
    prompts = [prompt for prompt in run.prompts[: run.config.log.grid_prompts] for _ in seeds]
    latents = torch.cat([run.sampler.initial_latents(1, torch.Generator(run.sampler.device).manual_seed(seed))
                         for seed in seeds] * (len(prompts) // len(seeds)))
    with run.accelerator.autocast(), run.sampler.guidance(run.config.sample.eval_guidance_scale):
        traj = run.sampler.sample(prompts, initial_latents=latents,
                                  generator=torch.Generator(run.sampler.device).manual_seed(seeds[0]))
        rewards = run.reward(traj.images, prompts).float().tolist()
    captions = [f"{prompt} | seed {seed} | r={value:.3g}"
                for prompt, seed, value in zip(prompts, seeds * len(prompts), rewards)]
    grid = image_grid(traj.images, captions, columns=len(run.config.log.grid_seeds),
                      title=f"{run.config.model} step {step}")
    path = output_dir / "grids" / f"{checkpoint_name(step)}.png"
    save_image_atomic(grid, path)
    log_grid_to_trackers(run.accelerator, grid, step)
    return path
