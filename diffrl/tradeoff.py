"""The reward/diversity trade-off plot of an evaluation: one panel per reward, one point per checkpoint.

Reward fine-tuning moves checkpoints up (more reward) and usually left (less diversity); a checkpoint worth keeping is
high without having moved far left. Error bars are standard errors over prompts, so overlapping bars mean the
prompts cannot tell two checkpoints apart.
"""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

DIVERSITY_PREFERENCE = ("clip", "dreamsim", "lpips", "pixel", "latent")  # the x axis: the most semantic metric present


def plot_tradeoff(rows: list[dict]) -> Image.Image:
    """Rows as in eval.json's "checkpoints" -> a PNG-ready image (matplotlib's Agg canvas, no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metric = next(name for name in DIVERSITY_PREFERENCE if name in rows[0]["diversity"])
    rewards = list(rows[0]["rewards"])
    figure = Figure(figsize=(5 * len(rewards), 4.2), dpi=120, layout="constrained")
    FigureCanvasAgg(figure)
    for axes, reward in zip(figure.subplots(1, len(rewards), squeeze=False)[0], rewards):
        _panel(axes, rows, reward, metric)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def _series(rows: list[dict]) -> list[tuple[str, list[dict]]]:
    """One line per run (its model's base first, then its checkpoints in training order); a lone base is its own."""
    bases = {row["model"]: row for row in rows if row["checkpoint"] is None}
    runs: dict[tuple, list[dict]] = {}
    for row in rows:
        if row["checkpoint"] is not None:
            runs.setdefault((row["model"], row.get("run")), []).append(row)
    series = [(Path(run).name if run else model, [bases[model]] * (model in bases) + checkpoints)
              for (model, run), checkpoints in runs.items()]
    covered = {model for model, _ in runs}
    return series + [(model, [base]) for model, base in bases.items() if model not in covered]


def _panel(axes, rows: list[dict], reward: str, metric: str) -> None:
    """One reward against the diversity metric; each run's checkpoints joined in training order, bases as stars."""
    series, drawn_bases = _series(rows), set()
    for color_index, (label, series_rows) in enumerate(series):
        color = f"C{color_index}"
        x = [row["diversity"][metric]["mean"] for row in series_rows]
        y = [row["rewards"][reward]["mean"] for row in series_rows]
        axes.plot(x, y, color=color, alpha=0.4, linewidth=1, label=label if len(series) > 1 else None)
        for row, x_value, y_value in zip(series_rows, x, y):
            base = row["checkpoint"] is None
            if base and row["model"] in drawn_bases:   # a base shared by several runs: one star, one label
                continue
            if base:
                drawn_bases.add(row["model"])
            axes.errorbar(x_value, y_value, xerr=row["diversity"][metric]["standard_error"],
                          yerr=row["rewards"][reward]["standard_error"], color="black" if base else color,
                          capsize=3, marker="*" if base else "o", markersize=12 if base else 6, linestyle="none")
            text = "base" if base else (row["name"] if row["step"] is None else f"step {row['step']}")
            axes.annotate(text, (x_value, y_value), textcoords="offset points", xytext=(5, 5), fontsize=8)
    if len(series) > 1:
        axes.legend(fontsize=8)
    axes.set_xlabel(f"{metric} diversity (mean pairwise distance, ± s.e.)")
    axes.set_ylabel(f"{reward} (mean ± s.e. over prompts)")
    axes.set_title(f"{reward} vs {metric} diversity (★ = base model)")
    axes.grid(alpha=0.3)
