"""The search's settings: checked when made, built from the Kedro parameters, recorded and read back unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from budcache_pipeline.search import SearchConfig, SearchSetupError

BASE = yaml.safe_load((Path(__file__).parents[2] / "conf" / "base" / "parameters_search.yml").read_text())["search"]


def test_the_defaults_record_what_policies_have_always_recorded():
    assert SearchConfig().to_dict() == {
        "starts": ["dp", "uniform", "front_loaded", "random"], "forced": [0], "seed": 0, "sa_iterations": 200,
        "hc_rounds": 20, "screen_samples": 4, "dp_samples": 4,
    }
    settings = SearchConfig.from_params(BASE, 14, 28).settings(14, 16, "linear")
    assert list(settings) == ["budget", "starts", "forced", "seed", "sa_iterations", "hc_rounds", "screen_samples",
                              "dp_samples", "calibration_pairs", "forecast"]
    assert settings == {"budget": 14, "starts": ["dp"], "forced": [0], "seed": 0, "sa_iterations": 100, "hc_rounds": 8,
                        "screen_samples": 4, "dp_samples": 4, "calibration_pairs": 16, "forecast": "linear"}


def test_tight_budgets_take_the_tight_starts():
    assert SearchConfig.from_params(BASE, 5, 28).starts == ("uniform",)
    assert SearchConfig.from_params(BASE, 7, 28).starts == ("dp",)
    assert SearchConfig.from_params({**BASE, "tight_budget_fraction": None}, 3, 28).starts == ("dp",)
    assert SearchConfig.from_params({"sa_iterations": 5}, 3, 28) == SearchConfig(sa_iterations=5)
    with pytest.raises(SearchSetupError, match="tight_budget_fraction must be a number in \\(0, 1\\)"):
        SearchConfig.from_params({**BASE, "tight_budget_fraction": 2}, 3, 28)
    with pytest.raises(SearchSetupError, match="tight_starts: unknown start 'unifrom'"):
        SearchConfig.from_params({**BASE, "tight_starts": ["unifrom"]}, 20, 28)


def test_budget_settings_replace_the_others_at_their_budget_only():
    assert SearchConfig.from_params(BASE, 10, 28) == SearchConfig(starts=("dp",), sa_iterations=100, hc_rounds=8,
                                                                  dp_samples=2)
    assert SearchConfig.from_params(BASE, 14, 28).dp_samples == SearchConfig.from_params(BASE, 7, 28).dp_samples == 4
    given = {"starts": ["dp"], "budget_settings": {"5": {"starts": ["random"], "seed": 3}}}
    assert SearchConfig.from_params(given, 5, 28) == SearchConfig(starts=("random",), seed=3), "keys read from text"
    assert SearchConfig.from_params({**BASE, "budget_settings": None}, 10, 28).dp_samples == 4
    overridden = {**BASE, "budget_settings": {10: {"dp_samples": 2, "seed": 4}, "10": {"dp_samples": 3}}}
    assert (SearchConfig.from_params(overridden, 10, 28).dp_samples, SearchConfig.from_params(overridden, 10, 28).seed) == (3, 4)


@pytest.mark.parametrize(("value", "message"), [
    ([7, {"dp_samples": 2}], "budget_settings must be a mapping from budgets"),
    ({"seven": {"dp_samples": 2}}, "budget_settings must be a mapping from budgets"),
    ({7: 2}, "budget_settings must be a mapping from budgets"),
    ({10: {"dp_sample": 2}}, "budget_settings\\[10\\]: unknown setting\\(s\\) \\['dp_sample'\\]"),
    ({10: {"dp_samples": 0}}, "dp_samples must be an integer >= 1, got 0"),
])
def test_bad_budget_settings_are_refused_by_name(value, message):
    with pytest.raises(SearchSetupError, match=message):
        SearchConfig.from_params({**BASE, "budget_settings": value}, 10, 28)


def test_an_unknown_parameter_is_refused_by_name():
    with pytest.raises(SearchSetupError, match="unknown search parameter\\(s\\) \\['sa_iteration'\\]"):
        SearchConfig.from_params({**BASE, "sa_iteration": 10}, 10, 28)
    with pytest.raises(SearchSetupError, match="unknown search setting\\(s\\) \\['progress'\\]"):
        SearchConfig.from_dict({"seed": 1, "progress": True})


@pytest.mark.parametrize("config", [
    SearchConfig(),
    SearchConfig(starts=("uniform",), forced=(0, 5), seed=7, sa_iterations=0, hc_rounds=3, screen_samples=None),
    SearchConfig(t_start=0.1, t_end=0.001, race_margin=None, hc_confirm=2, hc_far_jumps=0, dp_samples=8),
])
def test_the_dict_reads_back_as_the_same_settings(config):
    assert SearchConfig.from_dict(config.to_dict()) == config
    assert SearchConfig.from_dict({}) == SearchConfig()


def test_settings_away_from_their_defaults_are_recorded():
    recorded = SearchConfig(race_margin=None, t_end=1e-4).to_dict()
    assert recorded["race_margin"] is None and recorded["t_end"] == 1e-4 and "t_start" not in recorded


def test_lists_from_parameter_files_become_tuples():
    config = SearchConfig(starts=["dp"], forced=[0, 3])
    assert config.starts == ("dp",) and config.forced == (0, 3) and hash(config)


@pytest.mark.parametrize("field, value, message", [
    ("starts", ("best",), "starts: unknown start 'best': use one of"),
    ("starts", ("dp", "dp"), "starts: start 'dp' is listed twice"),
    ("starts", "dp", "starts must be a list of start names"),
    ("forced", (0, -1), "forced must be a list of step indices"),
    ("forced", 0, "forced must be a list of step indices"),
    ("seed", 1.5, "seed must be an integer"),
    ("seed", True, "seed must be an integer"),
    ("sa_iterations", -1, "sa_iterations must be an integer >= 0"),
    ("hc_rounds", "8", "hc_rounds must be an integer >= 0"),
    ("screen_samples", 0, "screen_samples must be an integer >= 1, or null"),
    ("dp_samples", 0, "dp_samples must be an integer >= 1"),
    ("t_start", 0.0, "t_start must be a temperature > 0"),
    ("t_end", 1.0, "t_end must be a temperature in \\(0, t_start"),
    ("race_margin", -0.1, "race_margin must be a fraction >= 0, or null"),
    ("race_margin", float("nan"), "race_margin must be a fraction >= 0"),
    ("hc_confirm", 0, "hc_confirm must be an integer >= 1"),
    ("hc_far_jumps", -2, "hc_far_jumps must be an integer >= 0"),
])
def test_a_bad_setting_is_refused_naming_the_field_and_what_it_must_be(field, value, message):
    with pytest.raises(SearchSetupError, match=f"search setting {message}"):
        SearchConfig(**{field: value})
    with pytest.raises(SearchSetupError, match=f"search setting {message}"):
        SearchConfig.from_params({**BASE, field: value, "tight_budget_fraction": None}, 14, 28)
