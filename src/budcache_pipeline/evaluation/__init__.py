"""Held-out evaluation shared by the Kedro `evaluate` pipeline and `budcache bench quality`.

`rollouts` runs a cache method over a rollout set and counts its work, `calibration` tunes a
baseline to a budget on the calibration set, `table` scores every method at every budget on
held-out pairs, and `shards` / `worker` run the held-out batches on torchrun ranks.
"""

from budcache_pipeline.evaluation.calibration import (
    BaselineCalibrator,
    Calibration,
    CalibrationPoint,
    calibrate_baselines,
    parse_entry,
    teacache_mask,
)
from budcache_pipeline.evaluation.rollouts import ComputeCounter, MethodRun, RolloutSet, probe_module, run_method
from budcache_pipeline.evaluation.table import (
    COLUMNS,
    IMAGE_QUALITY,
    UNCACHED,
    EvalMethod,
    QualityMetrics,
    best_per_budget,
    evaluate_methods,
    finite_or_none,
)

__all__ = [
    "COLUMNS",
    "IMAGE_QUALITY",
    "UNCACHED",
    "BaselineCalibrator",
    "Calibration",
    "CalibrationPoint",
    "ComputeCounter",
    "EvalMethod",
    "MethodRun",
    "QualityMetrics",
    "RolloutSet",
    "best_per_budget",
    "calibrate_baselines",
    "evaluate_methods",
    "finite_or_none",
    "parse_entry",
    "probe_module",
    "run_method",
    "teacache_mask",
]
