"""(prompt, image) datasets: the file layouts and datasets datasets, named errors for bad items, preprocessing and the
latent cache."""

from __future__ import annotations

import io
import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from diffrl.errors import UserInputError
from diffrl.image_data import ImageRecord, cache_key, encode_latents, image_tensor, load_image_records
from diffrl.models import build_tiny_pipeline


def _image(path, color=(255, 0, 0), size=(40, 20)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def test_jsonl_paths_are_relative_to_the_file(tmp_path):
    _image(tmp_path / "images" / "a.png")
    _image(tmp_path / "images" / "b.png", (0, 0, 255))
    lines = [{"prompt": "a red circle", "image": "images/a.png"}, {"prompt": "a blue square", "image": "images/b.png"}]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    records = load_image_records(tmp_path / "data.jsonl")
    assert [(r.prompt, r.path) for r in records] == [("a red circle", tmp_path / "images" / "a.png"),
                                                      ("a blue square", tmp_path / "images" / "b.png")]


def test_folder_with_imagefolder_metadata_and_folder_with_caption_files(tmp_path):
    _image(tmp_path / "meta" / "x.png")
    (tmp_path / "meta" / "metadata.jsonl").write_text(json.dumps({"file_name": "x.png", "text": "a cat"}) + "\n")
    assert [(r.prompt, r.path.name) for r in load_image_records(tmp_path / "meta")] == [("a cat", "x.png")]
    for name, caption in (("b.png", "a dog"), ("a.jpg", "a bird")):
        _image(tmp_path / "captions" / name)
        (tmp_path / "captions" / name).with_suffix(".txt").write_text(caption + "\n")
    assert [(r.prompt, r.path.name) for r in load_image_records(tmp_path / "captions")] == [
        ("a bird", "a.jpg"), ("a dog", "b.png")]


@pytest.mark.parametrize("setup, message", [
    (lambda d: (d / "data.jsonl").write_text('{"prompt": "p", "image": "gone.png"}\n'),
     "data.jsonl line 1: image {d}/gone.png does not exist"),
    (lambda d: ((d / "bad.png").write_bytes(b"not a png"),
                (d / "data.jsonl").write_text('{"prompt": "p", "image": "bad.png"}\n')),
     "data.jsonl line 1: image {d}/bad.png cannot be read"),
    (lambda d: (d / "data.jsonl").write_text('{"prompt": "p"}\n'),
     "data.jsonl line 1: expected a JSON object with 'prompt' and 'image'"),
])
def test_a_bad_item_is_named_with_its_line_and_path(tmp_path, setup, message):
    setup(tmp_path)
    with pytest.raises(UserInputError) as error:
        load_image_records(tmp_path / "data.jsonl")
    assert message.format(d=tmp_path) in str(error.value)


def test_an_image_without_caption_is_named(tmp_path):
    _image(tmp_path / "lonely.png")
    with pytest.raises(UserInputError, match="lonely.png has no caption: write its prompt to lonely.txt"):
        load_image_records(tmp_path)


def test_image_tensor_resizes_the_short_side_and_centre_crops(tmp_path):
    # left half red, right half blue, 40 x 20: resized to 32 x 16, the centre 16 x 16 crop is half red, half blue
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 20, 20))
    image.save(tmp_path / "half.png")
    pixels = image_tensor(tmp_path / "half.png", 16)
    assert pixels.shape == (3, 16, 16) and pixels.min() >= -1 and pixels.max() <= 1
    torch.testing.assert_close(pixels[:, 8, 2], torch.tensor([1.0, -1.0, -1.0]))     # red, mapped to [-1, 1]
    torch.testing.assert_close(pixels[:, 8, 13], torch.tensor([-1.0, -1.0, 1.0]))    # blue


def test_latents_are_the_scaled_posterior_mean_and_come_back_from_the_cache(tmp_path):
    vae = build_tiny_pipeline().vae
    paths = [_image(tmp_path / f"{i}.png", (60 * i, 100, 200 - 50 * i), (32, 32)) for i in range(3)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps({"prompt": f"p{i}", "image": p.name}) + "\n"
                                                 for i, p in enumerate(paths)))
    records = load_image_records(tmp_path / "data.jsonl")
    latents = encode_latents(records, vae, 32, cache_dir=tmp_path / "cache", batch_size=2)
    with torch.no_grad():
        pixels = torch.stack([image_tensor(path, 32) for path in paths])
        expected = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
    torch.testing.assert_close(latents, expected, rtol=1e-5, atol=1e-5)
    assert len(list((tmp_path / "cache").glob("latents-*.safetensors"))) == 1

    def no_encoding(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    vae.encode = no_encoding
    assert torch.equal(encode_latents(records, vae, 32, cache_dir=tmp_path / "cache"), latents)
    key = cache_key(records, 32, vae)
    _image(paths[1], (1, 2, 3), (32, 32))                    # another image under the same name: a new key
    assert cache_key(records, 32, vae) != key and cache_key(records, 16, vae) != cache_key(records, 32, vae)


# --- Hugging Face datasets ---

datasets = pytest.importorskip("datasets")


def _png(color, size=(32, 32)) -> bytes:
    encoded = io.BytesIO()
    Image.new("RGB", size, color).save(encoded, format="PNG")
    return encoded.getvalue()


def _saved(folder, columns, image_feature=False):
    dataset = datasets.Dataset.from_dict(columns)
    if image_feature:
        dataset = dataset.cast_column("image", datasets.Image())
    dataset.save_to_disk(str(folder))
    return folder


def test_a_saved_dataset_holds_the_images_in_memory_and_gives_the_tensors_of_the_files(tmp_path):
    files = [_image(tmp_path / "a.png", (255, 0, 0), (40, 20)), _image(tmp_path / "b.png", (0, 0, 255), (20, 40))]
    folder = _saved(tmp_path / "ds", {"prompt": ["a red wide", "a blue tall"], "image": [str(p) for p in files]},
                    image_feature=True)
    records = load_image_records(folder)
    assert [(r.prompt, r.path, r.origin) for r in records] == [("a red wide", None, f"dataset {folder} row 0"),
                                                                ("a blue tall", None, f"dataset {folder} row 1")]
    for record, file in zip(records, files):
        assert record.read_bytes() == file.read_bytes()      # save_to_disk embeds the files' bytes
        assert torch.equal(image_tensor(record, 16), image_tensor(file, 16))


def test_a_dataset_dict_gives_the_named_split_and_names_the_splits_it_has(tmp_path):
    folder = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"caption": ["a"], "jpg": [_png((1, 2, 3))]}),
                          "test": datasets.Dataset.from_dict({"caption": ["b", "c"], "jpg": [_png((4, 5, 6))] * 2})
                          }).save_to_disk(str(folder))
    assert [r.prompt for r in load_image_records(folder)] == ["a"]
    assert [r.prompt for r in load_image_records(folder, split="test")] == ["b", "c"]
    with pytest.raises(UserInputError, match="has no split 'valid'; its splits are: train, test"):
        load_image_records(folder, split="valid")


def test_pickapic_pairs_give_the_preferred_image_and_ties_are_left_out_aloud(tmp_path, capsys):
    red, blue, green, white = _png((255, 0, 0)), _png((0, 0, 255)), _png((0, 255, 0)), _png((255, 255, 255))
    folder = _saved(tmp_path / "pick", {"caption": ["first wins", "second wins", "a tie"],
                                        "jpg_0": [red, green, white], "jpg_1": [blue, blue, white],
                                        "label_0": [1.0, 0.0, 0.5], "label_1": [0.0, 1.0, 0.5]})
    records = load_image_records(folder)
    assert [(r.prompt, r.data, r.origin) for r in records] == [("first wins", red, f"dataset {folder} row 0"),
                                                                ("second wins", blue, f"dataset {folder} row 1")]
    assert "left out 1 of 3 Pick-a-Pic pairs that are ties" in capsys.readouterr().err
    # an image_column given takes that column of every row, ties included
    assert [r.data for r in load_image_records(folder, image_column="jpg_1")] == [blue, blue, white]


def test_missing_columns_are_named_with_the_columns_the_dataset_has(tmp_path):
    folder = _saved(tmp_path / "odd", {"words": ["a cat"], "picture": [_png((9, 9, 9))]})
    with pytest.raises(UserInputError, match="none of the prompt columns prompt, caption, text; its columns are "
                                             "words, picture: set prompt_column"):
        load_image_records(folder)
    with pytest.raises(UserInputError, match="none of the image columns image, jpg, png; its columns are words, "
                                             "picture: set image_column"):
        load_image_records(folder, prompt_column="words")
    with pytest.raises(UserInputError, match="has no image column 'photo'; its columns are words, picture"):
        load_image_records(folder, prompt_column="words", image_column="photo")
    assert [r.prompt for r in load_image_records(folder, prompt_column="words", image_column="picture")] == ["a cat"]


def test_a_corrupt_image_in_a_dataset_is_named_with_its_row(tmp_path):
    folder = _saved(tmp_path / "bad", {"prompt": ["fine", "broken"], "image": [_png((1, 1, 1)), b"not an image"]})
    with pytest.raises(UserInputError, match=f"dataset {folder} row 1: image cannot be read"):
        load_image_records(folder)


class _FakeVae:
    """Latents: 8x8 average pooling of the pixels; counts its calls, so a test can tell the cache was used."""

    class Config(dict):
        __getattr__ = dict.__getitem__

    config = Config(scaling_factor=0.5, latent_channels=3, latents_mean=None, latents_std=None,  # as AutoencoderKL
                    shift_factor=None)
    device, dtype = torch.device("cpu"), torch.float32

    def __init__(self):
        self.calls = 0

    def encode(self, pixels):
        self.calls += 1
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=F.avg_pool2d(pixels, 8)))


def test_in_memory_records_are_encoded_and_cached_by_their_bytes(tmp_path):
    images = [_png((60 * i, 100, 200 - 50 * i)) for i in range(3)]
    folder = _saved(tmp_path / "ds", {"prompt": ["p0", "p1", "p2"], "image": images})
    records, vae = load_image_records(folder), _FakeVae()
    latents = encode_latents(records, vae, 32, cache_dir=tmp_path / "cache", batch_size=2)
    expected = torch.stack([F.avg_pool2d(image_tensor(r, 32)[None], 8)[0] * 0.5 for r in records])
    assert vae.calls == 2 and torch.equal(latents, expected)
    assert torch.equal(encode_latents(records, vae, 32, cache_dir=tmp_path / "cache"), latents) and vae.calls == 2
    changed = [*records[:2], ImageRecord("p2", None, records[2].origin, _png((1, 2, 3)))]
    assert cache_key(changed, 32, vae) != cache_key(records, 32, vae)


def test_a_hub_id_that_is_not_in_the_local_cache_says_how_to_give_a_local_copy(tmp_path, monkeypatch):
    # datasets and huggingface_hub read these when imported, so the module constants are set too
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)              # so that the id is no local path
    with pytest.raises(UserInputError, match="'nobody-here/no-such-set' is not a local path and could not be found in "
                                             "the local Hugging Face cache or downloaded .*save_to_disk"):
        load_image_records("nobody-here/no-such-set")
