"""`budcache bench ablation` on a reduced setting: every variant at every budget, costs that add up, bad input refused."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from budcache_pipeline.bench_ablation import COLUMNS, VARIANTS, bench_ablation, format_ablation, kedro_search_options
from budcache_pipeline.console import main
from budcache_pipeline.models.spec import load_adapter

ROOT = Path(__file__).parents[1]
SMALL = {"starts": ["dp", "uniform"], "sa_iterations": 6, "hc_rounds": 2, "screen_samples": 2, "dp_samples": 2}


@pytest.fixture(scope="module")
def table():
    return bench_ablation((4, 2), steps=8, calibration_size=4, holdout_size=4, kedro_options=SMALL,
                          adapter=load_adapter({}), progress=lambda _: None)


def test_every_variant_is_searched_at_every_budget_and_scored_on_held_out_pairs(table):
    assert list(table.columns) == COLUMNS
    assert list(table["budget"].unique()) == [4, 2]
    assert set(table["variant"]) == {"kedro", *VARIANTS}
    assert all(mask.count("1") == budget and mask[0] == "1" for mask, budget in zip(table["mask"], table["budget"]))
    assert (table["holdout_mse"] > 0).all() and (table["calibration_rollouts"] > 0).all()
    assert (table[table["variant"] == "kedro"]["holdout_vs_kedro"] == 1.0).all()
    for budget, rows in table.groupby("budget"):
        by = rows.set_index("variant")
        # Hill climbing only adds work to the DP start, and never ends above where it started.
        assert by.loc["dp", "calibration_rollouts"] < by.loc["dp+hc", "calibration_rollouts"]
        assert by.loc["dp+hc", "calibration_mse"] <= by.loc["dp", "calibration_mse"]
        assert by.loc["dp_linear+hc", "calibration_mse"] <= by.loc["dp_linear", "calibration_mse"]
        assert by.loc["uniform+sa+hc", "calibration_rollouts"] < by.loc["kedro", "calibration_rollouts"]
    assert "mean calibration rollouts per budget: kedro" in format_ablation(table)
    assert (table["seed"] == 0).all() and "geometric mean over seeds" not in format_ablation(table)


def test_each_seed_is_compared_with_the_default_at_the_same_seed():
    table = bench_ablation((3,), steps=8, calibration_size=4, holdout_size=4, kedro_options=SMALL,
                           variants={"dp": VARIANTS["dp"]}, seeds=(0, 5, 0), adapter=load_adapter({}),
                           progress=lambda _: None)
    assert list(table["seed"]) == [0, 0, 5, 5], "each seed once, every variant at each"
    for seed, rows in table.groupby("seed"):
        by = rows.set_index("variant")
        assert by.loc["kedro", "holdout_vs_kedro"] == 1.0
        assert by.loc["dp", "holdout_vs_kedro"] == pytest.approx(by.loc["dp", "holdout_mse"] / by.loc["kedro", "holdout_mse"])
    assert "held-out MSE / default, geometric mean over seeds" in format_ablation(table)
    with pytest.raises(ValueError, match="seeds must be a non-empty list of integers"):
        bench_ablation((3,), steps=8, kedro_options=SMALL, seeds=(), adapter=object())


def test_the_kedro_default_is_read_from_the_projects_conf_base(tmp_path):
    options, forecast = kedro_search_options(ROOT)
    assert options["starts"] == ["dp"] and options["sa_iterations"] > 0 and forecast == "linear"
    assert "checkpoint_dir" not in options and "processes" not in options
    with pytest.raises(FileNotFoundError, match="base not found"):
        kedro_search_options(tmp_path)


def test_an_environment_overrides_the_kedro_default(tmp_path):
    shutil.copytree(ROOT / "conf" / "base", tmp_path / "conf" / "base")
    (tmp_path / "conf" / "local").mkdir()
    (tmp_path / "conf" / "fast").mkdir()
    (tmp_path / "conf" / "fast" / "parameters.yml").write_text("search:\n  sa_iterations: 7\n  forecast: reuse\n")
    base, _ = kedro_search_options(tmp_path)
    options, forecast = kedro_search_options(tmp_path, "fast")
    assert options["sa_iterations"] == 7 and forecast == "reuse"
    assert {k: v for k, v in options.items() if k != "sa_iterations"} == {
        k: v for k, v in base.items() if k != "sa_iterations"
    }, "the environment overrides only what it names"


def test_bad_budgets_are_refused_with_a_message(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "ablation", "--budgets", "5,x"])
    assert exit_info.value.code == 2 and "comma-separated positive integers" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "ablation", "--seeds", "0,one"])
    assert exit_info.value.code == 2 and "comma-separated integers" in capsys.readouterr().err
    with pytest.raises(ValueError, match="between 1 and steps - 1"):
        bench_ablation((8,), steps=8, kedro_options=SMALL, adapter=object())


def test_calibration_sets_reuse_the_prompts_with_other_noise_and_each_is_compared_with_its_own_default():
    table = bench_ablation((3,), steps=8, calibration_size=4, holdout_size=4, kedro_options=SMALL,
                           variants={"lean": VARIANTS["lean"]}, calibration_sets=2, adapter=load_adapter({}),
                           progress=lambda _: None)
    assert list(table["calibration_set"]) == [0, 0, 1, 1] and (table["seed"] == 0).all()
    kedro = table[table["variant"] == "kedro"].set_index("calibration_set")
    assert kedro.loc[0, "calibration_mse"] != kedro.loc[1, "calibration_mse"], "another set, other noise"
    for number, rows in table.groupby("calibration_set"):
        by = rows.set_index("variant")
        assert by.loc["lean", "holdout_vs_kedro"] == pytest.approx(by.loc["lean", "holdout_mse"] / by.loc["kedro", "holdout_mse"])
    assert "geometric mean over seeds and calibration sets" in format_ablation(table)
    with pytest.raises(ValueError, match="calibration_sets must be an integer >= 1"):
        bench_ablation((3,), steps=8, kedro_options=SMALL, calibration_sets=0, adapter=load_adapter({}))


def test_the_command_refuses_unknown_variants(capsys):
    from budcache_pipeline.console import main

    assert main(["bench", "ablation", "--budgets", "3", "--variants", "lean,nope"]) == 2
    assert "unknown variant(s) ['nope']" in capsys.readouterr().err
