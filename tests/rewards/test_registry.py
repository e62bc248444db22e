"""rewards: the registry, load_reward specs, MixReward and score(), against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from diffrl.errors import UserInputError
from rewards import REWARDS, MixReward, describe, load_reward, score
from rewards.statistics import BrightnessReward

H = W = 8
N = H * W
FIXTURE = "tests.rewards.user_reward_fixture"
COLOUR = (0.2, 0.4, 0.6)
BRIGHTNESS = 0.299 * 0.2 + 0.587 * 0.4 + 0.114 * 0.6   # 0.4456
SATURATION = 0.6 - 0.2


def flat_images(batch: int = 2) -> torch.Tensor:
    return torch.tensor(COLOUR)[None, :, None, None].expand(batch, 3, H, W).clone()


@pytest.mark.parametrize("name", sorted(REWARDS))
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
