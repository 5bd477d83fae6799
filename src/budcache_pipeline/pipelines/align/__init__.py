"""Align: cache-aware schedule alignment for tight budgets, kept only when it wins on held-out pairs."""

from budcache_pipeline.pipelines.align.pipeline import create_pipeline

__all__ = ["create_pipeline"]
