"""The search node's calibration subset: balanced over categories, and bad sizes named."""

import logging

import pandas as pd
import pytest

from budcache_pipeline.pipelines.search.nodes import calibration_subset


class _Reference:
    prompts = ["a one", "a two", "b one", "b two"]
    seeds = [1, 2, 3, 4]


PROMPTS = pd.DataFrame({"prompt": _Reference.prompts, "seed": _Reference.seeds, "category": ["a", "a", "b", "b"]})


def test_a_subset_takes_prompts_round_robin_over_categories():
    assert calibration_subset(PROMPTS, _Reference(), 2) == [0, 2]
    assert calibration_subset(PROMPTS, _Reference(), None) == [0, 1, 2, 3]


def test_a_calibration_size_larger_than_the_set_uses_all_and_says_so(caplog):
    with caplog.at_level(logging.WARNING):
        assert calibration_subset(PROMPTS, _Reference(), 10) == [0, 1, 2, 3]
    assert "calibration_size 10 is more than the 4 calibration prompts: searching on all of them" in caplog.text


@pytest.mark.parametrize("size", [0, -3, 2.5, "8", True])
def test_a_calibration_size_that_is_not_a_positive_integer_is_refused(size):
    with pytest.raises(ValueError, match="calibration_size must be a positive integer or null"):
        calibration_subset(PROMPTS, _Reference(), size)


def test_prompts_without_a_teacher_are_refused_naming_the_fix():
    extra = pd.concat([PROMPTS, pd.DataFrame({"prompt": ["c new"], "seed": [9], "category": ["c"]})])
    with pytest.raises(ValueError, match="1 calibration prompt\\(s\\) have no teacher .*kedro run --pipelines reference"):
        calibration_subset(extra, _Reference(), None)
