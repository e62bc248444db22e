"""diffrl.config: YAML + overrides -> typed Config, every user mistake a one-sentence UserInputError."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from diffrl.config import (Config, LogConfig, SampleConfig, TrainConfig, config_to_dict, load_config, save_config,
                           trainer_sections)
from diffrl.errors import UserInputError
from diffrl.trainers import TRAINERS
from diffrl.trainers.ddpo import DdpoConfig
from diffrl.trainers.draft import DraftConfig


def write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def load_error(*overrides: str, path: Path | None = None) -> str:
    with pytest.raises(UserInputError) as info:
        load_config(path, list(overrides))
    return str(info.value)


# ---- defaults and files ----

def test_defaults():
    config = load_config(None)
    assert config == Config()
    assert config.model == "tiny" and config.trainer == "draft"
    assert config.reward == {"brightness": 1.0}
    assert config.sample == SampleConfig(num_steps=50, guidance_scale=7.5, eta=0.0, batch_size=4)
    assert config.train.lora_target_modules is None and config.sample.scheduler is None   # the family's own
    assert config.train.lora_alpha is None and config.train.mixed_precision == "no"
    assert config.log.grid_seeds == [0, 1, 2, 3] and config.log.keep_last is None
    assert config.draft == DraftConfig()
    assert trainer_sections() == {name: config_class for name, (config_class, _) in TRAINERS.items()}
    assert set(trainer_sections()) == {"draft", "ddpo", "loop", "dpok", "adjoint_matching", "spin", "pso", "nft"}


def test_default_lists_are_not_shared():
    a, b = Config(), Config()
    a.reward["contrast"] = 1.0
    a.log.grid_seeds.append(9)
    assert b.reward == {"brightness": 1.0} and b.log.grid_seeds == [0, 1, 2, 3]


def test_yaml_with_nested_sections(tmp_path):
    path = write(tmp_path, """
model: runwayml/stable-diffusion-v1-5
reward: {aesthetic: 1.0, brightness: 2}
sample: {num_steps: 20, guidance_scale: 5, eta: 0.5, resolution: 256, negative_prompt: blurry}
train:
  learning_rate: 3e-5          # PyYAML reads this as a string
  lora_rank: 8
  lora_alpha: 16
  lora_target_modules: [to_q, to_v]
  mixed_precision: "no"
log: {tracker: tensorboard, keep_last: 2, grid_seeds: [7]}
draft: {k: 3, truncation: uniform}
""")
    config = load_config(path)
    assert config.model == "runwayml/stable-diffusion-v1-5"
    assert config.reward == {"aesthetic": 1.0, "brightness": 2.0}
    assert config.sample == SampleConfig(num_steps=20, guidance_scale=5.0, eta=0.5, resolution=256,
                                         negative_prompt="blurry")
    assert config.train == TrainConfig(learning_rate=3e-5, lora_rank=8, lora_alpha=16.0,
                                       lora_target_modules=["to_q", "to_v"])
    assert config.log == LogConfig(tracker="tensorboard", keep_last=2, grid_seeds=[7])
    assert config.draft == DraftConfig(k=3, truncation="uniform")


def test_int_is_converted_to_float(tmp_path):
    config = load_config(write(tmp_path, "sample: {guidance_scale: 5}\ntrain: {lora_alpha: 8}\nreward: {a: 1}"))
    for value in (config.sample.guidance_scale, config.train.lora_alpha, config.reward["a"]):
        assert type(value) is float
    assert config.sample.guidance_scale == 5.0


def test_empty_file_and_empty_section_mean_defaults(tmp_path):
    assert load_config(write(tmp_path, "")) == Config()
    assert load_config(write(tmp_path, "draft:\nsample: {}\n")) == Config()


def test_reward_as_single_name(tmp_path):
    assert load_config(write(tmp_path, "reward: mypkg.rewards:Sharpness")).reward == "mypkg.rewards:Sharpness"


# ---- errors in the file ----

def test_missing_file_names_the_path(tmp_path):
    message = load_error(path=tmp_path / "nope.yaml")
    assert "nope.yaml" in message and "does not exist" in message


def test_malformed_yaml_names_file_and_line(tmp_path):
    message = load_error(path=write(tmp_path, "model: tiny\nsample: {num_steps: 3\ntrain: {}\n", "bad.yaml"))
    assert "bad.yaml" in message and "line 3" in message


def test_top_level_must_be_a_mapping(tmp_path):
    message = load_error(path=write(tmp_path, "- model\n- tiny\n", "list.yaml"))
    assert "list.yaml" in message and "mapping" in message and "list" in message


@pytest.mark.parametrize("text, key, valid", [
    ("modle: tiny", "'modle'", "model, nft, prompts, pso, reward"),
    ("sample: {num_step: 3}", "'sample.num_step'", "sample.num_steps"),
    ("draft: {kk: 3}", "'draft.kk'", "draft.k, draft.kl_coeff"),
])
def test_unknown_key_names_it_and_lists_valid_keys(tmp_path, text, key, valid):
    message = load_error(path=write(tmp_path, text))
    assert f"unknown config key {key}" in message and valid in message


@pytest.mark.parametrize("text, expected", [
    ("sample: {num_steps: ten}", "sample.num_steps must be int, got 'ten'"),
    ("sample: {num_steps: 2.5}", "sample.num_steps must be int, got 2.5"),
    ("sample: {num_steps: true}", "sample.num_steps must be int, got True"),
    ("sample: {guidance_scale: false}", "sample.guidance_scale must be float, got False"),
    ("sample: {guidance_scale: abc}", "sample.guidance_scale must be float, got 'abc'"),
    ("sample: {resolution: big}", "sample.resolution must be int | null, got 'big'"),
    ("train: {gradient_checkpointing: 1}", "train.gradient_checkpointing must be bool | null, got 1"),
    ("train: {lora_target_modules: to_q}", "train.lora_target_modules must be list[str] | null, got 'to_q'"),
    ("train: {lora_target_modules: [to_q, 3]}", "train.lora_target_modules[1] must be str, got 3"),
    ("train: {mixed_precision: fp8}", "train.mixed_precision must be one of 'no', 'fp16', 'bf16', got 'fp8'"),
    ("train: {mixed_precision: no}", "got False; quote it"),
    ("reward: {aesthetic: high}", "reward.aesthetic must be float, got 'high'"),
    ("reward: [aesthetic]", "reward must be str | dict[str, float], got ['aesthetic']"),
    ("model: 3", "model must be str, got 3"),
    ("sample: 5", "sample must be a mapping, got 5"),
    ("draft: {truncation: normal}", "draft.truncation must be one of 'fixed', 'uniform', 'gaussian'"),
])
def test_wrong_type_names_key_type_and_value(tmp_path, text, expected):
    assert expected in load_error(path=write(tmp_path, text))


@pytest.mark.parametrize("override, expected", [
    ("sample.num_steps=0", "sample.num_steps must be >= 1, got 0"),
    ("sample.batch_size=0", "sample.batch_size must be >= 1, got 0"),
    ("sample.eta=1.5", "sample.eta must be in [0.0, 1.0], got 1.5"),
    ("sample.eta=-0.1", "sample.eta must be in [0.0, 1.0], got -0.1"),
    ("train.steps=-1", "train.steps must be >= 0, got -1"),
    ("train.lora_rank=0", "train.lora_rank must be >= 1, got 0"),
    ("train.gradient_accumulation_steps=0", "train.gradient_accumulation_steps must be >= 1, got 0"),
    ("log.keep_last=0", "log.keep_last must be >= 1, got 0"),
    ("trainer=ppo", "unknown trainer 'ppo'; valid trainers: adjoint_matching, ddpo, dpok, draft, loop"),
    ("reward={}", "reward is an empty mapping"),
])
def test_out_of_range_values(override, expected):
    assert expected in load_error(override)


def test_range_checks_also_guard_direct_construction():
    with pytest.raises(UserInputError, match="sample.num_steps"):
        Config(sample=SampleConfig(num_steps=0))


def test_boundary_values_are_accepted():
    config = load_config(None, ["sample.eta=1", "sample.num_steps=1", "train.steps=0", "log.keep_last=1"])
    assert (config.sample.eta, config.sample.num_steps, config.train.steps) == (1.0, 1, 0)


# ---- overrides ----

def test_overrides_parse_yaml_and_check_types():
    config = load_config(None, [
        "train.learning_rate=1e-4",        # PyYAML: the string '1e-4'
        "sample.num_steps=20",
        "train.lora_target_modules=[to_q, to_k]",
        "log.grid_seeds=[5, 6]",
        "train.gradient_checkpointing=false",
        "model=runwayml/stable-diffusion-v1-5",
    ])
    assert config.train.learning_rate == 1e-4 and type(config.train.learning_rate) is float
    assert config.sample.num_steps == 20
    assert config.train.lora_target_modules == ["to_q", "to_k"]
    assert config.log.grid_seeds == [5, 6]
    assert config.train.gradient_checkpointing is False
    assert config.model == "runwayml/stable-diffusion-v1-5"


@pytest.mark.parametrize("text", ["null", "None", "~"])
def test_override_none_for_optional(tmp_path, text):
    path = write(tmp_path, "sample: {resolution: 512}\nlog: {keep_last: 3}")
    config = load_config(path, [f"sample.resolution={text}", f"log.keep_last={text}"])
    assert config.sample.resolution is None and config.log.keep_last is None


def test_override_dict_entry_and_whole_dict(tmp_path):
    assert load_config(None, ["reward.brightness=2"]).reward == {"brightness": 2.0}
    path = write(tmp_path, "reward: {aesthetic: 1.0}")
    assert load_config(path, ["reward.brightness=0.5"]).reward == {"aesthetic": 1.0, "brightness": 0.5}
    assert load_config(path, ["reward={brightness: 1, contrast: 0.5}"]).reward == {"brightness": 1.0, "contrast": 0.5}
    # Dots after the field name belong to the entry's key: user rewards are "package.module:Class".
    assert load_config(None, ["reward.pkg.mod:Sharp=3"]).reward == {"brightness": 1.0, "pkg.mod:Sharp": 3.0}


def test_override_entry_of_a_single_name_reward_is_an_error():
    message = load_error("reward=aesthetic", "reward.brightness=2")
    assert "reward is 'aesthetic', not a mapping" in message


def test_overrides_apply_after_the_file_in_order(tmp_path):
    path = write(tmp_path, "sample: {num_steps: 10, batch_size: 2}")
    config = load_config(path, ["sample.num_steps=20", "sample.num_steps=30"])
    assert (config.sample.num_steps, config.sample.batch_size) == (30, 2)
    # A bad value in the file can be fixed by an override: checks run once, after everything is merged.
    assert load_config(write(tmp_path, "sample: {num_steps: 0}"), ["sample.num_steps=5"]).sample.num_steps == 5


def test_override_section_mapping_merges_with_file(tmp_path):
    config = load_config(write(tmp_path, "sample: {batch_size: 2}"), ["sample={num_steps: 3}"])
    assert (config.sample.num_steps, config.sample.batch_size) == (3, 2)


def test_override_text_values_that_yaml_reads_as_other_types():
    config = load_config(None, ["train.mixed_precision=no", "sample.negative_prompt=off", "model=1.5"])
    assert (config.train.mixed_precision, config.sample.negative_prompt, config.model) == ("no", "off", "1.5")


@pytest.mark.parametrize("override, expected", [
    ("sample.num_steps", "override 'sample.num_steps' is not of the form key.path=value"),
    ("=3", "override '=3' is not of the form key.path=value"),
    ("sample..eta=1", "is not of the form key.path=value"),
    ("sample.num_step=3", "unknown config key 'sample.num_step'; valid config keys: sample.batch_size"),
    ("smaple.num_steps=3", "unknown config key 'smaple'; valid config keys: adjoint_matching, base_lora, base_lora_scale, ddpo, dpok"),
    ("draft.x=3", "unknown config key 'draft.x'"),
    ("sample.num_steps=ten", "sample.num_steps must be int, got 'ten'"),
    ("train.lora_rank=true", "train.lora_rank must be int, got True"),
    ("train.learning_rate=fast", "train.learning_rate must be float, got 'fast'"),
    ("reward.brightness=high", "reward.brightness must be float, got 'high'"),
    ("model.name=x", "model is a single value"),
    ("sample.num_steps.x=1", "sample.num_steps is a single value"),
    ("sample={num_steps: [1}", "the value '{num_steps: [1}' is not valid YAML"),
])
def test_bad_overrides(override, expected):
    assert expected in load_error(override)


# ---- saving ----

def test_round_trip(tmp_path):
    config = load_config(None, [
        "reward={aesthetic: 1, brightness: 0.25}", "sample.resolution=256", "sample.negative_prompt=no",
        "train.learning_rate=3e-6", "train.adam_epsilon=1e-8", "train.mixed_precision=bf16",
        "log.keep_last=2", "draft.k=5", "draft.truncation=gaussian",
    ])
    path = tmp_path / "config.yaml"
    save_config(config, path)
    assert load_config(path) == config
    assert yaml.safe_load(path.read_text()) == config_to_dict(config)
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]  # no temp file left behind


def test_saved_file_has_every_default(tmp_path):
    path = tmp_path / "config.yaml"
    save_config(Config(), path)
    saved = yaml.safe_load(path.read_text())
    assert saved["sample"]["num_steps"] == 50 and saved["train"]["lora_alpha"] is None
    inactive = set(trainer_sections()) - {"draft"}   # only the active trainer's section is written
    assert set(saved) == {f.name for f in dataclasses.fields(Config)} - inactive
    assert set(saved["draft"]) == {f.name for f in dataclasses.fields(DraftConfig)}


def test_save_overwrites(tmp_path):
    path = tmp_path / "config.yaml"
    save_config(Config(), path)
    save_config(load_config(None, ["sample.num_steps=7"]), path)
    assert load_config(path).sample.num_steps == 7


def test_only_the_active_trainer_section_is_saved():
    data = config_to_dict(Config(trainer="ddpo"))
    assert data["ddpo"] == dataclasses.asdict(DdpoConfig()) and [name for name in trainer_sections() if name in data
                                                                 ] == ["ddpo"]
    data = config_to_dict(Config())
    assert data["draft"] == dataclasses.asdict(DraftConfig()) and "ddpo" not in data


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "assets" / "configs").glob("*.yaml")),
                         ids=lambda path: path.name)
def test_every_shipped_config_loads(path):
    """Demos and GPU recipes alike: every key and value is one the schema accepts, and the trainer accepts the batch
    settings (micro-batches, accumulation, SPIN's iteration plan) before any model is loaded."""
    config = load_config(path)
    assert TRAINERS[config.trainer][1].optimizer_steps_per_step(config) > 0
