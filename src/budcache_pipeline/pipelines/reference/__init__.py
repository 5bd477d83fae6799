"""Reference: uncached teacher trajectories for the calibration and holdout prompts."""

from budcache_pipeline.pipelines.reference.pipeline import create_pipeline

__all__ = ["create_pipeline"]
