"""Evaluate pipeline: ladder and budget-matched baselines on the held-out set → metrics, plots, scored policies."""

from collections.abc import Iterable

from kedro.pipeline import Node, Pipeline

from budcache_pipeline.pipelines.evaluate.nodes import (
    collect_ladder,
    convergence_plots,
    evaluate_ladder,
    forecast_gains_plot,
    headline_metrics,
    mask_map,
    pareto_plot,
    sample_grids,
    score_policies,
    summarise_metrics,
)
from budcache_pipeline.pipelines.register.nodes import by_budget
from budcache_pipeline.pipelines.search.pipeline import budget_namespace

PER_BUDGET = ("policy", "aligned_policy", "search_history@pandas", "final_policy")
"""The namespaced datasets this pipeline reads or writes once per budget."""


def _collect_ladders(per_budget: dict[str, list[str]]) -> list[Node]:
    """The searched and aligned policies of every budget, each as one ladder keyed by budget."""
    return [
        Node(collect_ladder, inputs=per_budget["policy"], outputs="searched_ladder", name="collect_searched_ladder"),
        Node(
            collect_ladder, inputs=per_budget["aligned_policy"], outputs="aligned_ladder", name="collect_aligned_ladder"
        ),
    ]


def _evaluate() -> Node:
    """Every method at every budget on the held-out pairs: the one node that runs the model."""
    return Node(
        evaluate_ladder,
        inputs=[
            "searched_ladder",
            "aligned_ladder",
            "reference_calibration",
            "reference_holdout",
            "calibration_prompts",
            "holdout_prompts",
            "model",
            "params:evaluate",
        ],
        outputs=["metrics_table", "metrics_table_csv@pandas", "baseline_calibrations@json", "evaluation_samples"],
        name="evaluate_ladder",
    )


def _reports(per_budget: dict[str, list[str]]) -> list[Node]:
    """The scored ladder, the summaries for MLflow and `dvc metrics show`."""
    return [
        Node(
            score_policies, inputs=["aligned_ladder", "metrics_table"], outputs=per_budget["final_policy"],
            name="score_policies",
        ),
        Node(
            summarise_metrics, inputs=["metrics_table", "aligned_ladder"], outputs="metrics_summary@json",
            name="summarise_metrics",
        ),
        Node(
            headline_metrics, inputs=["metrics_table", "aligned_ladder"], outputs="headline_metrics",
            name="headline_metrics",
        ),
    ]


def _plots(per_budget: dict[str, list[str]], budgets: tuple[int, ...]) -> list[Node]:
    """The Pareto front, the mask map, the forecast gains, each budget's convergence and sample grids."""
    return [
        Node(pareto_plot, inputs="metrics_table", outputs="pareto_plot", name="plot_pareto"),
        Node(mask_map, inputs="aligned_ladder", outputs="mask_map_plot", name="plot_mask_map"),
        Node(forecast_gains_plot, inputs="aligned_ladder", outputs="forecast_gains_plot", name="plot_forecast_gains"),
        Node(
            by_budget(budgets), inputs=per_budget["search_history@pandas"], outputs="search_histories",
            name="collect_search_histories",
        ),
        Node(convergence_plots, inputs="search_histories", outputs="convergence_plots", name="plot_convergence"),
        Node(sample_grids, inputs="evaluation_samples", outputs="sample_grid_plots", name="plot_sample_grids"),
    ]


def create_pipeline(budgets: Iterable[int] = (), **kwargs: object) -> Pipeline:
    budgets = tuple(sorted(budgets, reverse=True))
    per_budget = {name: [f"{budget_namespace(b)}.{name}" for b in budgets] for name in PER_BUDGET}
    return Pipeline([*_collect_ladders(per_budget), _evaluate(), *_reports(per_budget), *_plots(per_budget, budgets)])
