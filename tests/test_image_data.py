"""(prompt, image) datasets: the three layouts, named errors for bad items, preprocessing and the latent cache."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from diffrl.errors import UserInputError
from diffrl.image_data import cache_key, encode_latents, image_tensor, load_image_records
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
