"""Register pipeline: scored ladder + reports → provenance → MLflow run + registered version (alias `candidate`)."""

from collections.abc import Iterable

from kedro.pipeline import Node, Pipeline

from budcache_pipeline.pipelines.evaluate.nodes import collect_ladder
from budcache_pipeline.pipelines.register.nodes import (
    by_budget,
    collect_files,
    collect_folders,
    collect_paths,
    register_policies,
)
from budcache_pipeline.pipelines.register.provenance import record_provenance
from budcache_pipeline.pipelines.search.pipeline import budget_namespace

PLOTS = ("pareto_plot", "mask_map_plot", "forecast_gains_plot", "convergence_plots", "sample_grid_plots")
FILES = (
    "metrics_table_csv@file",
    "baseline_calibrations@file",
    "metrics_summary@file",
    "ingest_summary@file",
    "reference_summary@file",
)
SEARCH_FILES = ("search_history@file", "search_summary@file")
ALIGN_FILES = ("alignment_report@file",)
"""The files the run logs, as catalog inputs, so `register` runs after their writers and uploads exactly them."""


def _namespaced(names: Iterable[str], budgets: tuple[int, ...]) -> list[str]:
    """Each budget's copy of each name, budget by budget."""
    return [f"{budget_namespace(b)}.{name}" for b in budgets for name in names]


def _collect(budgets: tuple[int, ...]) -> list[Node]:
    """The per-budget outputs as ladders and dicts by budget, and the files to log as lists."""
    return [
        Node(collect_ladder, inputs=_namespaced(["final_policy"], budgets), outputs="final_ladder",
             name="collect_final_ladder"),
        Node(by_budget(budgets), inputs=_namespaced(["search_summary@json"], budgets), outputs="search_summaries",
             name="collect_search_summaries"),
        Node(by_budget(budgets), inputs=_namespaced(["alignment_report@json"], budgets), outputs="alignment_reports",
             name="collect_alignment_reports"),
        Node(collect_files, inputs=list(PLOTS), outputs="registered_plots", name="collect_plots"),
        Node(collect_paths, inputs=list(FILES), outputs="registered_files", name="collect_run_files"),
        Node(collect_paths, inputs=_namespaced(SEARCH_FILES, budgets), outputs="registered_search_files",
             name="collect_search_files"),
        Node(collect_paths, inputs=_namespaced(ALIGN_FILES, budgets), outputs="registered_align_files",
             name="collect_align_files"),
        Node(collect_folders, inputs=["registered_plots", "registered_search_files", "registered_align_files"],
             outputs="registered_folders", name="collect_folders"),
    ]


def create_pipeline(budgets: Iterable[int] = (), **kwargs: object) -> Pipeline:
    budgets = tuple(sorted(budgets, reverse=True))
    provenance = Node(
        record_provenance, inputs=["final_ladder", "params:register.data_paths"], outputs="provenance",
        name="record_provenance",
    )
    register = Node(
        register_policies,
        inputs=[
            "final_ladder",
            "metrics_summary@json",
            "search_summaries",
            "alignment_reports",
            "reference_summary@json",
            "ingest_summary@json",
            "provenance",
            "parameters",
            "registered_files",
            "registered_folders",
        ],
        outputs="registration",
        name="register_ladder",
    )
    return Pipeline([*_collect(budgets), provenance, register])
