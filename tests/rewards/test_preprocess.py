"""rewards.preprocess against the original processors run on PIL images of the same (uint8) pixels.

Tolerances, in 1/255 units of the [0, 1] image (normalised outputs are multiplied back by std before comparing):
- max 1.13: PIL rounds its horizontal pass to uint8 (error <= 0.5), the vertical bicubic kernel carries that with a
  gain of at most sum|w| = 1.25 (a = -0.5 at half-pixel offset: weights 0.5625, 0.5625, -0.0625, -0.0625), and the
  output is rounded again (<= 0.5): 0.5 * 1.25 + 0.5 = 1.125.
- rms 0.42: each rounding is uniform on [-0.5, 0.5] (rms 1/sqrt(12) = 0.289); the first is carried with gain
  sqrt(sum w^2) <= 1, so rms <= 0.289 * sqrt(2) = 0.408. Measured 0.34-0.39. A wrong filter or a crop one pixel off
  gives several times more, as test_tolerances_catch_a_wrong_filter_or_crop_shift checks. The reward tests build
  their score tolerances on this rms (tests/rewards/clip_fixtures.py).
"""

from __future__ import annotations

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize
from transformers import CLIPImageProcessor
from transformers.image_transforms import get_resize_output_image_size
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from rewards.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, preprocess_images, resized_size
from tests.rewards.clip_fixtures import as_tensor, photo_like

SIZE = 224
MAX_ERROR = 1.13 / 255
RMS_ERROR = 0.42 / 255
SHAPES = [(512, 512), (512, 768), (300, 200), (64, 96), (37, 53)]   # down- and upscaling, both orientations
STD = torch.tensor(OPENAI_CLIP_STD)[:, None, None]


def reference_outputs(array: np.ndarray) -> dict[str, torch.Tensor]:
    image = Image.fromarray(array)
    open_clip_transform = open_clip.image_transform(SIZE, is_train=False, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD)
    return {
        "CLIPImageProcessorPil": torch.from_numpy(CLIPImageProcessorPil()(images=image, return_tensors="np")
                                                  ["pixel_values"][0]),
        "CLIPImageProcessor": CLIPImageProcessor()(images=image, return_tensors="pt")["pixel_values"][0],
        "open_clip": open_clip_transform(image),
    }


def pixel_errors(ours: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    return ((ours - reference) * STD).abs()


def test_constants_are_the_processors():
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    processor = CLIPImageProcessorPil()
    assert tuple(processor.image_mean) == OPENAI_CLIP_MEAN == tuple(OPENAI_DATASET_MEAN)
    assert tuple(processor.image_std) == OPENAI_CLIP_STD == tuple(OPENAI_DATASET_STD)


@pytest.mark.parametrize("shape", SHAPES)
def test_matches_the_original_processors_on_pil_images(shape):
    array = photo_like(*shape, seed=sum(shape))
    ours = preprocess_images(as_tensor([array]), SIZE, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)[0]
    for name, reference in reference_outputs(array).items():
        assert reference.shape == ours.shape == (3, SIZE, SIZE), name
        errors = pixel_errors(ours, reference)
        assert errors.max() <= MAX_ERROR, (name, errors.max().item() * 255)
        assert errors.pow(2).mean().sqrt() <= RMS_ERROR, (name, errors.pow(2).mean().sqrt().item() * 255)


def test_tolerances_catch_a_wrong_filter_or_crop_shift():
    array = photo_like(512, 768, seed=3)
    reference = reference_outputs(array)["CLIPImageProcessorPil"]
    mean, std = torch.tensor(OPENAI_CLIP_MEAN)[:, None, None], STD
    resized = F.interpolate(as_tensor([array]), size=resized_size(512, 768, SIZE), mode="bicubic", antialias=True)
    shifted = (resized[0, :, :, 57:57 + SIZE].clamp(0, 1) - mean) / std          # centre offset is 56
    bilinear = F.interpolate(as_tensor([array]), size=resized_size(512, 768, SIZE), mode="bilinear", antialias=True)
    bilinear = (bilinear[0, :, :, 56:56 + SIZE] - mean) / std
    for wrong in (shifted, bilinear):
        assert pixel_errors(wrong, reference).pow(2).mean().sqrt() > 3 * RMS_ERROR


@pytest.mark.parametrize("shape", SHAPES)
def test_tensor_mode_matches_torchvision_on_float_tensors(shape):
    # HPSv2's transform: ToTensor, then Resize(bicubic) and CenterCrop on the float tensor. Same kernel, no uint8
    # rounding on either side: only float32 rounding is left.
    transform = Compose([Resize(SIZE, interpolation=InterpolationMode.BICUBIC), CenterCrop(SIZE),
                         Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)])
    images = as_tensor([photo_like(*shape, seed=sum(shape))])
    ours = preprocess_images(images, SIZE, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, like_pil=False)
    torch.testing.assert_close(ours[0], transform(images[0]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", SHAPES + [(1000, 224), (225, 1000)])
def test_resized_size_is_the_processors(shape):
    expected = get_resize_output_image_size(np.zeros((*shape, 3)), SIZE, default_to_square=False,
                                            input_data_format="channels_last")
    assert resized_size(*shape, SIZE) == tuple(expected)


def test_gradient_is_the_derivative_of_the_preprocessing():
    # Values in [0.3, 0.7] and smooth: bicubic overshoot never reaches the clip, so the map is linear and gradcheck's
    # finite differences are exact up to float64 rounding.
    generator = torch.Generator().manual_seed(0)
    images = F.interpolate(torch.rand(1, 3, 4, 5, generator=generator, dtype=torch.float64), size=(12, 15),
                           mode="bilinear") * 0.4 + 0.3
    torch.autograd.gradcheck(lambda x: preprocess_images(x, 8, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
                             images.requires_grad_())


def test_squash_without_crop_keeps_the_whole_image():
    images = torch.zeros(1, 3, 20, 40)
    images[..., :, 30:] = 1.0    # a bright band in the right quarter, which a centre crop would cut away
    squashed = preprocess_images(images, 10, (0.0,) * 3, (1.0,) * 3, crop=False)
    cropped = preprocess_images(images, 10, (0.0,) * 3, (1.0,) * 3)
    assert squashed.shape == cropped.shape == (1, 3, 10, 10)
    assert squashed[..., -1].min() > 0.9 and cropped.max() < 0.1


def test_half_precision_in_half_precision_out():
    images = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    half = preprocess_images(images.to(torch.bfloat16), 32, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    full = preprocess_images(images, 32, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    assert half.dtype == torch.bfloat16 and full.dtype == torch.float32
    torch.testing.assert_close(half.float(), full, atol=3e-2, rtol=1e-2)   # bf16 inputs: 8 mantissa bits
