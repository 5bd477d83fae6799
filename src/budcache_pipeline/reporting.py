"""Plots and tables of searches and evaluations, written as files for DVC and MLflow.

Figures use matplotlib's Agg backend, so they render on machines without a display,
and each function returns the figure and optionally saves it, so notebooks, Kedro
nodes and the CLI share them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from budcache_pipeline.atomic import atomic_path  # noqa: E402
from budcache_pipeline.evaluation.table import IMAGE_QUALITY  # noqa: E402

TABLE_COLUMNS = (
    "method",
    "budget",
    "compute_steps_mean",
    "compute_steps_std",
    "block_evaluations_mean",
    "latent_mse",
    *IMAGE_QUALITY,
    "seconds_per_image",
    "speedup",
    "cpu_speedup",
)


def _finish(figure: Figure, path: str | Path | None) -> Figure:
    figure.tight_layout()
    if path is not None:
        path = Path(path)
        with atomic_path(path) as temporary:
            figure.savefig(temporary, dpi=120, format=path.suffix.lstrip(".") or "png")
    plt.close(figure)
    return figure


def _require(table: pd.DataFrame, columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ValueError(f"the table lacks column(s) {missing}: pass an evaluation table or a search history")


def plot_pareto(
    table: pd.DataFrame,
    metric: str = "latent_mse",
    cost: str = "compute_steps_mean",
    path: str | Path | None = None,
    exclude: Sequence[str] = ("uncached",),
) -> Figure:
    """Held-out `metric` against mean cost per image, one line per method: lower-left is better."""
    _require(table, ["method", cost, metric])
    figure, axis = plt.subplots(figsize=(7, 4.5))
    shown = table[~table["method"].isin(list(exclude))]
    for method, rows in shown.groupby("method", sort=False):
        rows = rows.sort_values(cost)
        axis.plot(rows[cost], rows[metric], marker="o", label=method)
    axis.set_xlabel(cost.replace("_", " "))
    axis.set_ylabel(f"held-out {metric.replace('_', ' ')}")
    if metric in ("latent_mse", "fid") and (shown[metric].dropna() > 0).all():
        axis.set_yscale("log")
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize=8)
    axis.set_title("quality against cost at matched budgets")
    return _finish(figure, path)


def plot_masks(masks: Mapping[int | str, Sequence[bool]], path: str | Path | None = None) -> Figure:
    """One row per policy (budget): dark cells compute the block stack, light cells reuse it."""
    if not masks:
        raise ValueError("no masks to plot")
    labels = list(masks)
    grid = np.array([[1.0 if m else 0.0 for m in masks[label]] for label in labels])
    figure, axis = plt.subplots(figsize=(max(5.0, grid.shape[1] * 0.25), 0.45 * len(labels) + 1.2))
    axis.imshow(grid, cmap="Greys", aspect="auto", vmin=0, vmax=1)
    axis.set_yticks(range(len(labels)), [str(label) for label in labels])
    axis.set_xticks(range(grid.shape[1]))
    axis.tick_params(axis="x", labelsize=6)
    axis.set_xlabel("step (dark = compute)")
    axis.set_ylabel("policy")
    return _finish(figure, path)


def plot_forecast_gains(
    policies: Mapping[str, tuple[Sequence[bool], Any]], path: str | Path | None = None
) -> Figure:
    """Per cached step, the median gain over channel groups (band: 10th-90th percentile) on the reused
    residual and on its slope, one line per policy with forecast gains (`forecast_gains.ForecastGains`)."""
    figure, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharex=True)
    shown = {label: (mask, gains) for label, (mask, gains) in policies.items() if gains is not None}
    for axis, term in zip(axes, ("residual", "slope")):
        for label, (mask, gains) in shown.items():
            values = np.array(getattr(gains, term))
            cached = np.array([not m for m in mask])
            steps = np.arange(len(mask))[cached]
            low, mid, high = np.percentile(values[cached], [10, 50, 90], axis=1)
            line = axis.plot(steps, mid, marker=".", label=label)[0]
            axis.fill_between(steps, low, high, color=line.get_color(), alpha=0.2)
        axis.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
        axis.set_title(f"gain on the {term}" + (" term" if term == "slope" else ""))
        axis.set_xlabel("cached step")
        axis.grid(True, alpha=0.3)
    if shown:
        axes[0].legend(fontsize=8)
    else:
        axes[0].text(0.5, 0.5, "no policy carries forecast gains", ha="center", va="center",
                     transform=axes[0].transAxes)
    return _finish(figure, path)


def plot_convergence(
    history: pd.DataFrame,
    path: str | Path | None = None,
    loss_columns: Sequence[str] = ("current_loss", "best_loss"),
    x: str = "iteration",
) -> Figure:
    """Loss of the search's current and best mask per iteration, one colour per start, and the temperature."""
    present = [c for c in loss_columns if c in history.columns]
    if x not in history.columns or not present:
        raise ValueError(f"history needs '{x}' and one of {list(loss_columns)}, has {list(history.columns)}")
    figure, axis = plt.subplots(figsize=(7, 4))
    groups = history.groupby("start", sort=False) if "start" in history.columns else [("search", history)]
    for number, (start, rows) in enumerate(groups):
        colour = f"C{number % 10}"
        for column in present:
            solid = column == present[-1]
            axis.plot(rows[x], rows[column], color=colour, alpha=1.0 if solid else 0.35,
                      label=f"{start} {column.replace('_', ' ')}" if solid else None)
    axis.set_xlabel(x)
    axis.set_ylabel("calibration loss")
    if (history[present].dropna() > 0).all().all():
        axis.set_yscale("log")
    if "temperature" in history.columns and history["temperature"].notna().any():
        first = next(iter(groups))[1]
        twin = axis.twinx()
        twin.plot(first[x], first["temperature"], color="grey", linestyle=":")
        twin.set_yscale("log")
        twin.set_ylabel("temperature (dotted)")
    axis.legend(fontsize=7)
    axis.grid(True, alpha=0.3)
    return _finish(figure, path)


def as_picture(image: torch.Tensor) -> torch.Tensor:
    """(C, H, W) as it is; a video (C, F, H, W) as its frames side by side."""
    if image.dim() == 4:
        return torch.cat(list(image.unbind(1)), dim=-1)
    return image


def plot_sample_grid(
    images: Mapping[str, torch.Tensor],
    path: str | Path | None = None,
    columns: int = 8,
) -> Figure:
    """One row per method, the same first `columns` images in each: (B, 1|3, H, W) in [0, 1], or videos
    (B, C, F, H, W) shown as frame strips."""
    if not images:
        raise ValueError("no images to plot")
    labels = list(images)
    count = min(columns, *(len(images[label]) for label in labels))
    figure, axes = plt.subplots(len(labels), count, figsize=(count * 0.9 + 1.5, len(labels) * 0.9 + 0.3), squeeze=False)
    for row, label in enumerate(labels):
        batch = images[label].detach().float().clamp(0, 1).cpu()
        for col in range(count):
            axis = axes[row][col]
            picture = as_picture(batch[col]).permute(1, 2, 0).numpy()
            axis.imshow(picture.squeeze(-1) if picture.shape[-1] == 1 else picture, cmap="gray", vmin=0, vmax=1)
            axis.set_xticks([])
            axis.set_yticks([])
        axes[row][0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    return _finish(figure, path)


def quality_table(table: pd.DataFrame, columns: Sequence[str] = TABLE_COLUMNS) -> str:
    """A fixed-width text table of an evaluation, budgets descending, best latent MSE first in each."""
    shown = [c for c in columns if c in table.columns]
    table = table.copy()
    for column in shown:
        if column != "method":
            table[column] = pd.to_numeric(table[column], errors="coerce")
    ordered = table.sort_values(["budget", "latent_mse"], ascending=[False, True])
    formatters = {
        "latent_mse": "{:.3e}".format,
        "fid": "{:.2f}".format,
        "psnr": "{:.2f}".format,
        "ssim": "{:.4f}".format,
        "judge_agreement": "{:.3f}".format,
        "seconds_per_image": lambda v: f"{v * 1000:.1f}ms",
        "speedup": "{:.2f}x".format,
        "cpu_speedup": "{:.2f}x".format,
        "compute_steps_mean": "{:.2f}".format,
        "compute_steps_std": "{:.2f}".format,
        "block_evaluations_mean": "{:.1f}".format,
    }
    return ordered[shown].to_string(index=False, formatters={k: v for k, v in formatters.items() if k in shown})


def plot_quality_bench(
    out: Path,
    table: pd.DataFrame,
    masks: dict[int, Sequence[bool]],
    histories: dict[int, pd.DataFrame],
    finals: dict[tuple[str, int], torch.Tensor],
    decode: Callable[[torch.Tensor], torch.Tensor] | None,
    steps: int,
) -> None:
    """The quality bench's figures in `out`: Pareto plots, the mask map, convergence per budget and, when
    latents decode, a sample grid per budget (the uncached images beside the four lowest-error methods)."""
    plot_pareto(table, path=out / "pareto_latent_mse.png")
    plot_pareto(table, cost="block_evaluations_mean", path=out / "pareto_block_evaluations.png")
    plot_masks({f"B={b}": mask for b, mask in masks.items()}, path=out / "masks.png")
    for budget, history in histories.items():
        plot_convergence(history, path=out / f"convergence_B{budget}.png")
        if decode is not None:
            rows = table[table["budget"] == budget].sort_values("latent_mse")
            shown = {"uncached": decode(finals[("uncached", steps)])}
            shown.update({m: decode(finals[(m, budget)]) for m in rows["method"].head(4)})
            plot_sample_grid(shown, path=out / f"samples_B{budget}.png")
