"""rewards.weights: local paths, the Hugging Face cache (a fake one, see conftest.py), the one-sentence errors, and
loading that never runs pickled code. HF_HUB_OFFLINE=1 (tests/conftest.py) stands in for a machine without network."""

from __future__ import annotations

import collections
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from diffrl.errors import UserInputError
from rewards.weights import (load_checkpoint_into, load_pretrained, load_state_dict_file, pretrained_present,
                             resolve_weight_file, weights_present)

REPO = "someone/some-reward"
FILE = "head.pth"
KEY = "reward_weights.some"


def test_local_file_or_folder_holding_it(tmp_path):
    (tmp_path / FILE).write_bytes(b"x")
    for local in (tmp_path / FILE, tmp_path):
        assert resolve_weight_file(FILE, REPO, KEY, str(local)) == tmp_path / FILE
        assert weights_present(FILE, REPO, str(local))


def test_missing_local_path_names_the_key_and_the_download(tmp_path):
    with pytest.raises(UserInputError) as error:
        resolve_weight_file(FILE, REPO, KEY, str(tmp_path / "nowhere"))
    message = str(error.value)
    assert KEY in message and FILE in message and f"hf download {REPO} {FILE}" in message
    assert not weights_present(FILE, REPO, str(tmp_path / "nowhere"))


def test_not_cached_and_offline_is_one_sentence_naming_file_repo_and_key():
    with pytest.raises(UserInputError) as error:
        resolve_weight_file(FILE, REPO, KEY)
    message = str(error.value)
    assert message == (f"{FILE} from the Hugging Face repo {REPO} is neither in the local cache nor downloadable "
                       f"now; download it (hf download {REPO} {FILE}) or set {KEY}: /path/to/{FILE}")
    assert not weights_present(FILE, REPO)


def test_cached_file_is_found_without_network(tmp_path, hub_cache):
    (tmp_path / FILE).write_bytes(b"x")
    snapshot = hub_cache(REPO, tmp_path / FILE)
    assert resolve_weight_file(FILE, REPO, KEY) == snapshot / FILE
    assert weights_present(FILE, REPO)


def test_file_in_a_subfolder_of_the_repo(tmp_path, hub_cache):
    snapshot = hub_cache(REPO, tmp_path)   # an empty repo snapshot, then the file in its subfolder
    (snapshot / "sub").mkdir()
    (snapshot / "sub" / FILE).write_bytes(b"x")
    assert resolve_weight_file(FILE, REPO, KEY, subfolder="sub") == snapshot / "sub" / FILE


def fake_from_pretrained(source, local_files_only=False, **kwargs):
    """Stands in for from_pretrained: a folder with config.json loads; anything else fails as transformers does."""
    if Path(source).is_dir() and (Path(source) / "config.json").is_file():
        return ("loaded", str(source), local_files_only, kwargs)
    raise OSError(f"We couldn't connect to 'https://huggingface.co' to load the files of {source}")


def test_load_pretrained_from_a_local_folder_passes_options(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert load_pretrained(fake_from_pretrained, REPO, KEY, str(tmp_path), dtype=torch.float32) == (
        "loaded", str(tmp_path), False, {"dtype": torch.float32})


@pytest.mark.parametrize("make, problem", [(lambda p: None, "is not a folder"),
                                           (lambda p: p.mkdir(), "cannot be loaded")])
def test_load_pretrained_local_problems_are_one_sentence(tmp_path, make, problem):
    folder = tmp_path / "copy"
    make(folder)
    with pytest.raises(UserInputError) as error:
        load_pretrained(fake_from_pretrained, REPO, KEY, str(folder))
    message = str(error.value)
    assert problem in message and KEY in message and f"hf download {REPO} --local-dir PATH" in message
    assert "\n" not in message


def test_load_pretrained_tries_the_cache_before_the_network():
    calls = []

    def from_pretrained(source, **kwargs):
        calls.append(kwargs.get("local_files_only", False))
        raise OSError("not here")

    with pytest.raises(UserInputError) as error:
        load_pretrained(from_pretrained, REPO, KEY)
    assert calls == [True, False]
    assert str(error.value) == (f"the Hugging Face repo {REPO} is neither in the local cache nor downloadable now; "
                                f"download it (hf download {REPO}) or set {KEY}: /path/to/a/local/copy")


def test_pretrained_present_needs_config_and_weights(tmp_path, hub_cache):
    (tmp_path / "config.json").write_text("{}")
    assert not pretrained_present(REPO, str(tmp_path))
    hub_cache(REPO, tmp_path)
    assert not pretrained_present(REPO)
    (tmp_path / "model.safetensors").write_bytes(b"x")
    hub_cache(REPO, tmp_path)
    assert pretrained_present(REPO, str(tmp_path)) and pretrained_present(REPO)


def test_state_dicts_load_from_safetensors_and_plain_pickles(tmp_path):
    tensors = {"a.weight": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2)}
    save_file(tensors, tmp_path / "w.safetensors")
    torch.save({"state_dict": collections.OrderedDict(tensors), "epoch": 3}, tmp_path / "w.pt")
    torch.testing.assert_close(load_state_dict_file(tmp_path / "w.safetensors"), tensors)
    loaded = load_state_dict_file(tmp_path / "w.pt")
    torch.testing.assert_close(loaded["state_dict"], tensors)
    assert loaded["epoch"] == 3


class Payload:
    """Any class outside torch's allow-list: unpickling it could run code, so weights_only refuses it."""


def test_pickles_with_code_are_refused(tmp_path):
    torch.save({"weights": torch.ones(1), "payload": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(UserInputError, match="evil.pt cannot be read as a tensor checkpoint.*weights_only=True"):
        load_state_dict_file(tmp_path / "evil.pt")


def test_corrupt_file_is_a_user_error(tmp_path):
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserInputError, match="broken.safetensors cannot be read"):
        load_state_dict_file(tmp_path / "broken.safetensors")


def test_checkpoint_of_another_model_is_named(tmp_path):
    module = torch.nn.Linear(2, 3)
    load_checkpoint_into(module, {"weight": torch.zeros(3, 2), "bias": torch.ones(3)}, tmp_path / "ok.pt", "a thing")
    torch.testing.assert_close(module.bias, torch.ones(3))
    with pytest.raises(UserInputError) as error:
        load_checkpoint_into(module, {"weight": torch.zeros(2, 2), "extra": torch.ones(1)}, tmp_path / "x.pt",
                             "a thing")
    assert str(error.value) == (f"{tmp_path / 'x.pt'} is not a thing: 1 keys missing, 1 unexpected and 1 of another "
                                "shape (e.g. bias, extra, weight)")
    torch.testing.assert_close(module.bias, torch.ones(3))   # nothing was loaded
