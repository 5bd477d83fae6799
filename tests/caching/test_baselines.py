"""What each baseline is: TeaCache's fitted polynomial, TaylorSeer's and MagCache's schedules."""

from __future__ import annotations

import numpy as np
import pytest

from budcache_pipeline.caching.baselines import (
    CacheMethod,
    mag_cache_min_steps,
    mag_cache_schedule,
    taylorseer_compute_steps,
)
from budcache_pipeline.caching.teacache import StackChanges, fit_teacache_coefficients
from budcache_pipeline.evaluation import RolloutSet, run_method
from tests.fakes import flux_rollout_set

STEPS, SIZE, COUNT = 16, 64, 6


@pytest.fixture(scope="module")
def data() -> RolloutSet:
    return flux_rollout_set([f"prompt {i}" for i in range(COUNT)], list(range(COUNT)), STEPS, SIZE)


def test_teacache_fit_recovers_a_known_polynomial():
    rng = np.random.default_rng(0)
    x = rng.uniform(0.01, 0.5, size=(20, 4))
    truth = (3.0, -2.0, 0.5, 0.1, 0.01)
    changes = StackChanges(x, np.polyval(truth, x), np.ones(20))
    fit = fit_teacache_coefficients(changes)
    np.testing.assert_allclose(fit.coefficients, truth, rtol=1e-6, atol=1e-8)
    assert fit.r_squared == pytest.approx(1.0)
    with pytest.raises(ValueError, match="more than 4"):
        fit_teacache_coefficients(StackChanges(x[:1, :2], x[:1, :2], np.ones(1)))


def test_taylorseer_schedule_formula_matches_the_hook(data):
    method = CacheMethod.taylorseer(cache_interval=4, disable_cache_before_step=2)
    run = run_method(method, data)
    assert run.compute_steps.tolist() == [len(taylorseer_compute_steps(STEPS, 4, 2))] * COUNT


def test_mag_cache_schedule_leaves_room_below_the_budget():
    for budget in (14, 10, 7, 5):
        retention, max_skip = mag_cache_schedule(28, budget)
        assert 1 <= retention <= budget // 2
        assert mag_cache_min_steps(28, retention, max_skip) <= budget - 1
    assert mag_cache_schedule(28, 14) == (6, 3), "diffusers' defaults are kept where they reach the budget"
