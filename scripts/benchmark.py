"""Benchmark diffrl's sampling and every trainer's step against plain diffusers, in one process, on the same settings.

1. SDSampler (eta = 0, no grad) vs ``pipe(..., eta=0, output_type="pt")`` on the same latents, batch, steps and CFG
   (target: sampler / pipeline <= 1.05). On a flow-matching model (SD3, FLUX, Z-Image) both sample the ODE.
2. Per trainer (``build_run`` with reward=brightness and the trainer's defaults):
   - draft: one DRaFT-1 step vs sampling the same batch without grad (target <= 1.3);
   - ddpo, loop: the training pass over a stored rollout (one CFG UNet call per step, plus backward) vs the rollout
     itself (target <= 2); LOOP rolls out batch/2 prompts x 2 samples, so both roll out the same batch;
   - dpok, adjoint_matching: one whole step vs sampling the batch without grad (reported, no target).
   On a flow-matching model the likelihood trainers sample Flow-GRPO's SDE and Adjoint Matching the memoryless one
   (FLOW_SETTINGS).
3. Peak memory of each contender: CPU max RSS and, on CUDA, torch.cuda.max_memory_allocated.
4. Host-device reads inside the loops (--profile): torch.profiler counts the ops that copy a value to the host
   (aten::_local_scalar_dense, i.e. .item()/float()/bool() of a tensor; on CUDA also cudaStreamSynchronize and
   cudaDeviceSynchronize) in sampling and in the DDPO training pass, at --steps and at 2 x --steps: a loop without
   per-step reads has the same count at both.

Each contender runs once untimed (that run gives its peak memory), then --repeats timed runs alternating A B A B so
that drift hits both; the median is reported. Prints a table and writes every number to --json.

    python scripts/benchmark.py                                  # tiny model on CPU, about a minute
    python scripts/benchmark.py --model sd15-random --resolution 128 --steps 10 --batch-size 2
    python scripts/benchmark.py --model sd15-random --device cuda --dtype bf16 --batch-size 4 --steps 50
    python scripts/benchmark.py --model sd35-medium-random --device cuda --dtype bf16 --resolution 512 --steps 28
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a plain script from a checkout
    sys.path.insert(0, str(REPO_ROOT))

PROMPT_FILE = REPO_ROOT / "assets" / "prompts" / "simple.txt"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MIXED_PRECISION = {"fp32": "no", "fp16": "fp16", "bf16": "bf16"}
CHECKPOINTING = {"auto": "null", "on": "true", "off": "false"}
TARGETS = {"sampler_over_pipeline": 1.05, "draft_step_over_sample": 1.3, "ddpo_train_over_rollout": 2.0,
           "loop_train_over_rollout": 2.0}
TRAINERS = ("draft", "ddpo", "loop", "dpok", "adjoint_matching")
# Per trainer: its sampler settings and the two contenders (numerator / denominator of its ratio).
TRAINER_SETTINGS = {
    "draft": (["draft.k=1", "sample.eta=0.0"], ("step", "sample_no_grad")),
    "ddpo": (["sample.eta=1.0"], ("train_pass", "rollout")),
    "loop": (["sample.eta=1.0", "loop.samples_per_prompt=2"], ("train_pass", "rollout")),
    "dpok": (["sample.eta=1.0", "dpok.p_step=1"], ("step", "sample_no_grad")),
    "adjoint_matching": (["sample.eta=1.0"], ("step", "sample_no_grad")),
}
# The same comparisons on a flow-matching model (SD3, FLUX, Z-Image): the ODE for DRaFT, Flow-GRPO's SDE for the
# likelihood trainers, the memoryless flow SDE (a = √2) for Adjoint Matching.
FLOW_SETTINGS = {
    "draft": ["draft.k=1"],
    "ddpo": ["sample.scheduler=flow_sde"],
    "loop": ["sample.scheduler=flow_sde", "loop.samples_per_prompt=2"],
    "dpok": ["sample.scheduler=flow_sde", "dpok.p_step=1"],
    "adjoint_matching": ["sample.scheduler=flow_sde", f"sample.noise_level={2 ** 0.5}"],
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="tiny, sd15-random, a hub id or a local path")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32",
                        help="pipeline weights for the sampling phase; train.mixed_precision for the DRaFT step")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps")
    parser.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    parser.add_argument("--resolution", type=int, default=None, help="image side in pixels (default: the model's)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per contender (median reported)")
    parser.add_argument("--trainers", default=",".join(TRAINERS), help="comma-separated subset of " + ",".join(TRAINERS))
    parser.add_argument("--gradient-checkpointing", choices=["auto", "on", "off"], default="auto",
                        help="train.gradient_checkpointing of the trainers' runs (auto: each trainer's default)")
    parser.add_argument("--profile", action="store_true", help="also count host-device reads inside the loops")
    parser.add_argument("--scaling", action="store_true",
                        help="instead: DRaFT step and no-grad sampling time and memory as batch size, steps and K grow")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's; 1 gives steadier timings on a shared machine)")
    parser.add_argument("--json", type=Path, default=Path("benchmark.json"), help="where to write the numbers")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device")
    if args.device == "cpu" and args.dtype == "fp16":
        parser.error("--dtype fp16 needs --device cuda (accelerate has no fp16 autocast on CPU); use bf16 or fp32")
    if min(args.batch_size, args.steps, args.repeats) < 1:
        parser.error("--batch-size, --steps and --repeats must be at least 1")
    args.trainers = [name.strip() for name in args.trainers.split(",") if name.strip()]
    unknown = [name for name in args.trainers if name not in TRAINERS]
    if unknown:
        parser.error(f"unknown trainer(s) {', '.join(unknown)}; choose from {', '.join(TRAINERS)}")
    if "loop" in args.trainers and args.batch_size % 2 and not args.scaling:
        parser.error("LOOP rolls out batch/2 prompts x 2 samples: --batch-size must be even")
    return args


# ---- timing and memory --------------------------------------------------------------------------------------------

def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: str) -> float:
    """Wall-clock seconds of one call, with the accelerator drained before and after."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def reset_peaks(device: str) -> bool:
    """Start a new peak-memory window; returns whether the CPU max RSS could be reset (Linux only)."""
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with contextlib.suppress(OSError, AttributeError):   # glibc: hand freed heap back, so reuse shows as growth
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:  # "5" resets the RSS high-water mark that getrusage's ru_maxrss reports
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peaks(device: str, rss_was_reset: bool) -> dict[str, float | bool]:
    """Peak memory since the last reset_peaks, in MiB (RSS is the process-wide peak when it could not be reset)."""
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if sys.platform == "darwin":  # bytes there, KiB on Linux
        kib /= 1024
    result = {"cpu_max_rss_mib": kib / 1024, "cpu_rss_is_phase_peak": rss_was_reset}
    if device == "cuda":
        result["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def current_rss_mib() -> float | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    return None


def measured(fn: Callable[[], object], device: str) -> dict[str, float | bool]:
    """Run ``fn`` once untimed (warmup) and return its peak memory, also as the growth over what was held before."""
    was_reset = reset_peaks(device)
    rss_before = current_rss_mib()
    cuda_before = torch.cuda.memory_allocated() if device == "cuda" else 0
    fn()
    _sync(device)
    result = peaks(device, was_reset)
    if was_reset and rss_before is not None:
        result["cpu_rss_growth_mib"] = result["cpu_max_rss_mib"] - rss_before
    if device == "cuda":
        result["cuda_growth_mib"] = result["cuda_max_allocated_mib"] - cuda_before / 2**20
    return result


def compare(contenders: dict[str, Callable[[], object]], batch_size: int, repeats: int, device: str) -> dict:
    """Warm up each contender (measuring its memory), then time them alternately; per-contender summaries."""
    memory = {name: measured(fn, device) for name, fn in contenders.items()}
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            times[name].append(timed(fn, device))
    summary = {}
    for name in contenders:
        median = statistics.median(times[name])
        summary[name] = {"seconds_per_batch": median, "images_per_second": batch_size / median,
                         "seconds": times[name], "memory": memory[name]}
    return summary


# ---- the two comparisons ------------------------------------------------------------------------------------------

def benchmark_sampling(args: argparse.Namespace, prompts: list[str]) -> dict:
    """SDSampler vs the diffusers pipeline's own __call__ on the same pipeline, latents and settings."""
    from diffrl.models import load_pipeline
    from diffrl.sampler import SDSampler

    was_reset = reset_peaks(args.device)
    pipe = load_pipeline(args.model, dtype=DTYPES[args.dtype], device=args.device)
    load_memory = peaks(args.device, was_reset)
    sampler = SDSampler(pipe, args.steps, args.guidance, eta=0.0, resolution=args.resolution)
    generator = torch.Generator(sampler.device).manual_seed(0)
    latents = sampler.initial_latents(len(prompts), generator)
    size = sampler.resolution
    outputs = {}

    def run_sampler():
        with torch.no_grad():
            outputs["sampler"] = sampler.sample(prompts, initial_latents=latents).images

    pipeline_kwargs = pipeline_call_settings(pipe, sampler, args.guidance)

    def run_pipeline():
        outputs["pipeline"] = pipe(prompts, latents=latents, num_inference_steps=args.steps, height=size, width=size,
                                   output_type="pt", **pipeline_kwargs).images

    result = compare({"sampler": run_sampler, "pipeline": run_pipeline}, len(prompts), args.repeats, args.device)
    result["load_pipeline"] = {"memory": load_memory}
    result["resolution"] = size
    result["family"] = sampler.family.name
    args.flow_model = sampler.is_flow_model   # the trainers' sampler settings follow it
    result["max_abs_image_diff"] = (outputs["sampler"].float() - outputs["pipeline"].float()).abs().max().item()
    del pipe, sampler, outputs
    return result


def pipeline_call_settings(pipe, sampler, guidance: float) -> dict:
    """The pipeline arguments that match the sampler's deterministic sampling: DDIM's eta = 0 where the pipeline takes
    one (SD, SDXL; flow pipelines are deterministic), and the guidance in the pipeline's own convention (Z-Image's
    guidance_scale is diffrl's minus 1: see diffrl.families.z_image)."""
    import inspect

    settings = {"guidance_scale": guidance - 1.0 if sampler.family.name == "zimage" else guidance}
    if "eta" in inspect.signature(pipe.__call__).parameters:
        settings["eta"] = 0.0
    return settings


def trainer_overrides(args: argparse.Namespace, trainer: str) -> list[str]:
    resolution = "null" if args.resolution is None else args.resolution
    prompts_per_step = args.batch_size // 2 if trainer == "loop" else args.batch_size
    return [f"model={args.model}", f"trainer={trainer}", "reward=brightness", f"prompts={PROMPT_FILE}",
            f"sample.num_steps={args.steps}", f"sample.guidance_scale={args.guidance}",
            f"sample.batch_size={prompts_per_step}", f"sample.resolution={resolution}",
            f"train.mixed_precision={MIXED_PRECISION[args.dtype]}",
            f"train.gradient_checkpointing={CHECKPOINTING[args.gradient_checkpointing]}",
            *(FLOW_SETTINGS[trainer] if getattr(args, "flow_model", False) else TRAINER_SETTINGS[trainer][0]),
            *fitted_to_steps(trainer, args.steps)]


def fitted_to_steps(trainer: str, steps: int) -> list[str]:
    """Adjoint Matching regresses on num_loss_timesteps of the steps: at most all of them in a short benchmark."""
    if trainer != "adjoint_matching":
        return []
    from diffrl.trainers.adjoint_matching import AdjointMatchingConfig

    return [f"adjoint_matching.num_loss_timesteps={min(AdjointMatchingConfig().num_loss_timesteps, steps)}"]


@contextlib.contextmanager
def accelerate_device(device: str):
    """Keep accelerate on the CPU when asked to, even on a machine with a GPU."""
    old = os.environ.get("ACCELERATE_USE_CPU")
    if device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "true"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("ACCELERATE_USE_CPU", None)
        else:
            os.environ["ACCELERATE_USE_CPU"] = old


def build_benchmark_run(args: argparse.Namespace, trainer: str, overrides: list[str] = ()):
    from diffrl.config import load_config
    from diffrl.training import build_run

    config = load_config(None, [*trainer_overrides(args, trainer), *overrides])
    with tempfile.TemporaryDirectory() as output_dir, accelerate_device(args.device):
        was_reset = reset_peaks(args.device)
        run = build_run(config, Path(output_dir))
        build_memory = peaks(args.device, was_reset)
    if run.accelerator.device.type != args.device:
        raise RuntimeError(f"accelerate placed the run on {run.accelerator.device}, not {args.device}")
    return run, build_memory


def trainer_contenders(run, trainer: str, prompts: list[str]) -> dict[str, Callable[[], object]]:
    """The two contenders of a trainer's ratio, both under the run's autocast, as the training loop runs them."""
    from diffrl.trainers.ppo import rollout, train_on_rollout

    autocast = run.accelerator.autocast
    if trainer in ("ddpo", "loop"):
        if trainer == "loop":   # batch/2 prompts x k = 2 samples: the same number of trajectories as DDPO's
            prompts = [prompt for prompt in prompts[:len(prompts) // 2] for _ in range(2)]
        stored, advantages = {}, torch.randn(len(prompts), generator=torch.Generator().manual_seed(0))

        def do_rollout():
            with autocast():
                stored["traj"], _, _ = rollout(run.sampler, run.reward, prompts)

        def train_pass():
            with autocast():
                train_on_rollout(stored["traj"], advantages.to(run.sampler.device), sampler=run.sampler,
                                 optimization=run.optimization, config=run.trainer.config,
                                 generator=run.trainer.generator)

        return {"rollout": do_rollout, "train_pass": train_pass}   # the rollout first: it stores the trajectory

    def step():
        with autocast():
            run.trainer.step(prompts)

    def sample_no_grad():
        with torch.no_grad(), autocast():
            run.sampler.sample(prompts)

    return {"step": step, "sample_no_grad": sample_no_grad}


def benchmark_trainer(args: argparse.Namespace, trainer: str, prompts: list[str]) -> dict:
    """One trainer's two contenders timed side by side; the ratio numerator / denominator."""
    run, build_memory = build_benchmark_run(args, trainer)
    result = compare(trainer_contenders(run, trainer, prompts), len(prompts), args.repeats, args.device)
    numerator, denominator = TRAINER_SETTINGS[trainer][1]
    result["ratio"] = result[numerator]["seconds_per_batch"] / result[denominator]["seconds_per_batch"]
    result["build_run"] = {"memory": build_memory}
    del run
    return result


# ---- host-device reads --------------------------------------------------------------------------------------------

HOST_READ_EVENTS = ("aten::_local_scalar_dense", "cudaStreamSynchronize", "cudaDeviceSynchronize")


def host_reads(fn: Callable[[], object], device: str) -> int:
    """How many times ``fn`` reads a device value on the host (see HOST_READ_EVENTS), by torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
    return sum(1 for event in prof.events() if event.name in HOST_READ_EVENTS)


def profile_host_reads(args: argparse.Namespace, prompts: list[str]) -> dict:
    """Host reads of sampling and of DDPO's training pass at --steps and 2 x --steps: equal counts mean no read
    inside the per-step loops (what remains happens once per call, e.g. per optimiser step)."""
    counts: dict[str, dict[str, int]] = {"sample": {}, "ddpo_train_pass": {}}
    for steps in (args.steps, 2 * args.steps):
        run, _ = build_benchmark_run(args, "ddpo", [f"sample.num_steps={steps}"])
        contenders = trainer_contenders(run, "ddpo", prompts)
        contenders["rollout"]()      # warm-up, and the trajectory that the training pass reads
        contenders["train_pass"]()

        def sample():
            with torch.no_grad(), run.accelerator.autocast():
                run.sampler.sample(prompts)

        counts["sample"][str(steps)] = host_reads(sample, args.device)
        counts["ddpo_train_pass"][str(steps)] = host_reads(contenders["train_pass"], args.device)
        del run
    return {name: {"reads": by_steps, "per_step_reads": (by_steps[str(2 * args.steps)] - by_steps[str(args.steps)])
                   / args.steps} for name, by_steps in counts.items()}


# ---- scaling ------------------------------------------------------------------------------------------------------

SCALING_SWEEPS = {"batch_size": (1, 2, 4, 8), "steps": (5, 10, 20, 40), "k": (1, 2, 5, 10)}


def scaling(args: argparse.Namespace, prompt_list: list[str]) -> list[dict]:
    """One row per swept value (the others at --batch-size, --steps and K = 1): DRaFT-K step and no-grad sampling,
    seconds and peak memory, each relative to the sweep's first row."""
    rows = []
    for knob, values in SCALING_SWEEPS.items():
        first = None
        for value in values:
            batch = value if knob == "batch_size" else args.batch_size
            steps = value if knob == "steps" else args.steps
            k = value if knob == "k" else 1
            if k > steps:
                continue
            point = argparse.Namespace(**{**vars(args), "batch_size": batch, "steps": steps})
            run, _ = build_benchmark_run(point, "draft", [f"draft.k={k}"])
            prompts = [prompt_list[i % len(prompt_list)] for i in range(batch)]
            result = compare(trainer_contenders(run, "draft", prompts), batch, args.repeats, args.device)
            del run
            row = {"knob": knob, "value": value, "batch_size": batch, "steps": steps, "k": k,
                   **{f"{name}_seconds": result[name]["seconds_per_batch"] for name in ("step", "sample_no_grad")},
                   **{f"{name}_peak_mib": peak_mib(result[name]["memory"]) for name in ("step", "sample_no_grad")}}
            first = first or row
            for name in ("step_seconds", "sample_no_grad_seconds", "step_peak_mib", "sample_no_grad_peak_mib"):
                row[f"{name}_relative"] = row[name] / first[name]
            rows.append(row)
    return rows


def peak_mib(memory: dict) -> float:
    """What one call adds at its peak to the memory already held (CUDA allocations, else CPU RSS)."""
    return memory.get("cuda_growth_mib", memory.get("cpu_rss_growth_mib", memory["cpu_max_rss_mib"]))


def scaling_table(rows: list[dict]) -> str:
    header = ("sweep", "batch", "steps", "K", "DRaFT step s", "x", "sample s", "x", "step +MiB", "x",
              "sample +MiB", "x")
    lines = [header]
    for row in rows:
        lines.append((row["knob"], str(row["batch_size"]), str(row["steps"]), str(row["k"]),
                      f"{row['step_seconds']:.3f}", f"{row['step_seconds_relative']:.2f}",
                      f"{row['sample_no_grad_seconds']:.3f}", f"{row['sample_no_grad_seconds_relative']:.2f}",
                      f"{row['step_peak_mib']:.0f}", f"{row['step_peak_mib_relative']:.2f}",
                      f"{row['sample_no_grad_peak_mib']:.0f}", f"{row['sample_no_grad_peak_mib_relative']:.2f}"))
    markdown = ["| " + " | ".join(cells) + " |" for cells in lines]
    return "\n".join([markdown[0], "|" + "---|" * len(header), *markdown[1:]])


# ---- report -------------------------------------------------------------------------------------------------------

def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def settings(args: argparse.Namespace, resolution: int) -> dict:
    import diffusers

    return {"model": args.model, "device": args.device, "device_name": device_name(args.device),
            "dtype": args.dtype, "mixed_precision": MIXED_PRECISION[args.dtype], "batch_size": args.batch_size,
            "steps": args.steps, "guidance_scale": args.guidance, "eta": 0.0, "resolution": resolution,
            "repeats": args.repeats, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "python": platform.python_version(), "cpu_threads": torch.get_num_threads()}


def table(report: dict) -> str:
    """Aligned rows: each contender's speed and peak memory over what was held before it, then every ratio."""
    header = ("phase", "contender", "s/batch", "images/s", "RSS +MiB", "CUDA +MiB")
    rows = [header]
    phases = [("sampling", report["sampling"], ("sampler", "pipeline"))]
    phases += [(name, result, TRAINER_SETTINGS[name][1]) for name, result in report["trainers"].items()]
    for phase, result, names in phases:
        for name in names:
            entry = result[name]
            memory = entry["memory"]
            cuda, rss = memory.get("cuda_growth_mib"), memory.get("cpu_rss_growth_mib")
            rows.append((phase, name, f"{entry['seconds_per_batch']:.4f}", f"{entry['images_per_second']:.2f}",
                         "-" if rss is None else f"{rss:.0f}", "-" if cuda is None else f"{cuda:.0f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    for name, value in report["ratios"].items():
        target = TARGETS.get(name)
        verdict = "no target" if target is None else f"target <= {target}: " + (
            "ok" if value <= target else "ABOVE TARGET")
        lines.append(f"ratio {name:<34} {value:6.3f}   ({verdict})")
    for name, entry in report.get("host_reads", {}).items():
        lines.append(f"host reads in {name}: {entry['reads']} (by number of steps), {entry['per_step_reads']:g} "
                     "per extra step")
    s = report["settings"]
    title = (f"{s['model']} on {s['device']} ({s['device_name']}), {s['dtype']}, batch {s['batch_size']}, "
             f"{s['steps']} steps, CFG {s['guidance_scale']}, {s['resolution']} px, gradient checkpointing "
             f"{s['gradient_checkpointing']}, median of {s['repeats']}")
    return "\n".join([title, *lines])


def ratio_name(trainer: str) -> str:
    numerator, denominator = TRAINER_SETTINGS[trainer][1]
    short = {"step": "step", "train_pass": "train", "sample_no_grad": "sample", "rollout": "rollout"}
    return f"{trainer}_{short[numerator]}_over_{short[denominator]}"


def write_scaling(args: argparse.Namespace, prompt_list: list[str]) -> dict:
    report = {"settings": {**settings(args, args.resolution), "gradient_checkpointing": args.gradient_checkpointing},
              "scaling": scaling(args, prompt_list)}
    print(scaling_table(report["scaling"]))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.json}")
    return report


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from diffrl.training import load_prompts

    prompt_list = load_prompts(PROMPT_FILE)
    prompts = [prompt_list[i % len(prompt_list)] for i in range(args.batch_size)]
    if args.scaling:
        return write_scaling(args, prompt_list)
    sampling = benchmark_sampling(args, prompts)
    trainers = {name: benchmark_trainer(args, name, prompts) for name in args.trainers}
    ratios = {"sampler_over_pipeline": sampling["sampler"]["seconds_per_batch"]
              / sampling["pipeline"]["seconds_per_batch"]}
    ratios.update({ratio_name(name): result["ratio"] for name, result in trainers.items()})
    report = {"settings": {**settings(args, sampling["resolution"]), "trainers": args.trainers,
                           "gradient_checkpointing": args.gradient_checkpointing},
              "ratios": ratios, "targets": TARGETS, "sampling": sampling, "trainers": trainers}
    if args.profile:
        report["host_reads"] = profile_host_reads(args, prompts)
    print(table(report))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main()
