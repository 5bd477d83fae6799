"""diffusers' MagCache: skips while the accumulated error predicted by measured residual-magnitude ratios is small.

The ratios are measured once from the calibration set's uncached rollouts (the same trace
that fits TeaCache). diffusers' defaults (retention 0.2, at most 3 skips in a row) cannot go
below about 12 of 28 steps, so tighter budgets shorten the retention and allow longer skips.
One decision is shared by a batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from budcache_pipeline.baselines.baseline import DiffusersCache, ThresholdBaseline
from budcache_pipeline.baselines.method import check_length

if TYPE_CHECKING:
    from budcache_pipeline.evaluation.calibration import BaselineCalibrator


def mag_cache_schedule(steps: int, budget: int) -> tuple[int, int]:
    """(retention steps, max consecutive skips) that let MagCache reach `budget` with room for its threshold."""
    retention = max(1, min(round(0.2 * steps), budget // 2))
    for max_skip in range(3, steps + 1):
        if mag_cache_min_steps(steps, retention, max_skip) <= budget - 1:
            return retention, max_skip
    return retention, steps


def mag_cache_min_steps(steps: int, retention: int, max_skip: int) -> int:
    """The fewest computations MagCache can make: the retained steps, then one after every `max_skip` skips."""
    return retention + (steps - retention) // (max_skip + 1)


@dataclass(frozen=True)
class MagCache(ThresholdBaseline, DiffusersCache):
    """Skip while the predicted accumulated error stays under `threshold`, within the retention and skip limits."""

    mag_ratios: tuple[float, ...]
    retention_ratio: float
    max_skip_steps: int
    kind: ClassVar[str] = "mag_cache"
    per_image: ClassVar[bool] = True
    start_threshold: ClassVar[float] = 0.06

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "mag_ratios", tuple(float(r) for r in self.mag_ratios))
        object.__setattr__(self, "retention_ratio", float(self.retention_ratio))
        object.__setattr__(self, "max_skip_steps", int(self.max_skip_steps))

    def diffusers_config(self, steps: int) -> Any:
        from diffusers.hooks import MagCacheConfig

        check_length("MagCache ratios", self.mag_ratios, steps)
        return MagCacheConfig(
            threshold=self.threshold,
            max_skip_steps=self.max_skip_steps,
            retention_ratio=self.retention_ratio,
            num_inference_steps=steps,
            mag_ratios=torch.tensor(self.mag_ratios),
        )

    def settings(self) -> dict[str, Any]:
        return {k: v for k, v in super().settings().items() if k != "mag_ratios"}

    @classmethod
    def family(
        cls, calibrator: BaselineCalibrator, budget: int
    ) -> tuple[Callable[[float], ThresholdBaseline], tuple[Any, ...]]:
        steps = calibrator.data.steps
        retention, max_skip = mag_cache_schedule(steps, budget)
        ratios = calibrator.mag_ratios
        return (
            lambda threshold: MagCache(threshold, ratios, retention / steps, max_skip)
        ), (cls.kind, retention, max_skip)

    @classmethod
    def fewest_compute_steps(cls, steps: int, budget: int) -> int | None:
        return mag_cache_min_steps(steps, *mag_cache_schedule(steps, budget))
