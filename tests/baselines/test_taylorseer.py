"""TaylorSeer's fixed schedule: the formula matches diffusers' hook, and calibration enumerates exact budgets."""

from __future__ import annotations

import pytest

from budcache_pipeline.baselines import BaselineError, TaylorSeer, taylorseer_compute_steps
from budcache_pipeline.evaluation import RolloutSet, run_method
from tests.fakes import flux_rollout_set

STEPS, SIZE, COUNT = 16, 64, 6


@pytest.fixture(scope="module")
def data() -> RolloutSet:
    return flux_rollout_set([f"prompt {i}" for i in range(COUNT)], list(range(COUNT)), STEPS, SIZE)


def test_taylorseer_schedule_formula_matches_the_hook(data):
    method = TaylorSeer(cache_interval=4, disable_cache_before_step=2)
    run = run_method(method, data)
    assert run.compute_steps.tolist() == [len(taylorseer_compute_steps(STEPS, 4, 2))] * COUNT


def test_every_enumerated_schedule_computes_exactly_the_budget_at_both_orders():
    members = TaylorSeer.schedules(28, 7)
    assert members and all(len(m.compute_steps(28)) == 7 for m in members)
    assert {m.max_order for m in members} == {1, 2}
    assert len({(m.cache_interval, m.disable_cache_before_step) for m in members}) == len(members) // 2
    assert TaylorSeer(3, 1).parameter == 3.0 and TaylorSeer(3, 1).settings() == {
        "cache_interval": 3, "disable_cache_before_step": 1, "max_order": 1,
    }


def test_a_budget_no_schedule_reaches_is_refused_with_the_reachable_counts():
    with pytest.raises(BaselineError, match=r"no TaylorSeer schedule computes exactly 1 of 16 steps \(possible counts: \[2,"):
        TaylorSeer.schedules(16, 1)
