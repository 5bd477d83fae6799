"""Reports render to files without a display and refuse tables they cannot draw."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from budcache_pipeline.forecast_gains import ForecastGains
from budcache_pipeline.reporting import (
    plot_convergence,
    plot_forecast_gains,
    plot_masks,
    plot_pareto,
    plot_sample_grid,
    quality_table,
)


def evaluation_table() -> pd.DataFrame:
    rows = [{"method": "uncached", "budget": 28, "compute_steps_mean": 28.0, "latent_mse": 0.0}]
    for method, scale in (("budcache", 1.0), ("uniform", 2.0), ("teacache", 3.0)):
        for budget in (14, 10, 7, 5):
            rows.append(
                {"method": method, "budget": budget, "compute_steps_mean": float(budget),
                 "latent_mse": scale * 1e-3 / budget}
            )
    return pd.DataFrame(rows)


def test_figures_are_written(tmp_path):
    table = evaluation_table()
    plot_pareto(table, path=tmp_path / "pareto.png")
    plot_masks({14: [True, False] * 14, 5: [True] + [False] * 22 + [True] * 4 + [False]}, path=tmp_path / "masks.png")
    history = pd.DataFrame(
        {"iteration": list(range(10)) * 2, "start": ["uniform"] * 10 + ["dp"] * 10,
         "temperature": [0.05 * 0.5**i for i in range(10)] * 2,
         "current_loss": [1.0 / (i + 1) for i in range(20)], "best_loss": [1.0 / (i + 1) for i in range(20)]}
    )
    plot_convergence(history, path=tmp_path / "convergence.png")
    plot_sample_grid({"uncached": torch.rand(4, 1, 16, 16), "budcache": torch.rand(4, 1, 16, 16)},
                     path=tmp_path / "grid.png", columns=3)
    for name in ("pareto", "masks", "convergence", "grid"):
        assert (tmp_path / f"{name}.png").stat().st_size > 1000


def test_forecast_gains_are_drawn_per_cached_step_and_their_absence_is_said(tmp_path):
    mask = [True, False, False, True, False, False]
    gains = ForecastGains(tuple((1.0 + 0.1 * i, 0.9) for i in range(6)), tuple((2.0, 0.5 * i) for i in range(6)))
    figure = plot_forecast_gains({"B=2": (mask, gains), "B=3": ([True, False] * 3, None)}, tmp_path / "gains.png")
    residual_axis, slope_axis = figure.axes
    (line,) = residual_axis.get_lines()[:1]
    assert list(line.get_xdata()) == [1, 2, 4, 5], "only cached steps, only policies with gains"
    assert list(line.get_ydata()) == pytest.approx([1.0, 1.05, 1.15, 1.2]), "the median over channel groups"
    assert slope_axis.get_lines()[0].get_ydata()[0] == pytest.approx(1.25)
    assert (tmp_path / "gains.png").stat().st_size > 1000
    empty = plot_forecast_gains({"B=3": ([True, False] * 3, None)})
    assert "no policy carries forecast gains" in [t.get_text() for t in empty.axes[0].texts]


def test_quality_table_orders_budgets_and_losses():
    text = quality_table(evaluation_table())
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["method", "budget", "compute_steps_mean"]
    assert lines[1].split()[:2] == ["uncached", "28"]
    assert lines[2].split()[:2] == ["budcache", "14"]


def test_unusable_inputs_are_refused():
    with pytest.raises(ValueError, match="lacks column"):
        plot_pareto(pd.DataFrame({"method": ["a"]}))
    with pytest.raises(ValueError, match="history needs"):
        plot_convergence(pd.DataFrame({"step": [1]}))
    with pytest.raises(ValueError, match="no masks"):
        plot_masks({})
    with pytest.raises(ValueError, match="no images"):
        plot_sample_grid({})
