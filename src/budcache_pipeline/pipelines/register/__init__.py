"""Register: one MLflow run and a new registered version of the policy ladder, alias `candidate`."""

from budcache_pipeline.pipelines.register.pipeline import create_pipeline

__all__ = ["create_pipeline"]
