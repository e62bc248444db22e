"""scripts/make_shapes_dataset.py: the shipped dataset is exactly what the script writes, and it is correct data."""

from __future__ import annotations

import torch

from diffrl.image_data import image_tensor, load_image_records
from rewards.shapes import ShapesAccuracyReward
from tests.fixtures import script_fixture

SHIPPED = "assets/datasets/shapes"


make_dataset = script_fixture("make_shapes_dataset")


def test_shipped_dataset_is_the_scripts_output(make_dataset, tmp_path):
    assert make_dataset.main(["--output", str(tmp_path)]) == 0
    shipped = make_dataset.REPO_ROOT / SHIPPED
    written = sorted(path.name for path in tmp_path.iterdir())
    assert written == sorted(path.name for path in shipped.iterdir()) and len(written) == 18 * 16 + 1
    assert all((tmp_path / name).read_bytes() == (shipped / name).read_bytes() for name in written)


def test_every_image_loads_and_shows_its_prompt(make_dataset, tmp_path):
    make_dataset.main(["--per-prompt", "3", "--output", str(tmp_path)])
    records = load_image_records(tmp_path)
    assert len(records) == 18 * 3
    images = torch.stack([image_tensor(record.path, 64) for record in records]) / 2 + 0.5
    accuracy = ShapesAccuracyReward()(images, [record.prompt for record in records])
    assert accuracy.mean().item() == 1.0, accuracy
