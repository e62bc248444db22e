"""rewards: the registry, load_reward specs, MixReward and score(), against hand-computed values."""

from __future__ import annotations

import gc
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffrl.cli import main
from diffrl.errors import UserInputError
from rewards import REWARDS, MixReward, PretrainedReward, describe, load_reward, score
from rewards.statistics import BrightnessReward

H = W = 8
N = H * W
FIXTURE = "tests.rewards.user_reward_fixture"
COLOUR = (0.2, 0.4, 0.6)
BRIGHTNESS = 0.299 * 0.2 + 0.587 * 0.4 + 0.114 * 0.6   # 0.4456
SATURATION = 0.6 - 0.2


def flat_images(batch: int = 2) -> torch.Tensor:
    return torch.tensor(COLOUR)[None, :, None, None].expand(batch, 3, H, W).clone()


WITHOUT_WEIGHTS = sorted(name for name, cls in REWARDS.items() if not issubclass(cls, PretrainedReward))
WITH_WEIGHTS = sorted(name for name, cls in REWARDS.items() if issubclass(cls, PretrainedReward))
DEMO = str(Path(__file__).resolve().parents[2] / "assets" / "configs" / "tiny-draft.yaml")


@pytest.mark.parametrize("name", WITHOUT_WEIGHTS)
def test_every_registered_reward_loads_scores_and_describes_itself(name):
    reward = load_reward(name)
    assert type(reward) is REWARDS[name]
    assert isinstance(reward.differentiable, bool)
    scores = reward(torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)), ["a", "b"])
    assert scores.shape == (2,) and scores.dtype == torch.float32
    line = describe(name)
    assert line and "\n" not in line


def test_unknown_name_lists_the_valid_names():
    with pytest.raises(UserInputError) as error:
        load_reward("brightnes")
    assert isinstance(error.value, ValueError)
    message = str(error.value)
    assert "'brightnes'" in message
    assert all(name in message for name in REWARDS)


def test_unknown_name_inside_a_mapping_lists_the_valid_names():
    with pytest.raises(UserInputError, match="valid rewards: .*brightness.*saturation"):
        load_reward({"brightness": 1.0, "aestheticz": 0.5})


def test_user_reward_loads_from_module_and_class():
    reward = load_reward(f"{FIXTURE}:MeanRedReward")
    total, components = score(reward, flat_images(), ["a", "b"])
    torch.testing.assert_close(total, torch.tensor([0.2, 0.2]))
    assert components == {f"{FIXTURE}:MeanRedReward": total}


@pytest.mark.parametrize("spec, fragment", [
    (f"{FIXTURE}_missing:MeanRedReward", "cannot import module"),
    (f"{FIXTURE}:NoSuchClass", "has no class 'NoSuchClass'"),
    (f"{FIXTURE}:NotAReward", "is not a reward"),
    (f"{FIXTURE}:", "not of the form"),
    (":MeanRedReward", "not of the form"),
])
def test_bad_module_class_spec_is_one_user_error(spec, fragment):
    with pytest.raises(UserInputError) as error:
        load_reward(spec)
    message = str(error.value)
    assert fragment in message and repr(spec) in message and "\n" not in message
    if fragment != "is not a reward":
        assert "brightness" in message   # points at the built-in names


@pytest.mark.parametrize("spec", [{}, ["brightness"], {"brightness": "high"}, {"brightness": True}])
def test_malformed_spec_is_a_user_error(spec):
    with pytest.raises(UserInputError):
        load_reward(spec)


def test_single_entry_with_weight_one_is_the_reward_itself():
    assert type(load_reward({"brightness": 1.0})) is BrightnessReward
    assert type(load_reward({f"{FIXTURE}:MeanRedReward": 1})).__name__ == "MeanRedReward"


def test_single_entry_with_other_weight_is_a_scaled_mix():
    reward = load_reward({"brightness": 2.5})
    assert isinstance(reward, MixReward)
    total, components = score(reward, flat_images(), ["a", "b"])
    torch.testing.assert_close(total, torch.full((2,), 2.5 * BRIGHTNESS))
    torch.testing.assert_close(components["brightness"], torch.full((2,), BRIGHTNESS))


def test_mix_is_the_weighted_sum_and_reports_unweighted_components():
    reward = load_reward({"brightness": 1.0, "saturation": 0.5, f"{FIXTURE}:MeanRedReward": -2.0})
    images = flat_images()
    expected = BRIGHTNESS + 0.5 * SATURATION - 2.0 * 0.2   # 0.4456 + 0.2 - 0.4 = 0.2456
    total, components = score(reward, images, ["a", "b"])
    torch.testing.assert_close(total, torch.full((2,), expected))
    torch.testing.assert_close(reward(images, ["a", "b"]), total)
    assert list(components) == ["brightness", "saturation", f"{FIXTURE}:MeanRedReward"]
    torch.testing.assert_close(components["brightness"], torch.full((2,), BRIGHTNESS))
    torch.testing.assert_close(components["saturation"], torch.full((2,), SATURATION))
    torch.testing.assert_close(components[f"{FIXTURE}:MeanRedReward"], torch.full((2,), 0.2))
    assert total.dtype == torch.float32 and total.shape == (2,)


def test_mix_gradient_is_the_weighted_sum_of_component_gradients():
    reward = load_reward({"brightness": 2.0, "saturation": -1.0})
    images = flat_images(1).requires_grad_()
    reward(images, ["a"]).sum().backward()
    # brightness: w_c / N on every channel; saturation (= B - R for this colour): +1/N on B, -1/N on R
    per_channel = torch.tensor([2 * 0.299 + 1.0, 2 * 0.587, 2 * 0.114 - 1.0]) / N
    torch.testing.assert_close(images.grad, per_channel[None, :, None, None].expand(1, 3, H, W))


def test_mix_is_differentiable_only_if_every_component_is():
    assert load_reward({"brightness": 1.0, "contrast": 0.5}).differentiable is True
    assert load_reward({"brightness": 1.0, "compressibility": 0.5}).differentiable is False


def test_mix_module_calls_reach_its_components():
    reward = load_reward({"brightness": 1.0, "contrast": 0.5})
    reward.eval()
    assert all(not component.training for component, _ in reward.terms.values())


def test_score_of_a_single_reward_names_it_by_registry_name():
    reward = load_reward("saturation")
    total, components = score(reward, flat_images(), ["a", "b"])
    torch.testing.assert_close(total, torch.full((2,), SATURATION))
    assert list(components) == ["saturation"] and components["saturation"] is total


def test_score_rejects_a_reward_that_does_not_return_one_score_per_image():
    reward = load_reward(f"{FIXTURE}:WrongShapeReward")
    with pytest.raises(UserInputError, match=r"WrongShapeReward.*shape \(2, 1\)"):
        score(reward, flat_images(), ["a", "b"])


@pytest.mark.parametrize("name", sorted(REWARDS))
def test_every_registered_reward_says_whether_it_is_differentiable(name):
    assert isinstance(REWARDS[name].differentiable, bool)
    assert describe(name) and "\n" not in describe(name)


def test_the_published_reward_models_are_registered():
    assert {"aesthetic", "clip_score", "pickscore", "hps"} <= set(WITH_WEIGHTS)


@pytest.mark.parametrize("name", WITH_WEIGHTS)
def test_missing_weights_stop_train_with_exit_2_and_one_sentence(name, tmp_path, capsys):
    # HF_HUB_OFFLINE=1 (tests/conftest.py) and an empty cache: what a machine without the weights sees.
    code = main(["train", DEMO, f"reward={name}", "--quiet", "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert "is neither in the local cache nor downloadable now; download it (hf download " in err
    assert f"or set reward_weights.{name}: /path/to/" in err


def test_reward_weights_for_a_reward_without_weights_is_a_user_error():
    with pytest.raises(UserInputError, match="reward_weights.brightnes: 'brightnes' is not a reward with published "
                                             "weights; those are: .*aesthetic"):
        load_reward("brightness", {"brightnes": "/some/path"})


class CountingPretrained(torch.nn.Module):
    """A registered stand-in for a reward model: counts how often its weights are loaded."""

    differentiable = True
    loads: list[str | None] = []

    def __init__(self, local_path):
        super().__init__()
        self.local_path = local_path
        self.scale = torch.nn.Parameter(torch.ones(()))

    @classmethod
    def pretrained(cls, local_path=None):
        cls.loads.append(local_path)
        return cls(local_path)

    @classmethod
    def weights_present(cls, local_path=None):
        return True

    def forward(self, images, prompts):
        return (self.scale * images.float().mean(dim=(1, 2, 3))).float()


@pytest.fixture
def counting(monkeypatch):
    monkeypatch.setitem(REWARDS, "counting", CountingPretrained)
    monkeypatch.setattr(CountingPretrained, "loads", [])
    return CountingPretrained


def test_a_reward_model_is_loaded_once_while_it_is_held(counting):
    first = load_reward("counting", {"counting": "/weights"})
    mix = load_reward({"counting": 0.5, "brightness": 1.0}, {"counting": "/weights"})
    assert mix.terms["counting"][0] is first and counting.loads == ["/weights"]
    assert load_reward("counting") is not first   # other weights: another model
    del first, mix
    gc.collect()
    load_reward("counting", {"counting": "/weights"})
    assert counting.loads == ["/weights", None, "/weights"]   # released when nothing held it, then loaded again


def test_build_run_passes_reward_weights_and_puts_the_model_in_the_run_dtype(counting, tmp_path):
    from diffrl.training import build_run
    from tests.fixtures import fast_config

    run = build_run(fast_config("reward=counting", "reward_weights.counting=/my/weights",
                                "train.mixed_precision=bf16"), tmp_path)
    assert counting.loads == ["/my/weights"] and run.reward.local_path == "/my/weights"
    assert run.reward.scale.dtype == torch.bfloat16 and not run.reward.scale.requires_grad
    assert not run.reward.training


def test_list_shows_gradient_and_weights_columns(counting, capsys):
    assert main(["list"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.startswith("  ")}
    assert lines["counting"].split()[1:4] == ["differentiable", "weights:", "local"]
    assert lines["compressibility"].split()[1:3] == ["no", "gradient"] and "weights:" not in lines["compressibility"]
    for name in WITH_WEIGHTS:   # nothing is cached on this machine
        assert lines[name].split()[1:4] == ["differentiable", "weights:", "absent"]


def test_import_rewards_loads_no_model_library():
    code = ("import sys, rewards\n"
            "print(sorted(m for m in ('transformers', 'open_clip', 'timm', 'torchvision', 'huggingface_hub') "
            "if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
