"""Reports render to files without a display and refuse tables they cannot draw."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from budcache_pipeline.reporting import (
    plot_convergence,
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
