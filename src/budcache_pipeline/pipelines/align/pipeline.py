"""Align pipeline: per budget, `budget_<B>.policy` → `budget_<B>.aligned_policy` + alignment report."""

from collections.abc import Iterable

from kedro.pipeline import Node, Pipeline

from budcache_pipeline.pipelines.align.nodes import align_budget
from budcache_pipeline.pipelines.search.pipeline import budget_namespace

SHARED_INPUTS = {"reference_calibration", "reference_holdout", "calibration_prompts", "model"}
SHARED_PARAMETERS = {"params:align"}


def _align_for(budget: int) -> Pipeline:
    template = Pipeline(
        [
            Node(
                align_budget,
                inputs=[
                    "policy",
                    "reference_calibration",
                    "reference_holdout",
                    "calibration_prompts",
                    "model",
                    "params:align",
                ],
                outputs=["aligned_policy", "alignment_report@json"],
                name="align_schedule",
            )
        ]
    )
    return Pipeline(
        template, namespace=budget_namespace(budget), inputs=SHARED_INPUTS, parameters=SHARED_PARAMETERS
    )


def create_pipeline(budgets: Iterable[int] = (), **kwargs: object) -> Pipeline:
    return sum((_align_for(budget) for budget in budgets), Pipeline([]))
