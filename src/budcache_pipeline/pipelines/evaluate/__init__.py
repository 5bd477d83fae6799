"""Evaluate: policies and budget-matched baselines on the held-out set → tables, metrics and plots."""

from budcache_pipeline.pipelines.evaluate.pipeline import create_pipeline

__all__ = ["create_pipeline"]
