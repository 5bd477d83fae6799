"""Paired bootstrap intervals: they cover what they should, separate what differs, and refuse bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from budcache_pipeline.evaluation.intervals import (
    Interval,
    fid_intervals,
    frechet_from_features,
    draw_ratio_interval,
    mean_intervals,
    ratio_interval,
)


def test_mean_interval_covers_the_mean_and_narrows_with_more_samples() -> None:
    rng = np.random.default_rng(0)
    small, _ = mean_intervals({"a": rng.normal(2.0, 1.0, 50)})
    large, _ = mean_intervals({"a": rng.normal(2.0, 1.0, 2000)})
    assert small["a"].low < 2.0 < small["a"].high and large["a"].low < 2.0 < large["a"].high
    assert large["a"].high - large["a"].low < 0.3 * (small["a"].high - small["a"].low)


def test_paired_ratio_separates_methods_whose_errors_move_together() -> None:
    rng = np.random.default_rng(1)
    shared = rng.lognormal(0.0, 1.0, 64)  # per-prompt difficulty, common to both methods
    values = {"ours": 0.8 * shared, "theirs": shared * rng.uniform(0.98, 1.02, 64)}
    ratio = ratio_interval(values, "ours", "theirs")
    assert ratio.high < 1 and ratio.low < 0.8 < ratio.high + 0.05
    separate, _ = mean_intervals(values)
    assert not separate["ours"].disjoint(separate["theirs"]), "unpaired intervals overlap: the pairing is what separates"
    same = ratio_interval({"a": shared, "b": shared * rng.uniform(0.9, 1.1, 64)}, "a", "b")
    assert not same.excludes(1.0)


def test_fid_gaps_tell_a_shifted_method_from_a_copy() -> None:
    g = torch.Generator().manual_seed(0)
    real = torch.randn(300, 8, generator=g, dtype=torch.float64)
    base = torch.randn(1000, 8, generator=g, dtype=torch.float64)
    features = {"uncached": base, "close": base + 0.01 * torch.randn(1000, 8, generator=g, dtype=torch.float64),
                "shifted": base + 0.5}
    found = fid_intervals(features, real, "uncached", resamples=100)
    assert found.fid["uncached"].value == pytest.approx(frechet_from_features(base, real))
    assert all(i.low <= i.value <= i.high for i in [*found.fid.values(), *found.gap.values(), *found.shift.values()])
    assert found.gap["shifted"].low > 1.0 and found.gap["close"].high < found.gap["shifted"].low
    assert found.shift["shifted"].value == pytest.approx(8 * 0.5**2, rel=0.05), "a mean shift of 0.5 in 8 features"
    assert found.shift["close"].high < 0.05 and found.shift["close"].disjoint(found.shift["shifted"])
    assert draw_ratio_interval(found.gap, found.gap_draws, "close", "shifted").high < 0.5
    assert draw_ratio_interval(found.shift, found.shift_draws, "close", "shifted").high < 0.01


@pytest.mark.parametrize(
    ("features", "real", "message"),
    [
        ({"uncached": torch.zeros(5, 2), "x": torch.zeros(4, 2)}, torch.zeros(5, 2), "same number"),
        ({"x": torch.zeros(5, 2)}, torch.zeros(5, 2), "reference method 'uncached'"),
        ({"uncached": torch.zeros(5, 2)}, torch.zeros(1, 2), "at least two real"),
        ({}, torch.zeros(5, 2), "no methods"),
    ],
)
def test_fid_intervals_refuse_bad_input(features, real, message) -> None:
    with pytest.raises(ValueError, match=message):
        fid_intervals(features, real, "uncached")


def test_interval_relations() -> None:
    a, b = Interval(1.0, 0.5, 1.5), Interval(3.0, 2.0, 4.0)
    assert a.disjoint(b) and b.disjoint(a) and a.excludes(2.0) and not a.excludes(1.2)
    assert not a.disjoint(Interval(1.4, 1.4, 2.0))
