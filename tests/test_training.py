"""The shared loop: run folder layout, prompt schedule, exact resume, atomic checkpoints, NaN guard."""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import pytest
import torch
import yaml
from PIL import Image

from diffrl.checkpoint import list_checkpoints
from diffrl.config import config_to_dict
from diffrl.errors import NonFiniteError, UserInputError
from diffrl.models import build_tiny_pipeline
from diffrl.tracking import flat_config, log_grid_to_trackers
from diffrl.training import build_run, load_prompts, prompts_for_step, train
from tests.fixtures import NanRewardBase, assert_same_gradients, fast_config

SHORT = ["train.steps=3", "log.checkpoint_every=2", "log.grid_every=2", "sample.num_steps=2", "sample.batch_size=2"]


def test_prompt_schedule_covers_every_prompt_each_epoch_and_splits_processes():
    prompts = [f"p{i}" for i in range(6)]
    epoch = sum((prompts_for_step(prompts, step, 2, seed=3) for step in range(3)), [])
    assert sorted(epoch) == prompts
    assert prompts_for_step(prompts, 1, 2, seed=3) == prompts_for_step(prompts, 1, 2, seed=3)
    assert epoch != sum((prompts_for_step(prompts, step, 2, seed=4) for step in range(3)), [])
    ranks = [prompts_for_step(prompts, 0, 3, seed=0, rank=r, world_size=2) for r in range(2)]
    assert sorted(ranks[0] + ranks[1]) == prompts
    assert len(prompts_for_step(["only"], 5, 4, seed=0)) == 4  # fewer prompts than the batch: repeats


def test_run_folder_layout(tmp_path):
    result = train(fast_config(*SHORT), tmp_path, quiet=True)
    assert (tmp_path / "config.yaml").is_file()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3]
    assert {"reward_mean", "loss", "lr", "step_seconds", "samples_per_second"} <= rows[0].keys()
    for row in rows:   # DRaFT samples each step's batch of 2 once
        assert row["step_seconds"] > 0 and row["samples_per_second"] * row["step_seconds"] == pytest.approx(2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000002", "step-000003"]
    assert result.last_checkpoint == tmp_path / "checkpoints" / "step-000003"
    for name in ("step-000000", "step-000002", "step-000003"):
        assert Image.open(tmp_path / "grids" / f"{name}.png").size[0] >= 2 * 128
    plain = build_tiny_pipeline()
    plain.load_lora_weights(tmp_path / "checkpoints" / "step-000003")  # loads in plain diffusers


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path):
    overrides = [*SHORT, "train.steps=4", "draft.truncation=uniform", "draft.truncation_min=48",
                 "draft.truncation_max=50", "train.learning_rate=1.0e-2"]
    train(fast_config(*overrides), tmp_path / "straight", quiet=True)
    train(fast_config(*overrides, "train.steps=2"), tmp_path / "resumed", quiet=True)
    with open(tmp_path / "resumed" / "metrics.jsonl", "a") as log:  # logged after the checkpoint, then a crash
        log.write('{"step": 3, "reward_mean": 0.0, "loss": 0.0}\n')
    train(fast_config(*overrides), tmp_path / "resumed", quiet=True, resume=True)
    straight = tmp_path / "straight" / "checkpoints" / "step-000004" / "pytorch_lora_weights.safetensors"
    resumed = tmp_path / "resumed" / "checkpoints" / "step-000004" / "pytorch_lora_weights.safetensors"
    from safetensors.torch import load_file

    a, b = load_file(straight), load_file(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    metrics = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in metrics] == [1, 2, 3, 4]


def test_resume_without_a_checkpoint_starts_over_with_one_row_per_step(tmp_path, capsys):
    logged = [{"step": step, "reward_mean": 0.0, "loss": 0.0} for step in (1, 2, 3)]   # then killed: no checkpoint
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in logged))
    (tmp_path / "grids").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "grids" / "step-000003.png")
    train(fast_config(*SHORT, "train.steps=2"), tmp_path, quiet=True, resume=True)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2] and all(row["reward_mean"] > 0 for row in rows)
    assert sorted(path.name for path in (tmp_path / "grids").iterdir()) == ["step-000000.png", "step-000002.png"]
    assert (f"diffrl: no checkpoint in {tmp_path / 'checkpoints'}: starting the run over from step 0; dropped the 3 "
            "metrics rows logged without one") in capsys.readouterr().err


def test_existing_run_is_not_overwritten_without_resume_nor_resumed_past_its_end(tmp_path):
    train(fast_config(*SHORT, "train.steps=2"), tmp_path, quiet=True)
    with pytest.raises(UserInputError, match="--resume"):
        train(fast_config(*SHORT), tmp_path, quiet=True)
    with pytest.raises(UserInputError, match=f"^nothing to resume in {tmp_path}: its latest checkpoint, step-000002, "
                                             "already reaches train.steps=2; pass a larger train.steps"):
        train(fast_config(*SHORT, "train.steps=2"), tmp_path, quiet=True, resume=True)


def test_non_finite_reward_stops_with_the_step_and_keeps_the_last_checkpoint(tmp_path):
    config = fast_config(*SHORT, "train.steps=5", "log.checkpoint_every=1",
                         "reward=tests.fixtures:NanAfterTwoCalls")
    with pytest.raises(NonFiniteError, match="step 2") as error:  # call 1: step-0 grid, call 2: step 1
        train(config, tmp_path, quiet=True)
    assert "reward_mean" in str(error.value) and "step-000001" in str(error.value)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000001"]


class NanOnThirdCall(NanRewardBase):
    """Brightness, except NaN on the third call: with the step-0 grid first, the reward of training step 2."""

    nan_calls = range(3, 4)


def test_max_nonfinite_skips_undoes_the_step_and_logs_it(tmp_path):
    config = fast_config(*SHORT, "train.steps=3", "log.checkpoint_every=1", "train.max_nonfinite_skips=1",
                         "reward=tests.test_training:NanOnThirdCall", "train.learning_rate=1.0e-2")
    result = train(config, tmp_path, quiet=True)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3]
    assert rows[1]["skipped"].startswith("loss, reward_mean") and rows[1]["nonfinite_skips"] == 1
    assert "skipped" not in rows[0] and "skipped" not in rows[2] and result.last_metrics["step"] == 3
    checkpoints = tmp_path / "checkpoints"
    from safetensors.torch import load_file

    before, skipped, after = (load_file(checkpoints / f"step-00000{n}" / "pytorch_lora_weights.safetensors")
                              for n in (1, 2, 3))
    assert all(torch.equal(before[k], skipped[k]) for k in before)  # no update at all from the NaN step
    assert all(torch.isfinite(after[k]).all() for k in after) and any(not torch.equal(after[k], before[k])
                                                                      for k in after)
    optimizer = [torch.load(checkpoints / f"step-00000{n}" / "training_state" / "optimizer.pt", weights_only=True)
                 for n in (1, 2)]
    assert optimizer[0]["state"][0]["step"] == optimizer[1]["state"][0]["step"] == 1
    assert json.loads((checkpoints / "step-000003" / "training_state" / "state.json").read_text()) == {
        "nonfinite_skips": 1, "step": 3, "num_processes": 1}


def test_more_non_finite_steps_than_allowed_stop_the_run(tmp_path):
    config = fast_config(*SHORT, "train.steps=5", "log.checkpoint_every=1", "train.max_nonfinite_skips=1",
                         "reward=tests.fixtures:NanAfterTwoCalls")
    with pytest.raises(NonFiniteError, match=r"step 3: loss, reward_mean.* after 1 skipped steps"):
        train(config, tmp_path, quiet=True)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row.get("skipped", "")[:17] for row in rows] == ["", "loss, reward_mean"]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000001", "step-000002"]


def test_crash_during_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    import diffrl.checkpoint as checkpoint

    real_save, calls = torch.save, []

    def failing_save(obj, path, *args, **kwargs):
        calls.append(path)
        if "step-000002" in str(path) and str(path).endswith("trainer.pt"):
            raise OSError("disk full")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        train(fast_config(*SHORT, "log.checkpoint_every=1"), tmp_path, quiet=True)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000001"]
    assert not (tmp_path / "checkpoints" / "step-000002").exists()


def test_keep_last_prunes_old_checkpoints(tmp_path):
    train(fast_config(*SHORT, "train.steps=4", "log.checkpoint_every=1", "log.keep_last=2"), tmp_path, quiet=True)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000003", "step-000004"]


def test_prompt_file_errors(tmp_path):
    with pytest.raises(UserInputError, match="does not exist"):
        load_prompts(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(UserInputError, match="no prompts"):
        load_prompts(tmp_path / "empty.txt")


@pytest.mark.parametrize("model", ["tiny", "tiny-sdxl"])
def test_bf16_mixed_precision_keeps_lora_and_log_probs_in_float32(tmp_path, model):
    from diffrl.training import build_run

    run = build_run(fast_config(*SHORT, f"model={model}", "train.mixed_precision=bf16", "sample.eta=1.0", "draft.k=2"),
                    tmp_path)
    assert run.pipe.unet.dtype == torch.bfloat16 and run.pipe.vae.dtype == torch.bfloat16
    lora = [p for n, p in run.pipe.unet.named_parameters() if "lora_" in n]
    assert lora and all(p.dtype == torch.float32 and p.requires_grad for p in lora)
    before = [p.detach().clone() for p in lora]
    with run.accelerator.autocast():
        traj = run.sampler.sample(["a red circle"] * 2)
        metrics = run.trainer.step(["a red circle"] * 2)
    assert traj.log_probs.dtype == torch.float32 and traj.images.dtype == torch.float32
    assert all(torch.isfinite(torch.tensor(value)) for value in metrics.values())
    assert any(not torch.equal(a, p) for a, p in zip(before, lora))


def test_attention_is_sdpa_by_default_and_xformers_is_refused_where_it_cannot_run(tmp_path, monkeypatch):
    import importlib.util

    from diffusers.models.attention_processor import AttnProcessor2_0

    from diffrl.training import set_attention

    run = build_run(fast_config(*SHORT), tmp_path)
    processors = {type(processor) for processor in run.pipe.unet.attn_processors.values()}
    assert processors == {AttnProcessor2_0}     # torch's scaled_dot_product_attention (LoRA lives in the Linear layers)
    find_spec = importlib.util.find_spec

    def xformers_installed(installed: bool):
        def find(name, *args):
            return (object() if installed else None) if name == "xformers" else find_spec(name, *args)
        monkeypatch.setattr(importlib.util, "find_spec", find)

    xformers_installed(False)
    with pytest.raises(UserInputError, match="needs the xformers package"):
        set_attention(run.pipe, "xformers", torch.device("cpu"))
    xformers_installed(True)
    with pytest.raises(UserInputError, match="runs only on a CUDA GPU and this run is on cpu"):
        set_attention(run.pipe, "xformers", torch.device("cpu"))


@pytest.mark.parametrize("sharded", ["FSDP", "DEEPSPEED"])
def test_sharded_launches_are_refused_with_the_alternative(sharded):
    """accelerate turns FSDP on only for GPU processes, so the refusal is tested on the launch type itself."""
    from accelerate.utils import DistributedType

    from diffrl.training import check_distributed_type

    with pytest.raises(UserInputError, match="is not supported: diffrl trains LoRA adapters.*DDP"):
        check_distributed_type(DistributedType[sharded])
    check_distributed_type(DistributedType.MULTI_GPU)   # DDP, like MULTI_CPU and NO, goes ahead


def test_batch_4_equals_batch_2_with_accumulation_2(tmp_path):
    """The same 4 prompts and noise give the same gradient whether seen at once or as 2 accumulated micro-batches.

    Compared through Adam's first moment after one step, 0.1·g: the weights themselves moved by lr·g/(|g| + ε),
    blind to the gradient's scale and ill-conditioned where |g| is near ε (an element-wise weight tolerance failed
    there on a busy machine). See tests.fixtures.SAME_GRADIENT_RTOL for the tolerance."""
    def lora_after(batch_size: int, accumulation: int, steps: int):
        config = fast_config("train.learning_rate=1.0e-2", f"sample.batch_size={batch_size}",
                             f"train.gradient_accumulation_steps={accumulation}", "train.max_grad_norm=1.0e6")
        torch.manual_seed(0)
        run = build_run(config, tmp_path / f"b{batch_size}")
        for step in range(steps):
            run.trainer.step(prompts_for_step(run.prompts, step, batch_size, seed=0))
        optimizer = run.state.optimizer.optimizer
        # Adam's update is blind to the gradient's scale; its first moment after one step (0.1 g) is not.
        return [optimizer.state[p]["exp_avg"].clone() for p in optimizer.param_groups[0]["params"]]

    whole, accumulated = lora_after(4, 1, 1), lora_after(2, 2, 2)
    assert max(m.abs().max() for m in whole) > 0
    assert_same_gradients(accumulated, whole)


def test_tensorboard_tracker_gets_scalars_hparams_and_grid_images(tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard package is not installed (pip install -e '.[test]')")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(fast_config(*SHORT, "train.steps=1", "log.tracker=tensorboard"), tmp_path, quiet=True)
    events = EventAccumulator(str(tmp_path / "tensorboard" / "diffrl"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    reward = events.Scalars("reward_mean")
    logged = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert [(e.step, round(e.value, 5)) for e in reward] == [(1, round(logged["reward_mean"], 5))]
    grids = events.Images("grid")
    assert [image.step for image in grids] == [0, 1]  # before training, and the last step
    assert (grids[0].width, grids[0].height) == Image.open(tmp_path / "grids" / "step-000000.png").size
    hparams = yaml.safe_load(next((tmp_path / "tensorboard" / "diffrl").glob("*/hparams.yml")).read_text())
    assert hparams["train.steps"] == 1 and hparams["log.tracker"] == "tensorboard"
    assert (tmp_path / "report.html").is_file()


def test_flat_config_gives_trackers_dotted_scalar_keys():
    flat = flat_config(config_to_dict(fast_config("reward={brightness: 1.0, contrast: 0.5}")))
    assert flat["train.learning_rate"] == 1e-4 and flat["reward.contrast"] == 0.5
    assert flat["log.grid_seeds"] == "[0, 1]" and flat["train.lora_alpha"] == "null"
    assert all(isinstance(value, (bool, int, float, str)) for value in flat.values())


def test_grid_goes_to_wandb_as_a_wandb_image(monkeypatch):
    """wandb is not installed for the tests: a stand-in module records what the wandb tracker would receive."""
    logged = []
    monkeypatch.setitem(sys.modules, "wandb", SimpleNamespace(Image=lambda image, caption: ("Image", image, caption)))
    tracker = SimpleNamespace(name="wandb", log=lambda values, step: logged.append((values, step)))
    grid = Image.new("RGB", (8, 8))
    log_grid_to_trackers(SimpleNamespace(trackers=[tracker]), grid, 5)
    assert logged == [({"grid": ("Image", grid, "step 5")}, 5)]


@pytest.mark.parametrize("overrides, expected", [
    (["sample.resolution=101"], "resolution 101 must be a multiple of"),
    (["train.lora_target_modules=[nope]"], "train.lora_target_modules ['nope'] match no module of the UNet"),
    (["trainer=adjoint_matching", "reward=compressibility", "sample.eta=1.0"], "is not differentiable"),
    (["trainer=adjoint_matching", "sample.eta=0.5"], "set sample.scheduler=ddim and sample.eta=1, and "
                                                      "sample.schedule=adjoint_matching if"),
    (["trainer=ddpo", "sample.eta=0"], "DDPO optimises the likelihood of stochastic steps: set sample.eta > 0"),
    (["sample.num_steps=abc"], "sample.num_steps must be int, got 'abc'"),
    (["log.tracker=off"], "quote it, YAML reads bare no/yes/on/off as true/false"),
    (["train.max_nonfinite_skips=-1"], "train.max_nonfinite_skips must be >= 0, got -1"),
    (["prompts={tmp}/empty.txt"], "holds no prompts"),
    (["model={tmp}/nowhere"], "unknown model"),
    (["train.attention=xformers"], "train.attention=xformers "),   # not installed here; on a CPU if it were
    (["sample.scheduler=euler"], "unknown sample.scheduler 'euler'"),
    (["trainer=ddpo", "sample.scheduler=DPMSolverMultistepScheduler"],
     "DDPO needs single denoising steps recomputed, which sample.scheduler=DPMSolverMultistepScheduler does not"),
    (["draft.truncation=uniform", "draft.truncation_min=50", "draft.truncation_max=60"],
     "draft.truncation=uniform almost never draws"),
    (["trainer=pso", "sample.scheduler=lcm", "pso.loser_weight=-1"], "pso.loser_weight must be non-negative"),
    (["trainer=pso", "sample.eta=0"], "online PSO compares the likelihoods of stochastic steps"),
    (["trainer=spin"], "spin.dataset is not set"),
    (["trainer=spin", "spin.dataset=assets/datasets/shapes", "spin.iterations=[{{learning_rate: 1, beta: 1, steps: 2}}]"],
     "more than spin.iterations plan"),
    (["trainer=spin", "spin.dataset={tmp}/data.jsonl"], "line 1: image"),
    (["sample.timesteps=[999, 749, 499]"], "sample.timesteps has 3 values but sample.num_steps is 2"),
    (["sample.timesteps=[999, 499]"], "explicit sample.timesteps need sample.scheduler=lcm"),
    (["base_lora={tmp}/absent.safetensors"], "absent.safetensors' does not exist: give a .safetensors file"),
])
def test_bad_input_catalogue_exits_2_with_one_sentence(overrides, expected, tmp_path, capsys):
    """The rows of docs/bad_input.md not covered in tests/test_cli.py; the CLI called in-process."""
    from diffrl.cli import main

    (tmp_path / "empty.txt").write_text("\n")
    (tmp_path / "data.jsonl").write_text('{"prompt": "a red circle", "image": "missing.png"}\n')
    code = main(["train", "assets/configs/tiny-draft.yaml", *[o.format(tmp=tmp_path) for o in overrides],
                 *SHORT, "--quiet", "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and expected in err and err.startswith("diffrl: error:") and len(err.splitlines()) == 1


@pytest.mark.parametrize("overrides, expected", [
    (["trainer=draft"], True),                                   # backward through K UNet calls and the VAE
    (["trainer=ddpo", "sample.eta=1.0"], False),                 # one UNet call per graph
    (["trainer=adjoint_matching", "sample.eta=1.0"], False),
    (["trainer=ddpo", "sample.eta=1.0", "train.gradient_checkpointing=true"], True),   # the user's choice wins
    (["trainer=draft", "train.gradient_checkpointing=false"], False),
])
def test_gradient_checkpointing_defaults_to_the_trainers_need(tmp_path, overrides, expected):
    from diffrl.training import uses_gradient_checkpointing

    config = fast_config(*overrides)
    assert uses_gradient_checkpointing(config) is expected
    assert build_run(config, tmp_path).sampler.gradient_checkpointing is expected


def test_vae_slicing_decodes_image_by_image_to_the_same_images(tmp_path):
    prompts = ["a red circle", "a blue square", "a green circle"]
    images = []
    for slicing in (False, True):
        run = build_run(fast_config(f"sample.vae_slicing={str(slicing).lower()}"), tmp_path / str(slicing))
        assert run.pipe.vae.use_slicing is slicing
        with torch.no_grad():
            images.append(run.sampler.sample(prompts, generator=torch.Generator().manual_seed(0)).images)
    # The decoder's kernels may sum in another order for batch 1 than for batch 3: float32 rounding through the VAE,
    # ~1e-6 on images in [0, 1]; slices out of order or scaled twice move pixels by > 1e-2. atol 1e-4 between them.
    torch.testing.assert_close(images[1], images[0], rtol=0, atol=1e-4)


def test_compile_compiles_the_unet_in_place_keeping_its_parameter_names(tmp_path):
    plain = build_run(fast_config(), tmp_path / "plain").pipe.unet
    compiled = build_run(fast_config("train.compile=true"), tmp_path / "compiled").pipe.unet
    assert compiled._compiled_call_impl is not None and plain._compiled_call_impl is None
    assert [name for name, _ in compiled.named_parameters()] == [name for name, _ in plain.named_parameters()]


def test_grids_use_the_eval_guidance_scale_and_training_does_not(tmp_path, monkeypatch):
    """A run trained CFG-free (guidance 1) draws its grids with sample.eval_guidance_scale (CFG 4), then trains
    without CFG again."""
    from diffrl.training import write_grid

    run = build_run(fast_config("sample.guidance_scale=1.0", "sample.eval_guidance_scale=4.0", "log.grid_prompts=1",
                                "log.grid_seeds=[0]"), tmp_path)
    seen, sample = [], run.sampler.sample

    def recording_sample(*args, **kwargs):
        seen.append((run.sampler.guidance_scale, run.sampler.do_cfg))
        return sample(*args, **kwargs)

    monkeypatch.setattr(run.sampler, "sample", recording_sample)
    write_grid(run, tmp_path, 0)
    run.trainer.step(["a red circle"] * 4)
    assert seen == [(4.0, True), (1.0, False)]
