"""Initial masks keep the budget and forced positions; the DAG start solves its DP exactly."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from budcache_pipeline.search import MaskObjective
from budcache_pipeline.search.starts import (
    SearchSetupError,
    back_loaded_start,
    dp_path,
    dp_start,
    edge_errors,
    front_loaded_start,
    normalise_forced,
    random_start,
    starts_for_budget,
    uniform_start,
)
from tests.search.conftest import STEPS


def test_simple_starts_keep_budget_and_forced_positions():
    for budget in (2, 5, 9, 28):
        for forced in ((0,), (0, 13), (0, 1, 27)):
            forced = normalise_forced(forced, 28, max(budget, 3))
            if len(forced) > budget:
                continue
            for mask in (
                uniform_start(28, budget, forced),
                front_loaded_start(28, budget, forced),
                back_loaded_start(28, budget, forced),
                random_start(28, budget, forced, random.Random(0)),
            ):
                assert sum(mask) == budget and all(mask[p] for p in forced)
    front, back = front_loaded_start(28, 7, (0,)), back_loaded_start(28, 7, (0,))
    assert sum(front[:14]) > sum(front[14:]) and sum(back[14:]) > sum(back[:14])
    assert [i for i, m in enumerate(uniform_start(28, 7, (0,))) if m] == [0, 4, 8, 12, 16, 20, 24]


def test_forced_positions_are_checked():
    assert normalise_forced((5,), 10, 3) == (0, 5)
    with pytest.raises(SearchSetupError, match="do not fit"):
        normalise_forced((1, 2, 3), 10, 3)
    with pytest.raises(SearchSetupError, match="not a step index"):
        normalise_forced((10,), 10, 3)
    with pytest.raises(SearchSetupError, match="budget must be between"):
        normalise_forced((0,), 10, 11)


def brute_force(errors: np.ndarray, budget: int, forced: set[int]) -> float:
    steps = errors.shape[0] - 1
    best = np.inf
    for rest in itertools.combinations(range(1, steps), budget - 1):
        nodes = [0, *rest]
        if not forced <= set(nodes):
            continue
        best = min(best, sum(errors[a, b] for a, b in zip(nodes, nodes[1:] + [steps])))
    return best


def test_dp_finds_the_cheapest_path_with_exactly_b_edges():
    rng = np.random.default_rng(0)
    for trial in range(20):
        steps = 9
        errors = np.triu(rng.random((steps + 1, steps + 1)), k=2)
        budget = 2 + trial % 5
        forced = {0} | ({4} if trial % 2 else set())
        nodes = dp_path(errors, budget, sorted(forced))
        assert len(nodes) == budget and nodes[0] == 0 and forced <= set(nodes)
        cost = sum(errors[a, b] for a, b in zip(nodes, nodes[1:] + [steps]))
        assert cost == pytest.approx(brute_force(errors, budget, forced))


def brute_force_after(errors: np.ndarray, budget: int, forced: set[int]) -> float:
    """The cheapest path when an edge's error depends on the node before it (errors[h + 1, i, j])."""
    steps = errors.shape[-1] - 1
    best = np.inf
    for rest in itertools.combinations(range(1, steps), budget - 1):
        nodes = [0, *rest, steps]
        if forced <= set(nodes):
            before = [-1, *nodes[:-2]]
            best = min(best, sum(errors[h + 1, i, j] for h, i, j in zip(before, nodes, nodes[1:])))
    return best


def test_dp_finds_the_cheapest_path_when_errors_depend_on_the_compute_before():
    rng = np.random.default_rng(1)
    for trial in range(20):
        steps = 9
        errors = rng.random((steps + 1,) * 3)
        budget = 2 + trial % 5
        forced = {0} | ({5} if trial % 2 else set())
        nodes = dp_path(errors, budget, sorted(forced))
        assert len(nodes) == budget and nodes[0] == 0 and forced <= set(nodes)
        path = [*nodes, steps]
        cost = sum(errors[h + 1, i, j] for h, i, j in zip([-1, *path[:-2]], path, path[1:]))
        assert cost == pytest.approx(brute_force_after(errors, budget, forced))


def edge_mask(i: int, j: int, steps: int) -> list[bool]:
    return [not (i < k < j) for k in range(steps)]


def test_edge_errors_are_the_losses_of_single_segment_rollouts(adapter, reference):
    objective = MaskObjective(adapter, reference)
    exact = edge_errors(objective, samples=3, exact=True)
    linear = edge_errors(objective, samples=3)
    sub = objective.subset(3)
    for i, j in [(0, 2), (0, 7), (3, 9), (5, STEPS), (0, STEPS), (2, 4)]:
        expected = sub(edge_mask(i, j, STEPS))
        assert exact[i, j] == pytest.approx(expected, rel=1e-3)
        if j == STEPS or j == i + 2:
            assert linear[i, j] == pytest.approx(expected, rel=1e-3)
    assert np.all(np.diag(exact, 1) == 0) and np.all(np.diag(linear, 1) == 0)
    assert edge_errors(objective, samples=3) is linear, "edges are computed once per objective"
    assert objective.stats["start_block_stack_calls"] > 0
    correlation = np.corrcoef(np.log(exact[np.triu_indices(STEPS + 1, 2)] + 1e-30),
                              np.log(linear[np.triu_indices(STEPS + 1, 2)] + 1e-30))[0, 1]
    assert correlation > 0.9
    mask = dp_start(objective, 4, (0,), samples=3)
    assert sum(mask) == 4 and mask[0]


def test_edge_error_cost_is_counted_against_separate_rollouts_from_the_noise(adapter, reference):
    objective = MaskObjective(adapter, reference)
    edge_errors(objective, samples=3)
    n, per_pair = STEPS, 3 / len(reference)
    shared = n + (n - 1) + sum(n - j for j in range(2, n))
    separate = n + n * (n - 1) // 2 + (n - 2) * (n - 1)
    assert objective.stats["start_block_stack_calls"] == pytest.approx(shared * per_pair)
    assert objective.stats["start_block_stack_calls_naive"] == pytest.approx(separate * per_pair)


def test_starts_follow_the_budget_fraction_and_bad_settings_are_refused():
    assert starts_for_budget(5, 28, ["dp"], ["uniform"], 0.2) == ["uniform"]
    assert starts_for_budget(7, 28, ["dp"], ["uniform"], 0.2) == ["dp"]
    assert starts_for_budget(3, 28, ["dp", "uniform"]) == ["dp", "uniform"]
    assert starts_for_budget(3, 28, ["dp"], ["uniform"], None) == ["dp"]
    for fraction in (0, 1, -0.1, True, "0.2"):
        with pytest.raises(SearchSetupError, match="tight_budget_fraction"):
            starts_for_budget(3, 28, ["dp"], ["uniform"], fraction)
    for tight in (None, [], "uniform"):
        with pytest.raises(SearchSetupError, match="tight_starts must be a non-empty list"):
            starts_for_budget(3, 28, ["dp"], tight, 0.2)


def test_linear_forecast_segments_carry_the_slope_of_the_compute_before(adapter, reference):
    objective = MaskObjective(adapter, reference, forecast="linear")
    exact = edge_errors(objective, samples=3, exact=True, forecast="linear")
    probed = edge_errors(objective, samples=3, forecast="linear")
    assert exact.shape == probed.shape == (STEPS + 1,) * 3
    sub = objective.subset(3)
    for i, j in [(0, 2), (0, 7), (3, 9), (5, STEPS), (0, STEPS), (2, 4)]:
        # with the compute before i at i - 1 the segment is the mask's own rollout
        expected = sub(edge_mask(i, j, STEPS))
        assert exact[i, i, j] == pytest.approx(expected, rel=1e-3)
        if j == STEPS or j == i + 2:
            assert probed[i, i, j] == pytest.approx(expected, rel=1e-3)
    assert exact[1, 3, STEPS] != pytest.approx(exact[3, 3, STEPS], rel=1e-3), "the slope's origin changes the error"
    one_per_forward = MaskObjective(adapter, reference, forecast="linear", max_rows_per_forward=3)
    assert np.allclose(edge_errors(one_per_forward, samples=3, exact=True, forecast="linear"), exact,
                       rtol=1e-4, atol=1e-12)
    # both calls: one uncached rollout each, then the suffixes (every edge's, or one per j)
    n, per_pair = STEPS, 3 / len(reference)
    every_edge = sum(n - j for i in range(n - 1) for _ in range(max(i, 1)) for j in range(i + 2, n))
    one_per_j = sum(n - j for j in range(2, n))
    assert objective.stats["start_block_stack_calls"] == pytest.approx((2 * n + every_edge + one_per_j) * per_pair)
    mask = dp_start(objective, 4, (0,), samples=3, forecast="linear")
    assert sum(mask) == 4 and mask[0]
    assert edge_errors(objective, samples=3).shape == (STEPS + 1,) * 2, "the 'dp' start keeps reuse segments"


def test_linear_segments_are_refused_for_a_reuse_objective_and_unknown_forecasts(adapter, reference):
    objective = MaskObjective(adapter, reference)
    with pytest.raises(SearchSetupError, match="use the 'dp' start"):
        dp_start(objective, 4, (0,), samples=3, forecast="linear")
    with pytest.raises(SearchSetupError, match="'reuse' or 'linear'"):
        edge_errors(objective, samples=3, forecast="quadratic")
