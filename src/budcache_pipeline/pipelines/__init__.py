"""Kedro pipelines: thin nodes over the library modules."""
