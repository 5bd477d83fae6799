"""MagCache's schedule limits at tight budgets, and ratios measured for another number of steps refused."""

from __future__ import annotations

import pytest
import torch

from budcache_pipeline.baselines import BaselineError, MagCache, mag_cache_min_steps, mag_cache_schedule


def test_mag_cache_schedule_leaves_room_below_the_budget():
    for budget in (14, 10, 7, 5):
        retention, max_skip = mag_cache_schedule(28, budget)
        assert 1 <= retention <= budget // 2
        assert mag_cache_min_steps(28, retention, max_skip) <= budget - 1
    assert mag_cache_schedule(28, 14) == (6, 3), "diffusers' defaults are kept where they reach the budget"
    assert MagCache.fewest_compute_steps(28, 5) == mag_cache_min_steps(28, *mag_cache_schedule(28, 5))


def test_ratios_for_another_number_of_steps_are_refused_before_the_hook_is_built():
    method = MagCache(0.1, [1.0] * 8, 0.2, 3)
    with pytest.raises(BaselineError, match="MagCache ratios have 8 entries, the sampler 10 steps"):
        method.diffusers_config(10)
    assert method.diffusers_config(8).num_inference_steps == 8


def test_the_report_leaves_the_long_ratio_list_out():
    method = MagCache(0.1, torch.linspace(1, 0.9, 8).tolist(), 0.2, 3)
    assert method.settings() == {"threshold": 0.1, "retention_ratio": 0.2, "max_skip_steps": 3}
    assert method.parameter == 0.1 and method.per_image
