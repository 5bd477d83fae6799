"""Forecast gains: a validated rectangle of finite gains that spreads over the stack's channels in groups."""

from __future__ import annotations

import pytest
import torch

from budcache_pipeline.forecast_gains import ForecastGains, ForecastGainsError, channel_groups, per_channel
from tests.conftest import tiny_flux_pipeline


def test_identity_gains_are_ones_and_round_trip_through_a_dict():
    gains = ForecastGains.identity(3, 4)
    assert gains.steps == 3 and gains.channels == 4
    assert ForecastGains.from_dict(gains.to_dict()) == gains
    residual, slope = gains.tensors()
    assert residual.shape == slope.shape == (3, 4) and bool((residual == 1).all())


def test_group_gains_spread_over_contiguous_channels():
    like = torch.zeros(2, 5, 6)
    spread = per_channel(torch.tensor([1.0, 2.0, 3.0]), like)
    assert spread.tolist() == [1.0, 1.0, 2.0, 2.0, 3.0, 3.0]
    with pytest.raises(ForecastGainsError, match="4 channel groups, which do not divide the block stack's width 6"):
        per_channel(torch.ones(4), like)


def test_channel_groups_are_the_gcd_with_the_stack_width():
    transformer = tiny_flux_pipeline(0).transformer  # 2 heads x 16 = width 32
    assert channel_groups(transformer, 64) == 32
    assert channel_groups(transformer, 12) == 4
    assert channel_groups(transformer, 1) == 1
    with pytest.raises(ForecastGainsError, match="no num_attention_heads x attention_head_dim"):
        channel_groups(torch.nn.Linear(2, 2), 64)


@pytest.mark.parametrize(
    ("residual", "slope", "message"),
    [
        ([], [[1.0]], "'residual' must be a non-empty list of rows"),
        ([[1.0]], [[float("nan")]], "'slope' row 0 contains NaN or infinity"),
        ([[1.0], [1.0, 2.0]], [[1.0], [1.0]], "'residual' rows have different lengths"),
        ([[1.0]], [[1.0], [1.0]], "'residual' has 1 rows and 'slope' 2"),
        ([[1.0, 2.0]], [[1.0]], "'residual' rows have 2 gains and 'slope' rows 1"),
        ([["1"]], [[1.0]], "'residual' row 0 must be a non-empty list of numbers"),
    ],
)
def test_bad_gains_are_refused_naming_what_is_wrong(residual, slope, message):
    with pytest.raises(ForecastGainsError, match=message):
        ForecastGains(residual, slope)
    with pytest.raises(ForecastGainsError, match="exactly the keys"):
        ForecastGains.from_dict({"residual": residual})
