"""Register pipeline: scored ladder + reports → MLflow run + registered version (alias `candidate`)."""

from collections.abc import Iterable

from kedro.pipeline import Node, Pipeline

from budcache_pipeline.pipelines.evaluate.nodes import collect_ladder
from budcache_pipeline.pipelines.register.nodes import (
    by_budget,
    collect_files,
    collect_tables,
    register_policies,
)
from budcache_pipeline.pipelines.search.pipeline import budget_namespace

PLOTS = ("pareto_plot", "mask_map_plot", "convergence_plots", "sample_grid_plots")
TABLES = ("metrics_table_csv@file", "baseline_calibrations@file")
"""The evaluate pipeline's files that the run logs, as catalog inputs so `register` runs after them."""


def create_pipeline(budgets: Iterable[int] = (), **kwargs: object) -> Pipeline:
    budgets = tuple(sorted(budgets, reverse=True))
    per_budget = {
        name: [f"{budget_namespace(b)}.{name}" for b in budgets]
        for name in ("final_policy", "search_summary", "alignment_report")
    }
    return Pipeline(
        [
            Node(
                collect_ladder, inputs=per_budget["final_policy"], outputs="final_ladder", name="collect_final_ladder"
            ),
            Node(
                by_budget(budgets),
                inputs=per_budget["search_summary"],
                outputs="search_summaries",
                name="collect_search_summaries",
            ),
            Node(
                by_budget(budgets),
                inputs=per_budget["alignment_report"],
                outputs="alignment_reports",
                name="collect_alignment_reports",
            ),
            Node(
                collect_files,
                inputs=list(PLOTS),
                outputs="registered_plots",
                name="collect_plots",
            ),
            Node(collect_tables, inputs=list(TABLES), outputs="registered_tables", name="collect_tables"),
            Node(
                register_policies,
                inputs=[
                    "final_ladder",
                    "metrics_summary",
                    "search_summaries",
                    "alignment_reports",
                    "reference_summary",
                    "ingest_summary",
                    "parameters",
                    "registered_plots",
                    "registered_tables",
                ],
                outputs="registration",
                name="register_ladder",
            ),
        ]
    )
