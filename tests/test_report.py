"""report.html: sections on a hand-built run folder, graceful gaps, and a real headless Chromium rendering it."""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from diffrl.report import write_report
from diffrl.training import train
from tests.fixtures import fast_config

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
TINY_RUN = ["train.steps=2", "log.grid_every=1", "log.checkpoint_every=2", "sample.num_steps=2",
            "sample.batch_size=2"]


class Page(HTMLParser):
    """The parts of a page the tests look at: headings, <img> attributes, table cells, the body's attributes."""

    def __init__(self, text: str):
        super().__init__()
        self.headings, self.images, self.cells, self.body, self.tags = [], [], [], {}, []
        self._text_of = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.images.append(dict(attrs))
        elif tag == "body":
            self.body = dict(attrs)
        elif tag in ("h2", "td"):
            self._text_of = tag

    def handle_data(self, data):
        if self._text_of == "h2":
            self.headings.append(data)
        elif self._text_of == "td":
            self.cells.append(data)
        self._text_of = None


def decode_png(source: str) -> Image.Image:
    prefix = "data:image/png;base64,"
    assert source.startswith(prefix), source[:40]
    image = Image.open(io.BytesIO(base64.b64decode(source[len(prefix):], validate=True)))
    assert image.format == "PNG"
    image.load()  # decodes every pixel: a truncated PNG raises here
    return image


def hand_built_run(root: Path) -> Path:
    """A run folder as train writes it mid-run: config, three metric rows, one grid, no checkpoints."""
    root.mkdir()
    (root / "config.yaml").write_text("model: tiny\nprompts: '<b>not bold</b> & co'\n", encoding="utf-8")
    rows = [{"step": step, "reward_mean": 0.4 + 0.1 * step, "loss": -0.1 * step, "reward/brightness": 0.1 * step}
            for step in (1, 2, 3)]
    (root / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows) + '{"step": 4, "rew',
                                        encoding="utf-8")  # a line cut short by a crash mid-write
    (root / "grids").mkdir()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(root / "grids" / "step-000003.png")
    return root


def test_report_of_a_hand_built_run_has_curves_grid_and_escaped_config(tmp_path):
    run_dir = hand_built_run(tmp_path / "run")
    path = write_report(run_dir)
    assert path == run_dir / "report.html"
    text = path.read_text(encoding="utf-8")
    page = Page(text)
    assert page.headings == ["Reward and loss", "Latest grids", "Config"]
    assert "&lt;b&gt;not bold&lt;/b&gt; &amp; co" in text and "<b>" not in text
    assert "3 logged steps, last step 3" in text and "step 3 (step-000003.png)" in text
    curves, grid = (decode_png(image["src"]) for image in page.images)
    assert curves.width > 400 and grid.size == (64, 48)
    assert "script" not in page.tags and "http" not in text  # self-contained, no JavaScript
    assert [p.name for p in run_dir.iterdir() if p.name.startswith(".")] == []  # no temp file left behind


def test_report_without_metrics_or_grids_is_still_a_valid_page(tmp_path):
    text = write_report(tmp_path).read_text(encoding="utf-8")
    page = Page(text)
    assert page.headings == ["Reward and loss", "Latest grids", "Config"]
    assert page.images == [] and text.rstrip().endswith("</html>")
    assert "No metrics yet" in text and "No grids yet" in text and "config.yaml has not been written yet" in text


def test_report_includes_an_evaluation_folder_given_or_found_in_the_run(tmp_path):
    run_dir = hand_built_run(tmp_path / "run")
    evaluation_dir = run_dir / "eval"
    evaluation_dir.mkdir()
    (evaluation_dir / "eval.json").write_text("{}")
    (evaluation_dir / "eval.csv").write_text("checkpoint,step,brightness_mean\nbase,0,0.47123456\nstep-000003,3,0.6\n")
    Image.new("RGB", (30, 20), "blue").save(evaluation_dir / "tradeoff.png")  # grid.png missing: a note instead
    for text in (write_report(run_dir).read_text(), write_report(run_dir, evaluation_dir).read_text()):
        page = Page(text)
        assert page.headings == ["Reward and loss", "Latest grids", "Evaluation", "Config"]
        assert decode_png(page.images[-1]["src"]).size == (30, 20)
        assert page.cells == ["base", "0", "0.4712", "step-000003", "3", "0.6"]
        assert "grid.png is missing" in text


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("tiny-run")
    train(fast_config(*TINY_RUN), output_dir, quiet=True)
    return output_dir


# Appended to a copy of the page (the report itself has no JavaScript): once everything has loaded, each <img>
# records whether Chromium decoded it, which --dump-dom then shows.
PROBE = """<script>
addEventListener("load", () => {
  for (const image of document.images)
    image.dataset.probe = image.complete && image.naturalWidth > 0 ? image.naturalWidth + "x" + image.naturalHeight
                                                                    : "broken";
  document.body.dataset.probe = "done";
});
</script>
"""


def chromium(*arguments: str, profile: Path) -> str:
    command = [CHROMIUM, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars", "--no-first-run",
               f"--user-data-dir={profile}", *arguments]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium, chromium-browser or google-chrome on PATH; install one to "
                    "run this browser check of report.html (Debian/Ubuntu: sudo apt-get install chromium)")
def test_report_of_a_tiny_run_renders_in_headless_chromium(tiny_run, tmp_path):
    report = tiny_run / "report.html"
    page = Page(report.read_text(encoding="utf-8"))
    sizes = [decode_png(image["src"]).size for image in page.images]
    assert len(sizes) == 1 + 3  # the curves and the newest three of the grids of steps 0, 1, 2

    probed = tmp_path / "probed.html"
    probed.write_text(report.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8")
    dom = Page(chromium("--virtual-time-budget=10000", "--dump-dom", probed.as_uri(), profile=tmp_path / "profile"))
    assert dom.body.get("data-probe") == "done", "the probe script did not run; the page never finished loading"
    assert [image.get("data-probe") for image in dom.images] == [f"{width}x{height}" for width, height in sizes]

    screenshot = tmp_path / "report.png"
    chromium("--window-size=1000,1600", f"--screenshot={screenshot}", report.as_uri(), profile=tmp_path / "profile")
    pixels = Image.open(screenshot).convert("L")
    assert pixels.size == (1000, 1600)
    assert sum(pixels.histogram()[:200]) > 0.05 * 1000 * 1600, "the page rendered (almost) blank"
    assert len(set(Image.open(screenshot).convert("RGB").getdata())) > 500  # curves and images, not just text
