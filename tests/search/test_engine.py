"""The multi-start search: exact budgets, reproducible policies, resumable checkpoints, honest cost."""

from __future__ import annotations

import json

import pytest

from budcache_pipeline.policy import uniform_mask
from budcache_pipeline.search import MaskObjective, SearchSetupError, result_to_policy, search_policy
from budcache_pipeline.search.engine import RACE_FROM, SA_CHUNK
from tests.search.conftest import STEPS

FAST = dict(sa_iterations=30, hc_rounds=3, progress=False, dp_samples=3, race_margin=None)


class Stop(Exception):
    pass


def to_policy(result, created_at="2026-01-01T00:00:00+00:00"):
    return result_to_policy(
        result,
        model_name="tiny",
        model_fingerprint="abc",
        sigmas=None,
        settings={"budget": result.budget, "seed": 0},
        scores={"calibration_mse": result.loss},
        created_at=created_at,
    )


def test_search_keeps_the_budget_and_beats_every_start(objective):
    result = search_policy(objective, 4, forced=(0, 6), **FAST)
    assert sum(result.mask) == 4 and result.mask[0] and result.mask[6]
    assert result.loss == objective(result.mask)
    assert result.loss <= min(s["initial_loss"] for s in result.starts)
    assert result.loss <= objective(uniform_mask(STEPS, 4))
    assert [s["start"] for s in result.starts] == ["dp", "uniform", "front_loaded", "random"]
    for start in result.starts:
        assert sum(start["mask"]) == 4 and start["mask"][6] and start["final_loss"] <= start["initial_loss"]
    spread = result.spread
    assert spread["min"] == result.loss and spread["max"] >= spread["min"] and spread["std"] >= 0
    history = result.history
    columns = ["iteration", "phase", "start", "objective", "temperature", "current_loss", "best_loss"]
    assert list(history.columns[:7]) == columns
    sa = history[history.phase == "sa"]
    assert len(sa) == 4 * 30
    assert sa.temperature.iloc[0] == pytest.approx(5e-2) and sa.temperature.iloc[29] == pytest.approx(1e-5)
    # Best-so-far never rises within one objective (SA scores on the screening subset, HC on the full set).
    assert (history.groupby(["start", "objective"]).best_loss.apply(lambda s: s.is_monotonic_decreasing)).all()
    cost = result.cost
    assert 0 < cost["block_stack_calls"] < cost["block_stack_calls_naive"]
    assert cost["saved_fraction"] == pytest.approx(1 - cost["block_stack_calls"] / cost["block_stack_calls_naive"])
    assert cost["evaluations"] > 0 and cost["memo_hits"] > 0 and cost["wall_seconds"] > 0
    assert 0 < cost["start_block_stack_calls"] < cost["start_block_stack_calls_naive"] < cost["block_stack_calls_naive"]


def test_same_inputs_and_seed_give_a_byte_identical_policy(adapter, reference):
    first = to_policy(search_policy(MaskObjective(adapter, reference), 3, seed=3, **FAST)).to_json()
    second = to_policy(search_policy(MaskObjective(adapter, reference), 3, seed=3, **FAST)).to_json()
    assert first == second
    policy = json.loads(first)
    assert policy["provenance"]["cost"]["block_stack_calls"] > 0 and "wall_seconds" not in policy["provenance"]["cost"]
    assert [s["start"] for s in policy["provenance"]["starts"]] == ["dp", "uniform", "front_loaded", "random"]


def test_a_killed_search_resumes_from_its_checkpoint_and_ends_with_the_same_policy(adapter, reference, tmp_path):
    settings = dict(starts=("uniform", "random"), seed=1, screen_samples=3, **FAST)
    uninterrupted = search_policy(MaskObjective(adapter, reference), 4, **settings)
    checkpoint = tmp_path / "search.json"

    def kill_at(phase, iteration):
        def callback(where):
            if where["phase"] == phase and where["iteration"] >= iteration:
                raise Stop

        return callback

    with pytest.raises(Stop):
        search_policy(MaskObjective(adapter, reference), 4, checkpoint=checkpoint, callback=kill_at("sa", 25), **settings)
    with pytest.raises(Stop):
        search_policy(MaskObjective(adapter, reference), 4, checkpoint=checkpoint, callback=kill_at("hc", 1), **settings)
    resumed_objective = MaskObjective(adapter, reference)
    resumed = search_policy(resumed_objective, 4, checkpoint=checkpoint, **settings)
    assert resumed.mask == uninterrupted.mask and resumed.loss == uninterrupted.loss
    assert resumed.starts == uninterrupted.starts
    assert resumed.history.equals(uninterrupted.history)
    strip = lambda text: {**json.loads(text), "provenance": {**json.loads(text)["provenance"], "cost": None}}
    assert strip(to_policy(resumed).to_json()) == strip(to_policy(uninterrupted).to_json())
    again = search_policy(resumed_objective, 4, checkpoint=checkpoint, **settings)
    assert again.mask == resumed.mask and again.cost == resumed.cost, "a finished checkpoint returns its result"
    with pytest.raises(SearchSetupError, match="seed"):
        search_policy(resumed_objective, 4, checkpoint=checkpoint, **{**settings, "seed": 2})


def test_racing_retires_starts_that_fall_behind(objective):
    raced = search_policy(objective, 4, **{**FAST, "sa_iterations": 60, "race_margin": 0.0})
    retired = [s for s in raced.starts if s["retired_at"] is not None]
    checks = range(SA_CHUNK, 60, SA_CHUNK)
    assert retired and all(s["retired_at"] in checks and s["retired_at"] >= 60 * RACE_FROM for s in retired)
    assert all(s["hc_rounds"] == 0 for s in retired)
    assert raced.loss == min(s["final_loss"] for s in raced.starts)
    survivors = {s["start"] for s in raced.starts if s["retired_at"] is None}
    assert set(raced.history[raced.history.phase == "hc"].start) <= survivors


def test_extra_starts_and_trivial_budgets(objective):
    teacache_like = [True, True, False, False, False, False, False, False, False, True, False, False]
    result = search_policy(objective, 3, starts=("uniform",), extra_starts={"teacache": teacache_like}, **FAST)
    assert [s["start"] for s in result.starts] == ["uniform", "teacache"]
    assert result.starts[1]["initial_mask"] == teacache_like
    full = search_policy(objective, STEPS, **FAST)
    assert full.mask == [True] * STEPS and full.loss == pytest.approx(0.0, abs=1e-10)
    only_forced = search_policy(objective, 2, forced=(0, 5), starts=("dp", "random"), **FAST)
    assert [i for i, m in enumerate(only_forced.mask) if m] == [0, 5]


def test_bad_search_inputs_are_refused(objective):
    with pytest.raises(SearchSetupError, match="exceeds"):
        search_policy(objective, STEPS + 1, **FAST)
    with pytest.raises(SearchSetupError, match="do not fit"):
        search_policy(objective, 2, forced=(0, 3, 5), **FAST)
    with pytest.raises(SearchSetupError, match="unknown start"):
        search_policy(objective, 3, starts=("best",), **FAST)
    with pytest.raises(SearchSetupError, match="computes 4 steps"):
        search_policy(objective, 3, extra_starts={"x": uniform_mask(STEPS, 4)}, **FAST)
    with pytest.raises(SearchSetupError, match="forced"):
        search_policy(objective, 3, forced=(0, 1), extra_starts={"x": uniform_mask(STEPS, 3)}, **FAST)
