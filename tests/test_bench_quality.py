"""`budcache bench quality` on a reduced setting: disjoint sets, every method evaluated, the JSON the issue asks for."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

import budcache_pipeline.bench_quality as quality_bench
from budcache_pipeline.bench_quality import bench_quality
from budcache_pipeline.bench_quality_report import format_quality_table
from budcache_pipeline.models.digits.prompt_sets import benchmark_prompt_sets as quality_prompt_sets
from budcache_pipeline.console import main
from budcache_pipeline.search import SearchConfig
from tests.conftest import tiny_flux_pipeline
from tests.fakes import flux_adapter


def test_prompt_sets_are_disjoint_and_balanced():
    calibration, holdout = quality_prompt_sets(32, 64)
    assert len(calibration) == 32 and len(holdout) == 64
    assert not {p for p, _, _ in calibration} & {p for p, _, _ in holdout}
    assert not {s for _, _, s in calibration} & {s for _, _, s in holdout}
    assert sorted({d for _, d, _ in calibration}) == list(range(10))
    assert len({p for p, _, _ in calibration}) == 32, "calibration wordings are all different"
    assert quality_prompt_sets(32, 64) == (calibration, holdout)
    with pytest.raises(ValueError, match="at least one pair"):
        quality_prompt_sets(0, 4)


@pytest.fixture(scope="module")
def figures(tmp_path_factory):
    return tmp_path_factory.mktemp("bench")


@pytest.fixture(scope="module")
def result(figures) -> dict:
    return bench_quality(
        budgets=(4, 2),
        steps=8,
        calibration_size=3,
        holdout_size=3,
        adapter=flux_adapter(tiny_flux_pipeline()),
        size=64,
        baselines=("uniform", "teacache", "first_block_cache", "first_block_cache@blocks"),
        search=SearchConfig(starts=("uniform",), sa_iterations=6, hc_rounds=1),
        align_iterations=2,
        timing_images=1,
        out_dir=str(figures),
        progress=lambda _: None,
    )


@pytest.mark.slow
def test_reduced_bench_reports_every_figure(result, figures):
    assert set(result["budgets"]) == {"4", "2"}
    for budget in ("4", "2"):
        entry = result["budgets"][budget]
        for key in ("budcache_mse", "best_heuristic", "best_heuristic_mse", "ratio", "multi_over_single"):
            assert key in entry
        assert entry["ratio"] == pytest.approx(entry["budcache_mse"] / entry["best_heuristic_mse"])
        assert entry["best_heuristic"] in ("uniform", "teacache", "first_block_cache")
    assert "alignment" in result["budgets"]["2"], "B/N = 0.25 is tight enough to align"
    assert "alignment" not in result["budgets"]["4"]
    assert 0 < result["reuse_over_naive"] <= 1
    assert result["multi_over_single"] > 0
    assert set(result["search_seconds"]) == {"4", "2"}
    assert result["settings"]["search_budget_settings"] == {"10": {"dp_samples": 2}}
    rows = pd.DataFrame(result["rows"])
    assert rows.iloc[0]["method"] == "uncached"
    for method in ("budcache", "budcache_single", "uniform", "teacache", "first_block_cache"):
        assert set(rows[rows["method"] == method]["budget"]) == {4, 2}
    assert len(rows.drop_duplicates(["method", "budget"])) == len(rows)
    json.dumps(result, allow_nan=False)
    assert (figures / "reference" / "calibration" / "manifest.json").is_file()
    for name in ("pareto_latent_mse", "pareto_block_evaluations", "masks", "convergence_B4", "convergence_B2"):
        assert (figures / f"{name}.png").is_file()
    text = format_quality_table(result)
    assert "budcache" in text and "multi/single" in text and "rollouts" in text
    assert f"{result['budgets']['4']['search_calibration_rollouts']:.2f}" in text


@pytest.mark.slow
def test_cli_writes_csv_and_json(result, tmp_path, monkeypatch, capsys):
    asked = []
    monkeypatch.setattr(
        quality_bench, "bench_quality",
        lambda forecast, out_dir, fid_samples: asked.append((forecast, fid_samples)) or result,
    )
    code = main(["bench", "quality", "--json", str(tmp_path / "q.json"), "--csv", str(tmp_path / "q.csv")])
    assert code == 0 and asked == [("linear", 2048)]
    assert json.loads((tmp_path / "q.json").read_text())["budgets"].keys() == {"4", "2"}
    table = pd.read_csv(tmp_path / "q.csv")
    assert len(table) == len(result["rows"]) and "latent_mse" in table.columns
    assert "ratio" in capsys.readouterr().out


@pytest.mark.slow
def test_cli_passes_the_forecast_and_refuses_unknown_ones(result, monkeypatch, capsys):
    asked = []
    monkeypatch.setattr(
        quality_bench, "bench_quality",
        lambda forecast, out_dir, fid_samples: asked.append((forecast, fid_samples)) or result,
    )
    assert main(["bench", "quality", "--forecast", "reuse", "--fid-samples", "0"]) == 0 and asked == [("reuse", 0)]
    with pytest.raises(SystemExit):
        main(["bench", "quality", "--forecast", "cubic"])
    assert "invalid choice: 'cubic'" in capsys.readouterr().err


def test_bad_budgets_are_refused():
    with pytest.raises(ValueError, match="budgets must lie between 1 and steps - 1"):
        bench_quality(budgets=(28,), steps=28, adapter=object())


def test_a_single_fid_sample_is_refused():
    with pytest.raises(ValueError, match="fid_samples must be 0"):
        bench_quality(budgets=(4,), steps=8, adapter=object(), fid_samples=1)


def test_the_bench_searches_with_the_kedro_defaults_budget_settings():
    conf = Path(__file__).parents[1] / "conf" / "base" / "parameters_search.yml"
    kedro = yaml.safe_load(conf.read_text())["search"]["budget_settings"]
    assert quality_bench.QUALITY_BUDGET_SETTINGS == kedro
