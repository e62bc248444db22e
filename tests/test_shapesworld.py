"""diffrl.shapesworld and its statistics: determinism, prompts round trip, ground truth, layout distances."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from diffrl.shapesworld import (FAMILIES, ObjectGroup, PromptSpec, Scene, ShapeObject, parse_prompt, prompt_text,
                                render, sample_batch, samples_for_prompt, to_tensor)
from diffrl.shapesworld_statistics import layout, layout_distances, total_variation


@pytest.mark.parametrize("family", FAMILIES + ("mixed",))
def test_batch_is_deterministic_in_seed_and_index(family):
    whole = sample_batch(family, 6, seed=3, resolution=32)
    again = sample_batch(family, 6, seed=3, resolution=32)
    tail = sample_batch(family, 3, seed=3, resolution=32, start=3)
    other = sample_batch(family, 6, seed=4, resolution=32)
    assert whole.images.shape == (6, 3, 32, 32) and whole.images.dtype == torch.float32
    assert 0 <= whole.images.min() and whole.images.max() <= 1
    assert torch.equal(whole.images, again.images) and whole.prompts == again.prompts
    assert torch.equal(whole.images[3:], tail.images) and whole.scenes[3:] == tail.scenes
    assert whole.scenes != other.scenes


def test_same_scene_at_every_resolution():
    assert sample_batch("pair", 4, 0, 32).scenes == sample_batch("pair", 4, 0, 64).scenes
    assert sample_batch("pair", 1, 0, 64).images.shape == (1, 3, 64, 64)


@pytest.mark.parametrize("family", FAMILIES)
def test_prompts_parse_back_to_their_spec_and_scenes_obey_it(family):
    batch = sample_batch(family, 40, seed=0, resolution=32)
    for prompt, spec, scene in zip(batch.prompts, batch.specs, batch.scenes):
        assert parse_prompt(prompt) == spec
        kinds = sorted((o.colour, o.shape) for o in scene.objects)
        assert kinds == sorted((g.colour, g.shape) for g in spec.groups for _ in range(g.count))
        for a in scene.objects:
            assert 0 < a.x - a.size / 2 and a.x + a.size / 2 < 1 and 0 < a.y - a.size / 2 and a.y + a.size / 2 < 1
        if spec.relation:
            a, b = scene.objects
            dx, dy = b.x - a.x, b.y - a.y
            along = {"left of": dx, "right of": -dx, "above": dy, "below": -dy}[spec.relation]
            assert along >= 0.1


def test_parser_grammar():
    assert parse_prompt("an orange circle") == PromptSpec((ObjectGroup("orange", "circle"),))
    assert parse_prompt(" Three Blue Triangles. ") == PromptSpec((ObjectGroup("blue", "triangle", 3),))
    assert parse_prompt("a red square below a green diamond") == PromptSpec(
        (ObjectGroup("red", "square"), ObjectGroup("green", "diamond")), "below")
    for outside in ["a cat", "two red circle", "a red circles", "five red circles", "a red circle and a red square",
                    "two red circles left of a blue square", "a pink circle", ""]:
        assert parse_prompt(outside) is None, outside


def test_rendered_colours_are_the_palette():
    scene = Scene("white", (ShapeObject("red", "square", 0.5, 0.5, 0.5),))
    image = render(scene, 32)
    assert tuple(image[16, 16]) == (220, 40, 40) and tuple(image[1, 1]) == (235, 235, 235)


def test_generation_is_fast():
    import time
    start = time.perf_counter()
    sample_batch("mixed", 64, seed=0, resolution=64)
    assert time.perf_counter() - start < 0.5      # measured ~0.03 s on one core


def test_total_variation_by_hand():
    bins = np.array([0.0, 0.5, 1.0])
    assert total_variation(np.array([0.1, 0.2]), np.array([0.7, 0.8]), bins) == 1.0
    assert total_variation(np.array([0.1, 0.7]), np.array([0.2, 0.8]), bins) == 0.0
    assert total_variation(np.array([0.1, 0.2, 0.3, 0.7]), np.array([0.1, 0.7]), bins) == 0.25


def test_data_against_data_is_near_zero_and_doubled_objects_are_far():
    data = layout(samples_for_prompt("two red circles", 48, seed=0).images)
    fresh = samples_for_prompt("two red circles", 48, seed=1)
    near = layout_distances(layout(fresh.images), data)
    doubled = [dataclasses.replace(s, objects=tuple(dataclasses.replace(o, size=2 * o.size) for o in s.objects))
               for s in fresh.scenes]
    far = layout_distances(layout(to_tensor([render(s, 64) for s in doubled])), data)
    assert near["size_tv"] < 0.2 and near["background_tv"] < 0.2 and near["count_tv"] == 0
    assert 0.9 < near["size_ratio"] < 1.1
    assert far["size_tv"] > 0.8 and far["size_ratio"] > 1.8


def test_background_change_is_seen():
    data = samples_for_prompt("a blue square", 24, seed=0)
    black = [dataclasses.replace(s, background="black") for s in data.scenes]
    moved = layout_distances(layout(to_tensor([render(s, 64) for s in black])), layout(data.images))
    assert moved["background_tv"] > 0.5 and moved["size_tv"] < 0.2
