"""A user trainer reached from a config as "package.module:Class" (docs/contracts.md): the class below, defined outside
diffrl, trains through the one loop with its own config section, checkpoints and resume included."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from diffrl.config import load_config, save_config
from diffrl.errors import UserInputError
from diffrl.metrics import metrics_to_floats
from diffrl.training import train
from tests.fixtures import FAST

SPEC = "tests.test_user_trainer:BrightnessTrainer"


@dataclass
class BrightnessConfig:
    scale: float = 1.0   # multiplies the reward in the loss


class BrightnessTrainer:
    """One differentiable last step, loss −scale·mean(r): DRaFT-1 written against the public API only."""

    config_class = BrightnessConfig
    backpropagates_through_sampling = True

    def __init__(self, config: BrightnessConfig, sampler, reward, optimization, *, run_dir: Path):
        self.config, self.sampler, self.reward, self.optimization = config, sampler, reward, optimization
        self.run_dir, self.steps = run_dir, 0

    @staticmethod
    def optimizer_steps_per_step(config) -> float:
        return 1 / config.train.gradient_accumulation_steps

    def step(self, prompts: list[str]) -> dict[str, float]:
        with self.optimization.accumulate():
            traj = self.sampler.sample(prompts, grad_last_k=1)
            rewards = self.reward(traj.images, prompts)
            loss = -self.config.scale * rewards.mean()
            self.optimization.step(loss)
        self.steps += 1
        return metrics_to_floats({"loss": loss.detach(), "reward_mean": rewards.detach().mean(),
                                  "steps_seen": torch.tensor(float(self.steps))})

    def state_dict(self) -> dict:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.steps = state["steps"]


class NoLossTrainer(BrightnessTrainer):
    def step(self, prompts):
        return {"reward_mean": super().step(prompts)["reward_mean"]}


def test_a_user_trainer_trains_two_steps_from_a_config(tmp_path):
    config = load_config(None, [*FAST, f"trainer={SPEC}", "BrightnessTrainer.scale=2.0", "train.steps=2",
                                "log.checkpoint_every=1", "train.learning_rate=1e-2"])
    assert config.BrightnessTrainer == BrightnessConfig(scale=2.0)
    result = train(config, tmp_path / "run", quiet=True)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2] and [row["steps_seen"] for row in rows] == [1.0, 2.0]
    assert all(math.isfinite(row["loss"]) for row in rows)
    assert result.last_checkpoint.name == "step-000002"
    saved = load_config(tmp_path / "run" / "config.yaml")   # the resolved config reads back with its section
    assert saved.trainer == SPEC and saved.BrightnessTrainer.scale == 2.0 and "draft:" not in (
        tmp_path / "run" / "config.yaml").read_text()


def test_a_user_trainer_resumes_with_its_state(tmp_path):
    overrides = [*FAST, f"trainer={SPEC}", "log.checkpoint_every=1"]
    train(load_config(None, [*overrides, "train.steps=1"]), tmp_path, quiet=True)
    train(load_config(None, [*overrides, "train.steps=2"]), tmp_path, resume=True, quiet=True)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["steps_seen"] for row in rows] == [1.0, 2.0]   # its state_dict came back from the checkpoint


@pytest.mark.parametrize("spec, message", [
    ("tests.nowhere:Trainer", "cannot import module 'tests.nowhere'"),
    ("tests.test_user_trainer:Missing", "has no class 'Missing'"),
    ("tests.test_user_trainer:BrightnessConfig", "lacks step, state_dict, load_state_dict, optimizer_steps_per_step, "
                                                 "backpropagates_through_sampling of the Trainer protocol"),
    ("nonsense", "unknown trainer 'nonsense'"),
])
def test_bad_trainer_specs_say_what_is_wrong(spec, message):
    with pytest.raises(UserInputError, match=message):
        load_config(None, [f"trainer={spec}"])


def test_a_step_without_the_required_metrics_stops_the_run(tmp_path):
    config = load_config(None, [*FAST, "trainer=tests.test_user_trainer:NoLossTrainer", "train.steps=1"])
    with pytest.raises(TypeError, match="returned metrics without loss"):
        train(config, tmp_path, quiet=True)


def test_the_section_of_a_user_trainer_is_checked_like_any_other(tmp_path):
    with pytest.raises(UserInputError, match="BrightnessTrainer.scal"):
        load_config(None, [f"trainer={SPEC}", "BrightnessTrainer.scal=2"])
    path = tmp_path / "config.yaml"
    save_config(load_config(None, [f"trainer={SPEC}"]), path)
    assert load_config(path, ["BrightnessTrainer.scale=3"]).BrightnessTrainer.scale == 3.0
