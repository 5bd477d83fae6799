"""Every method runs through the same rollout, its work counted honestly and per image, and leaves the transformer clean."""

from __future__ import annotations

import pytest
import torch

from budcache_pipeline.baselines import FirstBlockCache, FixedPolicy, TaylorSeer, TeaCache, Uncached
from budcache_pipeline.caching.teacache import FLUX_TEACACHE_COEFFICIENTS
from budcache_pipeline.evaluation import ComputeCounter, RolloutSet, run_method
from tests.fakes import flux_rollout_set

STEPS, SIZE, COUNT = 16, 64, 6


@pytest.fixture(scope="module")
def data() -> RolloutSet:
    return flux_rollout_set([f"prompt {i}" for i in range(COUNT)], list(range(COUNT)), STEPS, SIZE)


def test_counter_sees_full_stack_and_block_evaluations(data):
    uniform = run_method(FixedPolicy.uniform(STEPS, 5), data)
    assert uniform.compute_steps.tolist() == [5] * COUNT
    assert uniform.block_evaluations.tolist() == [15] * COUNT
    fbc = run_method(FirstBlockCache(0.3), data)
    assert fbc.per_image
    # FirstBlockCache runs its first block on every step to decide: 1 of 3 blocks always, the rest when computing.
    assert (fbc.block_evaluations == STEPS + 2 * fbc.compute_steps).all()
    assert len(set(fbc.compute_steps.tolist())) > 1, "per-image runs should give per-image counts"


def test_uncached_and_zero_thresholds_reproduce_the_teacher(data):
    assert torch.equal(run_method(Uncached(), data).final, data.reference)
    fbc = run_method(FirstBlockCache(0.0), data)
    assert fbc.compute_steps.tolist() == [STEPS] * COUNT
    torch.testing.assert_close(fbc.final, data.reference, rtol=0, atol=1e-6)
    tea = run_method(TeaCache(0.0, coefficients=(1.0,)), data)
    assert tea.compute_steps.tolist() == [STEPS] * COUNT
    torch.testing.assert_close(tea.final, data.reference, rtol=0, atol=1e-6)


def test_teacache_batched_decisions_equal_batch_one(data):
    method = TeaCache(0.4, FLUX_TEACACHE_COEFFICIENTS)
    batched = run_method(method, data)
    single = run_method(method, data, per_image=True)
    assert batched.compute_steps.tolist() == single.compute_steps.tolist()
    torch.testing.assert_close(batched.final, single.final, rtol=1e-4, atol=1e-5)
    # At batch 1 the probe counter and TeaCache's own per-sample counts must agree.
    with ComputeCounter(data.transformer) as counter:
        with torch.inference_mode():
            one = run_method(method, data.subset(slice(0, 1)), per_image=True)
    assert counter.full_stack == one.compute_steps[0]
    huge = run_method(TeaCache(1e9), data)
    assert huge.compute_steps.tolist() == [2] * COUNT, "first and last step always compute"


def test_methods_leave_the_transformer_clean(data):
    for method in (FixedPolicy.uniform(STEPS, 4), TeaCache(0.4), TaylorSeer(3, 1)):
        run_method(method, data)
    assert not getattr(data.transformer, "is_cache_enabled", False)
    assert torch.equal(run_method(Uncached(), data).final, data.reference)
