"""scripts/shapesworld_benchmark.py at micro scale: it trains, reuses a finished run, and writes a consistent table."""

from __future__ import annotations

import json

from tests.fixtures import script_fixture

shapes_benchmark = script_fixture("shapesworld_benchmark")


def test_micro_benchmark_writes_the_table_and_reuses_finished_runs(shapes_benchmark, tmp_path):
    args = ["--trainers", "draft", "--reward-queries", "16", "--samples-per-prompt", "2", "--output", str(tmp_path)]
    assert shapes_benchmark.main(args) == 0
    result = json.loads((tmp_path / "benchmark.json").read_text())
    base, draft = result["rows"]
    assert (base["name"], draft["name"]) == ("base", "draft")
    assert (draft["steps"], draft["images_scored"]) == (2, 16)   # 16 queries / the demo's batch of 8
    for row in (base, draft):
        for split in ("train", "held_out"):
            assert 0.0 <= row[split]["shapes_accuracy"] <= 1.0 and row[split]["pixel_diversity"] > 0
            assert all(0.0 <= row[split][key] <= 1.0 for key in ("size_tv", "x_tv", "y_tv", "background_tv"))
    table = (tmp_path / "benchmark.md").read_text().splitlines()
    assert len(table) == 4 and table[2].startswith("| base |") and table[3].startswith("| draft | 2 | 16 |")
    assert all((tmp_path / name).is_file() for name in ("tradeoff.png", "grid.png"))

    timing = (tmp_path / "draft" / "benchmark_timing.json").read_text()
    assert shapes_benchmark.main(args) == 0          # the finished run is reused, not trained again
    assert (tmp_path / "draft" / "benchmark_timing.json").read_text() == timing
    assert json.loads((tmp_path / "benchmark.json").read_text())["rows"] == result["rows"]   # fixed seeds
