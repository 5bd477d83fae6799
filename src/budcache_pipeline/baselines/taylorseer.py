"""diffusers' TaylorSeer (lite mode): computes on a fixed schedule and extrapolates the output in between.

Its schedule is fixed by (warm-up steps, interval), so it is calibrated by enumerating
every schedule that computes exactly the budget, at first and second order, and keeping
the one with the lowest loss on the calibration set. The schedule decides by step alone,
so a batch gives every sample what batch-1 generation would: it runs batched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from budcache_pipeline.baselines.baseline import Baseline, DiffusersCache
from budcache_pipeline.baselines.method import BaselineError

if TYPE_CHECKING:
    from budcache_pipeline.evaluation.calibration import BaselineCalibrator, Calibration

_MAX_WARM_UP = 6


def taylorseer_compute_steps(steps: int, cache_interval: int, disable_cache_before_step: int) -> list[int]:
    """The steps on which diffusers' TaylorSeer hook runs the full computation."""
    before = disable_cache_before_step
    return [s for s in range(steps) if s < before or (s - before - 1) % cache_interval == 0]


@dataclass(frozen=True)
class TaylorSeer(Baseline, DiffusersCache):
    """Compute the first `disable_cache_before_step` steps, then every `cache_interval`-th; extrapolate between."""

    cache_interval: int
    disable_cache_before_step: int
    max_order: int = 1
    kind: ClassVar[str] = "taylorseer"

    def __post_init__(self) -> None:
        for name in ("cache_interval", "disable_cache_before_step", "max_order"):
            object.__setattr__(self, name, int(getattr(self, name)))

    @property
    def parameter(self) -> float | None:
        return float(self.cache_interval)

    def compute_steps(self, steps: int) -> list[int]:
        return taylorseer_compute_steps(steps, self.cache_interval, self.disable_cache_before_step)

    def diffusers_config(self, steps: int) -> Any:
        from diffusers.hooks import TaylorSeerCacheConfig

        return TaylorSeerCacheConfig(
            cache_interval=self.cache_interval,
            disable_cache_before_step=self.disable_cache_before_step,
            max_order=self.max_order,
            taylor_factors_dtype=torch.float32,
            use_lite_mode=True,
        )

    @classmethod
    def schedules(cls, steps: int, budget: int) -> list[TaylorSeer]:
        """Every (warm-up, interval, order) whose schedule computes exactly `budget` of `steps` steps."""
        found: dict[tuple[int, ...], tuple[int, int]] = {}
        for before in range(1, min(budget, _MAX_WARM_UP) + 1):
            for interval in range(1, steps + 1):
                schedule = tuple(taylorseer_compute_steps(steps, interval, before))
                if len(schedule) == budget:
                    found.setdefault(schedule, (interval, before))
        members = [cls(interval, before, order) for order in (1, 2) for interval, before in found.values()]
        if not members:
            counts = sorted(
                {len(taylorseer_compute_steps(steps, i, b)) for i in range(1, steps + 1)
                 for b in range(1, _MAX_WARM_UP + 1)}
            )
            raise BaselineError(
                f"no TaylorSeer schedule computes exactly {budget} of {steps} steps (possible counts: {counts})"
            )
        return members

    @classmethod
    def calibrate(cls, calibrator: BaselineCalibrator, budget: int, match: str) -> Calibration:
        steps = calibrator.data.steps
        points = []
        for member in cls.schedules(steps, budget):
            point = calibrator.evaluate(member)
            expected = len(member.compute_steps(steps))
            if point.mean_compute_steps != expected:
                raise RuntimeError(
                    f"TaylorSeer computed {point.mean_compute_steps} steps where its schedule says {expected}: "
                    "diffusers' hook changed its step rule"
                )
            points.append(point)
            calibrator.progress(f"taylorseer B={budget}: {member.settings()} -> loss {point.loss:.3g}")
        best = min(points, key=lambda p: p.loss)
        return calibrator.record(cls.kind, best, budget, match, len(points), points)
