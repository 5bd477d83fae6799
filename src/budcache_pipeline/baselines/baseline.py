"""The interface every heuristic baseline implements, and the two families most of them belong to.

A `Baseline` is a `CacheMethod` that also knows how it is tuned to a budget: given a
calibrator (a calibration set with its uncached finals, see `evaluation.calibration`) it
returns the member of its family whose mean cost over that set matches the budget.
Threshold caches share one rule (bisect the threshold); diffusers' own caches share one
way of being applied (`transformer.enable_cache`).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from budcache_pipeline.baselines.method import BaselineError, CacheMethod

if TYPE_CHECKING:
    from budcache_pipeline.evaluation.calibration import BaselineCalibrator, Calibration


class Baseline(CacheMethod):
    """A heuristic cache a searched policy must beat at the same budget."""

    @classmethod
    @abstractmethod
    def calibrate(cls, calibrator: BaselineCalibrator, budget: int, match: str) -> Calibration:
        """The member of this family whose mean cost on the calibrator's set is closest to `budget`."""


@dataclass(frozen=True)
class ThresholdBaseline(Baseline):
    """Computes the block stack when an accumulated change passes `threshold`: cost falls as it grows."""

    threshold: float
    start_threshold: ClassVar[float]
    """Where the bisection bracket starts; it grows from there until the cost falls below the budget."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "threshold", float(self.threshold))

    @property
    def parameter(self) -> float | None:
        return self.threshold

    @classmethod
    def family(
        cls, calibrator: BaselineCalibrator, budget: int
    ) -> tuple[Callable[[float], ThresholdBaseline], tuple[Any, ...]]:
        """Members by threshold at `budget`, and the key under which budgets share their evaluations."""
        return cls, (cls.kind,)

    @classmethod
    def fewest_compute_steps(cls, steps: int, budget: int) -> int | None:
        """The fewest computations any threshold can give, when the family has such a floor."""
        return None

    @classmethod
    def calibrate(cls, calibrator: BaselineCalibrator, budget: int, match: str) -> Calibration:
        make, key = cls.family(calibrator, budget)
        floor = cls.fewest_compute_steps(calibrator.data.steps, budget)
        return calibrator.bisect(cls.kind, make, key, budget, match, cls.start_threshold, floor)


class DiffusersCache(CacheMethod):
    """A cache that diffusers ships as a hook config, applied through `transformer.enable_cache`."""

    @abstractmethod
    def diffusers_config(self, steps: int) -> Any:
        """The diffusers config for a sampler of `steps` steps."""

    def enable(self, transformer: torch.nn.Module, sigmas: torch.Tensor) -> None:
        if not hasattr(transformer, "enable_cache"):
            raise BaselineError(
                f"{type(transformer).__name__} has no `enable_cache`: diffusers' {self.kind} does not run on it"
            )
        transformer.enable_cache(self.diffusers_config(len(sigmas) - 1))

    def disable(self, transformer: torch.nn.Module) -> None:
        transformer.disable_cache()

    def reset(self, transformer: torch.nn.Module) -> None:
        transformer._reset_stateful_cache()
