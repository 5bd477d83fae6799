"""95% bootstrap intervals for the held-out comparison: latent MSE over prompts, FID over samples.

Every method runs on the same (prompt, seed) pairs, so the resampling is paired: one draw of
pair indices is applied to every method at once, and a difference or ratio between two methods
gets its own interval from the same draws (much tighter than two separate intervals when the
methods' errors move together). The FID's real set is resampled independently in each draw. A resample with replacement repeats samples,
which inflates a Fréchet distance by a roughly constant amount, so an FID interval is the draws'
spread around their own mean placed at the estimate (`centred_interval`); means use plain
percentile intervals.
Two methods differ beyond the noise when the interval of their ratio excludes 1 (or of their
difference excludes 0); `disjoint` tells the stricter case the issue reads, separate intervals
that do not overlap.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

LEVEL = 0.95
RESAMPLES = 200


@dataclass(frozen=True)
class Interval:
    """A point estimate and its percentile bootstrap interval."""

    value: float
    low: float
    high: float

    def excludes(self, point: float) -> bool:
        return not self.low <= point <= self.high

    def disjoint(self, other: Interval) -> bool:
        return self.high < other.low or other.high < self.low

    def to_dict(self) -> dict[str, float]:
        return {"value": self.value, "low": self.low, "high": self.high}


def percentile_interval(value: float, draws: np.ndarray, level: float = LEVEL) -> Interval:
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(draws, [tail, 100 - tail])
    return Interval(float(value), float(low), float(high))


def centred_interval(value: float, draws: np.ndarray, level: float = LEVEL) -> Interval:
    """The draws' percentile spread around their mean, placed at `value`: for statistics whose resampled
    values are shifted by the resampling itself (FID under repeated samples)."""
    return percentile_interval(value, np.asarray(draws) - np.mean(draws) + value, level)


def _check(values: Mapping[str, np.ndarray | torch.Tensor]) -> int:
    if not values:
        raise ValueError("no methods to compare")
    sizes = {name: len(v) for name, v in values.items()}
    if len(set(sizes.values())) != 1 or min(sizes.values()) < 2:
        raise ValueError(f"every method needs the same number (at least 2) of paired samples, got {sizes}")
    return next(iter(sizes.values()))


def mean_intervals(
    per_sample: Mapping[str, np.ndarray], resamples: int = RESAMPLES, seed: int = 0
) -> tuple[dict[str, Interval], np.ndarray]:
    """Each method's mean with its interval over the paired samples, and the draws (resamples x methods)."""
    count = _check(per_sample)
    names = list(per_sample)
    matrix = np.stack([np.asarray(per_sample[n], dtype=np.float64) for n in names], axis=1)
    index = np.random.default_rng(seed).integers(0, count, size=(resamples, count))
    draws = matrix[index].mean(axis=1)
    means = matrix.mean(axis=0)
    return {n: percentile_interval(means[k], draws[:, k]) for k, n in enumerate(names)}, draws


def ratio_interval(
    per_sample: Mapping[str, np.ndarray], numerator: str, denominator: str, resamples: int = RESAMPLES, seed: int = 0
) -> Interval:
    """Interval of mean(numerator) / mean(denominator) over the same paired draws."""
    names = list(per_sample)
    intervals, draws = mean_intervals(per_sample, resamples, seed)
    num, den = names.index(numerator), names.index(denominator)
    return percentile_interval(intervals[numerator].value / intervals[denominator].value, draws[:, num] / draws[:, den])


class _Identity(nn.Module):
    """Features already computed, passed through torchmetrics' FID (which needs `num_features`)."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def frechet_from_features(generated: torch.Tensor, real: torch.Tensor) -> float:
    """torchmetrics' Fréchet distance between two feature sets (rows are samples)."""
    metric = FrechetInceptionDistance(feature=_Identity(generated.shape[1]))
    metric.update(real, real=True)
    metric.update(generated, real=False)
    return float(metric.compute())


@dataclass(frozen=True)
class FidComparison:
    """Per method: FID to real data, its gap to the reference method's FID, and its `shift`, the FID
    between its samples and the reference method's own samples (how far caching moved the
    distribution, without the noise of a small real set); `*_draws` feed ratio intervals."""

    fid: dict[str, Interval]
    gap: dict[str, Interval]
    shift: dict[str, Interval]
    gap_draws: dict[str, np.ndarray]
    shift_draws: dict[str, np.ndarray]


def fid_intervals(
    features: Mapping[str, torch.Tensor],
    real: torch.Tensor,
    reference: str,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> FidComparison:
    """Every figure of `FidComparison` with its interval.

    Rows of every method are paired (same prompt and seed); one draw resamples them jointly (the
    reference's rows too, for the shift) and the real set on its own.
    """
    count = _check(features)
    if reference not in features:
        raise ValueError(f"the reference method {reference!r} is not among {sorted(features)}")
    if len(real) < 2:
        raise ValueError("FID needs at least two real samples")
    rng = np.random.default_rng(seed)
    names = list(features)
    others = [n for n in names if n != reference]
    points = {n: frechet_from_features(features[n], real) for n in names}
    shift_points = {n: frechet_from_features(features[n], features[reference]) for n in others}
    draws = {n: np.empty(resamples) for n in names}
    shift_draws = {n: np.empty(resamples) for n in others}
    for r in range(resamples):
        rows = torch.from_numpy(rng.integers(0, count, size=count))
        real_rows = torch.from_numpy(rng.integers(0, len(real), size=len(real)))
        for n in names:
            draws[n][r] = frechet_from_features(features[n][rows], real[real_rows])
        for n in others:
            shift_draws[n][r] = frechet_from_features(features[n][rows], features[reference][rows])
    gap_draws = {n: draws[n] - draws[reference] for n in others}
    return FidComparison(
        fid={n: centred_interval(points[n], draws[n]) for n in names},
        gap={n: centred_interval(points[n] - points[reference], gap_draws[n]) for n in others},
        shift={n: centred_interval(shift_points[n], shift_draws[n]) for n in others},
        gap_draws=gap_draws,
        shift_draws=shift_draws,
    )


def draw_ratio_interval(
    points: Mapping[str, Interval], draws: Mapping[str, np.ndarray], numerator: str, denominator: str
) -> Interval:
    """Interval of one method's figure over another's, from the same paired draws."""
    return centred_interval(points[numerator].value / points[denominator].value, draws[numerator] / draws[denominator])
