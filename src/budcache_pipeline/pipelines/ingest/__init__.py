"""Ingest: a raw prompt file becomes validated calibration and holdout sets."""

from budcache_pipeline.pipelines.ingest.pipeline import create_pipeline

__all__ = ["create_pipeline"]
