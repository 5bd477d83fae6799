"""TeaCache as a baseline: per-sample decisions on the first block's modulated-input change.

The hooks and the polynomial fit live in `caching.teacache`; this module is what the
evaluation needs: the parameters, how a run counts its own work (every sample keeps its
own decisions, so a batch gives batch-1 counts), and the two calibration families, with
the polynomial fitted on the calibration set or FLUX.1's published one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from budcache_pipeline.baselines.baseline import ThresholdBaseline
from budcache_pipeline.baselines.method import BaselineError
from budcache_pipeline.caching.teacache import (
    FLUX_TEACACHE_COEFFICIENTS,
    TeaCacheConfig,
    disable_teacache,
    enable_teacache,
    get_teacache,
)

if TYPE_CHECKING:
    from budcache_pipeline.evaluation.calibration import BaselineCalibrator


@dataclass(frozen=True)
class TeaCache(ThresholdBaseline):
    """Compute when the rescaled accumulated change passes `threshold`; the polynomial fitted per model."""

    coefficients: tuple[float, ...] = FLUX_TEACACHE_COEFFICIENTS
    kind: ClassVar[str] = "teacache"
    start_threshold: ClassVar[float] = 0.3

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "coefficients", tuple(float(c) for c in self.coefficients))

    def enable(self, transformer: torch.nn.Module, sigmas: torch.Tensor) -> None:
        enable_teacache(transformer, TeaCacheConfig(self.threshold, len(sigmas) - 1, self.coefficients))

    def disable(self, transformer: torch.nn.Module) -> None:
        disable_teacache(transformer)

    def reset(self, transformer: torch.nn.Module) -> None:
        _runtime(transformer).reset()

    def compute_counts(self, transformer: torch.nn.Module) -> np.ndarray | None:
        """Per sample, the most computations of any cache context (cond and uncond decide alike)."""
        return torch.stack(list(_runtime(transformer).compute_counts().values())).amax(dim=0).numpy()

    def step_decisions(self, transformer: torch.nn.Module) -> torch.Tensor:
        """(steps, batch) booleans of the latest rollout: which samples computed on which step."""
        return _runtime(transformer).step_decisions()

    def settings(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "coefficients": [float(f"{c:.6g}") for c in self.coefficients]}

    @classmethod
    def family(
        cls, calibrator: BaselineCalibrator, budget: int
    ) -> tuple[Callable[[float], ThresholdBaseline], tuple[Any, ...]]:
        coefficients = cls.calibration_coefficients(calibrator)
        return (lambda threshold: TeaCache(threshold, coefficients)), (cls.kind, coefficients)

    @classmethod
    def calibration_coefficients(cls, calibrator: BaselineCalibrator) -> tuple[float, ...]:
        """The polynomial fitted on the calibrator's uncached rollouts (or the one it was given)."""
        return calibrator.teacache_coefficients


class PublishedTeaCache(TeaCache):
    """TeaCache with FLUX.1's published polynomial instead of one fitted to the model."""

    kind: ClassVar[str] = "teacache_flux"

    @classmethod
    def calibration_coefficients(cls, calibrator: BaselineCalibrator) -> tuple[float, ...]:
        return FLUX_TEACACHE_COEFFICIENTS


def _runtime(transformer: torch.nn.Module) -> Any:
    runtime = get_teacache(transformer)
    if runtime is None:
        raise BaselineError("TeaCache is not enabled on this transformer")
    return runtime
