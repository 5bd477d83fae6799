"""Search: one namespaced SA + HC search per budget over the calibration teachers."""

from budcache_pipeline.pipelines.search.pipeline import create_pipeline

__all__ = ["create_pipeline"]
