"""Benchmark diffrl's sampling and DRaFT training against plain diffusers, in one process and on the same settings.

1. SDSampler (eta = 0, no grad) vs ``pipe(..., eta=0, output_type="pt")`` on the same latents, batch, steps and CFG
   (target: sampler / pipeline <= 1.05).
2. One DRaFT-1 training step (``build_run`` with trainer=draft, draft.k=1, reward=brightness) vs sampling the same
   batch without grad (target: step / sample <= 1.3).
3. Peak memory of each phase: CPU max RSS and, on CUDA, torch.cuda.max_memory_allocated.

Each contender runs once untimed (that run gives its peak memory), then --repeats timed runs alternating A B A B so
that drift hits both; the median is reported. Prints a table and writes every number to --json.

    python scripts/benchmark.py                                  # tiny model on CPU, well under a minute
    python scripts/benchmark.py --model sd15-random --device cuda --dtype fp16 --batch-size 4 --steps 50
"""

from __future__ import annotations

import argparse
import contextlib
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
TARGETS = {"sampler_over_pipeline": 1.05, "draft_step_over_sample": 1.3}


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


def measured(fn: Callable[[], object], device: str) -> dict[str, float | bool]:
    """Run ``fn`` once untimed (warmup) and return its peak memory."""
    was_reset = reset_peaks(device)
    fn()
    _sync(device)
    return peaks(device, was_reset)


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

    def run_pipeline():
        outputs["pipeline"] = pipe(prompts, latents=latents, num_inference_steps=args.steps, eta=0.0, height=size,
                                   width=size, guidance_scale=args.guidance, output_type="pt").images

    result = compare({"sampler": run_sampler, "pipeline": run_pipeline}, len(prompts), args.repeats, args.device)
    result["load_pipeline"] = {"memory": load_memory}
    result["resolution"] = size
    result["max_abs_image_diff"] = (outputs["sampler"].float() - outputs["pipeline"].float()).abs().max().item()
    del pipe, sampler, outputs
    return result


def draft_overrides(args: argparse.Namespace) -> list[str]:
    resolution = "null" if args.resolution is None else args.resolution
    return [f"model={args.model}", "trainer=draft", "draft.k=1", "reward=brightness", f"prompts={PROMPT_FILE}",
            f"sample.num_steps={args.steps}", f"sample.guidance_scale={args.guidance}", "sample.eta=0.0",
            f"sample.batch_size={args.batch_size}", f"sample.resolution={resolution}",
            f"train.mixed_precision={MIXED_PRECISION[args.dtype]}"]


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


def benchmark_draft(args: argparse.Namespace, prompts: list[str]) -> dict:
    """One DRaFT-1 trainer step vs a no-grad sample of the same batch, both under the run's autocast."""
    from diffrl.config import load_config
    from diffrl.training import build_run

    config = load_config(None, draft_overrides(args))
    with tempfile.TemporaryDirectory() as output_dir, accelerate_device(args.device):
        was_reset = reset_peaks(args.device)
        run = build_run(config, Path(output_dir))
        build_memory = peaks(args.device, was_reset)
    if run.accelerator.device.type != args.device:
        raise RuntimeError(f"accelerate placed the run on {run.accelerator.device}, not {args.device}")

    def draft_step():
        with run.accelerator.autocast():
            run.trainer.step(prompts)

    def sample_no_grad():
        with torch.no_grad(), run.accelerator.autocast():
            run.sampler.sample(prompts)

    result = compare({"draft_step": draft_step, "sample_no_grad": sample_no_grad}, len(prompts), args.repeats,
                     args.device)
    result["build_run"] = {"memory": build_memory}
    del run
    return result


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
    """Aligned rows: each contender's speed and memory, then the two ratios against their targets."""
    header = ("phase", "contender", "s/batch", "images/s", "peak RSS MiB", "peak CUDA MiB")
    rows = [header]
    for phase, names in (("sampling", ("sampler", "pipeline")), ("training", ("draft_step", "sample_no_grad"))):
        for name in names:
            entry = report[phase][name]
            cuda = entry["memory"].get("cuda_max_allocated_mib")
            rows.append((phase, name, f"{entry['seconds_per_batch']:.4f}", f"{entry['images_per_second']:.2f}",
                         f"{entry['memory']['cpu_max_rss_mib']:.0f}", "-" if cuda is None else f"{cuda:.0f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    for name, value in report["ratios"].items():
        verdict = "ok" if value <= TARGETS[name] else "ABOVE TARGET"
        lines.append(f"ratio {name:<24} {value:6.3f}   (target <= {TARGETS[name]}: {verdict})")
    s = report["settings"]
    title = (f"{s['model']} on {s['device']} ({s['device_name']}), {s['dtype']}, batch {s['batch_size']}, "
             f"{s['steps']} steps, CFG {s['guidance_scale']}, {s['resolution']} px, median of {s['repeats']}")
    return "\n".join([title, *lines])


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from diffrl.training import load_prompts

    prompt_list = load_prompts(PROMPT_FILE)
    prompts = [prompt_list[i % len(prompt_list)] for i in range(args.batch_size)]
    sampling = benchmark_sampling(args, prompts)
    training = benchmark_draft(args, prompts)
    report = {
        "settings": settings(args, sampling["resolution"]),
        "ratios": {
            "sampler_over_pipeline": sampling["sampler"]["seconds_per_batch"]
            / sampling["pipeline"]["seconds_per_batch"],
            "draft_step_over_sample": training["draft_step"]["seconds_per_batch"]
            / training["sample_no_grad"]["seconds_per_batch"]},
        "targets": TARGETS, "sampling": sampling, "training": training}
    print(table(report))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main()
