"""Search pipeline: one namespaced copy per budget (`budget_<B>.policy`, ...), budgets from settings."""

from collections.abc import Callable, Iterable
from typing import Any

import pandas as pd
from kedro.pipeline import Node, Pipeline

from budcache_pipeline.pipelines.common import ModelHandle
from budcache_pipeline.pipelines.search.nodes import search_budget
from budcache_pipeline.policy import CachePolicy
from budcache_pipeline.search import ReferenceSet

SHARED_INPUTS = {"reference_calibration", "calibration_prompts", "model"}
SHARED_PARAMETERS = {"params:search"}


def budget_namespace(budget: int) -> str:
    return f"budget_{budget}"


def _search_node(budget: int) -> Callable[..., tuple[CachePolicy, pd.DataFrame, dict[str, Any]]]:
    """`search_budget` with the budget bound: Kedro passes datasets, the budget is the namespace's."""

    def search_policy(
        reference_calibration: ReferenceSet,
        calibration_prompts: pd.DataFrame,
        model: ModelHandle,
        params: dict[str, Any],
    ) -> tuple[CachePolicy, pd.DataFrame, dict[str, Any]]:
        return search_budget(reference_calibration, calibration_prompts, model, params, budget)

    return search_policy


def _search_for(budget: int) -> Pipeline:
    template = Pipeline(
        [
            Node(
                _search_node(budget),
                inputs=["reference_calibration", "calibration_prompts", "model", "params:search"],
                outputs=["policy", "search_history@pandas", "search_summary@json"],
                name="search_policy",
            )
        ]
    )
    return Pipeline(
        template, namespace=budget_namespace(budget), inputs=SHARED_INPUTS, parameters=SHARED_PARAMETERS
    )


def create_pipeline(budgets: Iterable[int] = (), **kwargs: object) -> Pipeline:
    return sum((_search_for(budget) for budget in budgets), Pipeline([]))
