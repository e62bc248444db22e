"""The reward/diversity trade-off plot of an evaluation: one panel per reward, one point per checkpoint.

Reward fine-tuning moves checkpoints up (more reward) and usually left (less diversity); a checkpoint worth keeping is
high without having moved far left. Error bars are standard errors over prompts, so overlapping bars mean the
prompts cannot tell two checkpoints apart.
"""

from __future__ import annotations

import io

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


def _panel(axes, rows: list[dict], reward: str, metric: str) -> None:
    """One reward against the diversity metric; checkpoints of a model joined in training order, bases as stars."""
    by_model: dict[str, list[dict]] = {}
    for row in rows:
        by_model.setdefault(row["model"], []).append(row)
    for color_index, model_rows in enumerate(by_model.values()):
        color = f"C{color_index}"
        x = [row["diversity"][metric]["mean"] for row in model_rows]
        y = [row["rewards"][reward]["mean"] for row in model_rows]
        axes.plot(x, y, color=color, alpha=0.4, linewidth=1)
        for row, x_value, y_value in zip(model_rows, x, y):
            base = row["checkpoint"] is None
            axes.errorbar(x_value, y_value, xerr=row["diversity"][metric]["standard_error"],
                          yerr=row["rewards"][reward]["standard_error"], color=color, capsize=3,
                          marker="*" if base else "o", markersize=12 if base else 6, linestyle="none")
            label = row["name"] if base or row["step"] is None else f"step {row['step']}"
            axes.annotate(label, (x_value, y_value), textcoords="offset points", xytext=(5, 5), fontsize=8)
    axes.set_xlabel(f"{metric} diversity (mean pairwise distance, ± s.e.)")
    axes.set_ylabel(f"{reward} (mean ± s.e. over prompts)")
    axes.set_title(f"{reward} vs {metric} diversity (★ = base model)")
    axes.grid(alpha=0.3)
