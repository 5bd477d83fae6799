"""Project pipelines."""

from __future__ import annotations

from kedro.pipeline import Pipeline

from budcache_pipeline import settings
from budcache_pipeline.pipelines import ingest


def configured_budgets() -> tuple[int, ...]:
    """`settings.BUDGETS`, checked: distinct positive integers, largest first.

    Budgets name pipeline namespaces (`budget_<B>`), so a bad value must fail when the
    pipelines are built rather than halfway through a run.
    """
    budgets = tuple(settings.BUDGETS)
    if not budgets or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in budgets):
        raise ValueError(f"settings.BUDGETS must be positive integers, got {settings.BUDGETS!r}")
    if len(set(budgets)) != len(budgets):
        raise ValueError(f"settings.BUDGETS has repeated budgets: {settings.BUDGETS!r}")
    return tuple(sorted(budgets, reverse=True))


def register_pipelines() -> dict[str, Pipeline]:
    """Named pipelines for `kedro run --pipelines NAME`; `__default__` runs them all."""
    configured_budgets()
    pipelines = {"ingest": ingest.create_pipeline()}
    pipelines["__default__"] = sum(pipelines.values(), Pipeline([]))
    return pipelines
