"""Project pipelines."""

from __future__ import annotations

import os
import warnings

from kedro.pipeline import Pipeline

from budcache_pipeline import settings
from budcache_pipeline.pipelines import align, evaluate, ingest, reference, register, search

BUDGETS_ENV = "BUDCACHE_BUDGETS"
"""Comma-separated budgets that replace `settings.BUDGETS` for one run (e.g. `BUDCACHE_BUDGETS=10,5`)."""


def configured_budgets() -> tuple[int, ...]:
    """`settings.BUDGETS` (or `$BUDCACHE_BUDGETS`), checked: distinct positive integers, largest first.

    Budgets name pipeline namespaces (`budget_<B>`), so a bad value must fail when the
    pipelines are built rather than halfway through a run. The environment variable lets
    a scheduled job or a test run another ladder without editing the project.
    """
    override = os.environ.get(BUDGETS_ENV, "").strip()
    if override:
        try:
            budgets = tuple(int(b) for b in override.split(","))
        except ValueError:
            raise ValueError(f"{BUDGETS_ENV} must be comma-separated integers, got {override!r}") from None
        source = f"{BUDGETS_ENV}={override!r}"
    else:
        budgets = tuple(settings.BUDGETS)
        source = f"settings.BUDGETS={settings.BUDGETS!r}"
    if not budgets or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in budgets):
        raise ValueError(f"budgets must be positive integers, got {source}")
    if len(set(budgets)) != len(budgets):
        raise ValueError(f"repeated budgets in {source}: list each budget once")
    return tuple(sorted(budgets, reverse=True))


def register_pipelines() -> dict[str, Pipeline]:
    """Named pipelines for `kedro run --pipelines NAME`; `__default__` runs them all in order.

    `search` and `align` hold one namespaced copy per budget (`budget_<B>.policy`, ...).
    """
    budgets = configured_budgets()
    with warnings.catch_warnings():
        # evaluate and register read every budget's namespaced outputs (`budget_<B>.policy`) on purpose.
        warnings.filterwarnings("ignore", message="One or more dataset names contain '.'", category=UserWarning)
        pipelines = {
            "ingest": ingest.create_pipeline(),
            "reference": reference.create_pipeline(),
            "search": search.create_pipeline(budgets=budgets),
            "align": align.create_pipeline(budgets=budgets),
            "evaluate": evaluate.create_pipeline(budgets=budgets),
            "register": register.create_pipeline(budgets=budgets),
        }
    pipelines["__default__"] = sum(pipelines.values(), Pipeline([]))
    return pipelines
