"""Baselines must count cost honestly, decide per image, and hit a budget or say why they cannot."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
import torch

from budcache_pipeline.caching.baselines import (
    BaselineError,
    CacheMethod,
    mag_cache_min_steps,
    mag_cache_schedule,
    taylorseer_compute_steps,
)
from budcache_pipeline.caching.teacache import (
    FLUX_TEACACHE_COEFFICIENTS,
    StackChanges,
    fit_teacache_coefficients,
    trace_stack_changes,
)
from budcache_pipeline.evaluation import BaselineCalibrator, ComputeCounter, RolloutSet, run_method, teacache_mask
from budcache_pipeline.sampling import rollout
from tests.fakes import flux_rollout_set

STEPS, SIZE, COUNT = 16, 64, 6


@pytest.fixture(scope="module")
def data() -> RolloutSet:
    return flux_rollout_set([f"prompt {i}" for i in range(COUNT)], list(range(COUNT)), STEPS, SIZE)


@pytest.fixture(scope="module")
def calibrator(data) -> BaselineCalibrator:
    return BaselineCalibrator(data, max_evaluations=8)


def test_counter_sees_full_stack_and_block_evaluations(data):
    uniform = run_method(CacheMethod.uniform(STEPS, 5), data)
    assert uniform.compute_steps.tolist() == [5] * COUNT
    assert uniform.block_evaluations.tolist() == [15] * COUNT
    fbc = run_method(CacheMethod.first_block_cache(0.3), data)
    assert fbc.per_image
    # FirstBlockCache runs its first block on every step to decide: 1 of 3 blocks always, the rest when computing.
    assert (fbc.block_evaluations == STEPS + 2 * fbc.compute_steps).all()
    assert len(set(fbc.compute_steps.tolist())) > 1, "per-image runs should give per-image counts"


def test_uncached_and_zero_thresholds_reproduce_the_teacher(data):
    assert torch.equal(run_method(CacheMethod.none(), data).final, data.reference)
    fbc = run_method(CacheMethod.first_block_cache(0.0), data)
    assert fbc.compute_steps.tolist() == [STEPS] * COUNT
    torch.testing.assert_close(fbc.final, data.reference, rtol=0, atol=1e-6)
    tea = run_method(CacheMethod.teacache(0.0, coefficients=(1.0,)), data)
    assert tea.compute_steps.tolist() == [STEPS] * COUNT
    torch.testing.assert_close(tea.final, data.reference, rtol=0, atol=1e-6)


def test_teacache_batched_decisions_equal_batch_one(data):
    method = CacheMethod.teacache(0.4, FLUX_TEACACHE_COEFFICIENTS)
    batched = run_method(method, data)
    single = run_method(method, data, per_image=True)
    assert batched.compute_steps.tolist() == single.compute_steps.tolist()
    torch.testing.assert_close(batched.final, single.final, rtol=1e-4, atol=1e-5)
    # At batch 1 the probe counter and TeaCache's own per-sample counts must agree.
    with ComputeCounter(data.transformer) as counter:
        with torch.inference_mode():
            one = run_method(method, data.subset(slice(0, 1)), per_image=True)
    assert counter.full_stack == one.compute_steps[0]
    huge = run_method(CacheMethod.teacache(1e9), data)
    assert huge.compute_steps.tolist() == [2] * COUNT, "first and last step always compute"


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


def test_mag_ratios_match_diffusers_own_calibration(data):
    from diffusers.hooks import MagCacheConfig

    one = data.subset(slice(0, 1))
    with torch.inference_mode():
        ours = trace_stack_changes(one.denoiser, one.noise, one.sigmas).magnitude_ratio
    transformer = data.transformer
    transformer.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=STEPS))
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed), torch.inference_mode():
            transformer._reset_stateful_cache()
            rollout(one.denoiser, None, one.noise, one.sigmas)
    finally:
        transformer.disable_cache()
    printed_list = printed.getvalue().split("Copy these values", 1)[1].split("[", 1)[1].split("]", 1)[0]
    theirs = [float(v) for v in printed_list.split(",")]
    assert theirs[0] == 1.0
    np.testing.assert_allclose(ours, theirs[1:], rtol=1e-5)


def test_taylorseer_schedule_formula_matches_the_hook(data):
    method = CacheMethod.taylorseer(cache_interval=4, disable_cache_before_step=2)
    run = run_method(method, data)
    assert run.compute_steps.tolist() == [len(taylorseer_compute_steps(STEPS, 4, 2))] * COUNT


def test_bisection_matches_the_budget_and_reports_spread(calibrator, data):
    calibration = calibrator.calibrate("first_block_cache", 6)
    assert abs(calibration.mean_compute_steps - 6) <= 0.5
    assert calibration.std_compute_steps >= 0
    assert calibration.trace and calibration.evaluations <= 8
    again = calibrator.calibrate("first_block_cache", 6)
    assert again.evaluations == 0, "thresholds already evaluated are reused"
    blocks = calibrator.calibrate("first_block_cache", 8, match="blocks")
    assert blocks.name == "first_block_cache@blocks"
    assert abs(blocks.mean_block_evaluations - 24) <= 2
    tea = calibrator.calibrate("teacache", 6)
    assert tea.mean_compute_steps == pytest.approx(6, abs=0.5)
    assert calibrator.teacache_fit is not None and len(calibrator.teacache_coefficients) == 5


def test_unreachable_budgets_and_bad_input_say_what_is_possible(calibrator):
    with pytest.raises(BaselineError, match="between 1 and 16"):
        calibrator.calibrate("teacache", 17)
    with pytest.raises(BaselineError, match="unknown baseline"):
        calibrator.calibrate("deepcache", 5)
    with pytest.raises(BaselineError, match="teacache reaches a mean of 2.00 to"):
        calibrator.calibrate("teacache", 1)
    with pytest.raises(BaselineError, match="unknown cache method"):
        CacheMethod("fastercache")
    with pytest.raises(BaselineError, match="no TaylorSeer schedule"):
        calibrator.calibrate("taylorseer", 1)


def test_mag_cache_schedule_leaves_room_below_the_budget():
    for budget in (14, 10, 7, 5):
        retention, max_skip = mag_cache_schedule(28, budget)
        assert 1 <= retention <= budget // 2
        assert mag_cache_min_steps(28, retention, max_skip) <= budget - 1
    assert mag_cache_schedule(28, 14) == (6, 3), "diffusers' defaults are kept where they reach the budget"


def test_teacache_start_mask_has_the_budget(calibrator, data):
    method = CacheMethod.teacache(0.4, calibrator.teacache_coefficients)
    mask = teacache_mask(method, data, 5)
    assert len(mask) == STEPS and sum(mask) == 5 and mask[0]
    with pytest.raises(BaselineError, match="needs a TeaCache method"):
        teacache_mask(CacheMethod.uniform(STEPS, 5), data, 5)


def test_methods_leave_the_transformer_clean(data):
    for method in (CacheMethod.uniform(STEPS, 4), CacheMethod.teacache(0.4), CacheMethod.taylorseer(3, 1)):
        run_method(method, data)
    assert not getattr(data.transformer, "is_cache_enabled", False)
    assert torch.equal(run_method(CacheMethod.none(), data).final, data.reference)
