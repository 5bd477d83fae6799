"""Baselines tuned to a budget on the calibration set hit it, or say what they can reach."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
import torch

from budcache_pipeline.baselines import BaselineError, FixedPolicy, TeaCache, method_from_json
from budcache_pipeline.caching.teacache import trace_stack_changes
from budcache_pipeline.evaluation import BaselineCalibrator, RolloutSet, teacache_mask
from budcache_pipeline.sampling import rollout
from tests.fakes import flux_rollout_set

STEPS, SIZE, COUNT = 16, 64, 6


@pytest.fixture(scope="module")
def data() -> RolloutSet:
    return flux_rollout_set([f"prompt {i}" for i in range(COUNT)], list(range(COUNT)), STEPS, SIZE)


@pytest.fixture(scope="module")
def calibrator(data) -> BaselineCalibrator:
    return BaselineCalibrator(data, max_evaluations=8)


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
        method_from_json({"kind": "fastercache", "params": {}})
    with pytest.raises(BaselineError, match="no TaylorSeer schedule"):
        calibrator.calibrate("taylorseer", 1)


def test_teacache_start_mask_has_the_budget(calibrator, data):
    method = TeaCache(0.4, calibrator.teacache_coefficients)
    mask = teacache_mask(method, data, 5)
    assert len(mask) == STEPS and sum(mask) == 5 and mask[0]
    with pytest.raises(BaselineError, match="needs a TeaCache method"):
        teacache_mask(FixedPolicy.uniform(STEPS, 5), data, 5)


def test_a_baseline_left_out_is_warned_about_once_and_recorded(calibrator):
    from budcache_pipeline.evaluation import calibrate_baselines

    said, warned = [], []
    found, skipped = calibrate_baselines(calibrator, ["uniform", "taylorseer"], [1], said.append, warned.append)
    assert [c.name for c in found] == ["uniform"]
    assert skipped == [{"method": "taylorseer", "budget": 1, "reason": skipped[0]["reason"]}]
    assert "no TaylorSeer schedule" in skipped[0]["reason"]
    assert len(warned) == 1 and warned[0].startswith("taylorseer is left out at budget 1")
    assert len(said) == 1 and said[0].startswith("uniform B=1")
