"""Evaluate nodes: Kedro wrappers over `evaluation` and `reporting`."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from matplotlib.figure import Figure

from budcache_pipeline.baselines import CacheMethod, FixedPolicy, Uncached
from budcache_pipeline.evaluation import (
    IMAGE_QUALITY,
    BaselineCalibrator,
    EvalMethod,
    MethodRun,
    QualityMetrics,
    RolloutSet,
    evaluate_methods,
    finite_or_none,
    run_method,
)
from budcache_pipeline.evaluation.calibration import calibrate_baselines
from budcache_pipeline.evaluation.shards import batch_slices, saved_method_run
from budcache_pipeline.evaluation.worker import MODULE as EVALUATION_WORKER
from budcache_pipeline.pipelines.common import ModelHandle, process_count, resume_dir
from budcache_pipeline.pipelines.search.nodes import calibration_subset
from budcache_pipeline.policy import CachePolicy
from budcache_pipeline.reporting import (
    plot_convergence,
    plot_forecast_gains,
    plot_masks,
    plot_pareto,
    plot_sample_grid,
)
from budcache_pipeline.search import ReferenceSet
from budcache_pipeline.search.distributed import launch_torchrun
from budcache_pipeline.search.reference import save_reference

logger = logging.getLogger(__name__)

SEARCHED = "budcache"
ALIGNED = "budcache_aligned"
SUMMARY_METRICS = (
    "latent_mse",
    "latent_mse_std",
    *IMAGE_QUALITY,
    "compute_steps_mean",
    "compute_steps_std",
    "speedup",
)


def is_aligned(policy: CachePolicy) -> bool:
    """Whether the align pipeline replaced the policy's schedule."""
    return "alignment" in policy.provenance


def collect_ladder(*policies: CachePolicy) -> dict[int, CachePolicy]:
    """The per-budget policies as one ladder keyed by budget."""
    return {policy.budget: policy for policy in policies}


def _categories(prompts: pd.DataFrame, reference: ReferenceSet) -> list[Any]:
    """Each held-out pair's prompt category, in the reference's order (for the model's quality plug-in)."""
    category = {(p, int(s)): c for p, s, c in zip(prompts["prompt"], prompts["seed"], prompts["category"])}
    return [category.get((p, int(s))) for p, s in zip(reference.prompts, reference.seeds)]


def _quality(adapter: Any, reference: ReferenceSet, prompts: pd.DataFrame, params: dict[str, Any]) -> QualityMetrics:
    """Image metrics: the model's quality plug-in (`quality: model`), or PSNR/SSIM alone (`quality: images`)."""
    if params.get("quality", "model") == "model":
        return adapter.quality_metrics(reference, _categories(prompts, reference))
    return QualityMetrics(decode=adapter.quality_metrics(reference).decode)


def evaluate_ladder(
    searched: dict[int, CachePolicy],
    aligned: dict[int, CachePolicy],
    reference_calibration: ReferenceSet,
    reference_holdout: ReferenceSet,
    calibration_prompts: pd.DataFrame,
    holdout_prompts: pd.DataFrame,
    model: ModelHandle,
    params: dict[str, Any],
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, list[dict[str, Any]]], dict[str, dict[str, torch.Tensor]]]:
    """Every method at every budget on the held-out pairs, baselines tuned to the same mean budget.

    Baselines (`name` or `name@blocks`) are calibrated on a category-balanced calibration
    subset, never on held-out pairs, to the budget in full block-stack computations or, with
    `@blocks`, in block evaluations; a baseline that cannot reach a budget is left out and
    recorded. Returns the metrics table (twice: parquet and CSV), the calibrations, and decoded
    sample images per budget for the grids.
    """
    adapter = model.adapter
    indices = calibration_subset(calibration_prompts, reference_calibration, params.get("calibration_size"))
    calibrator = BaselineCalibrator(
        RolloutSet.from_reference(adapter, reference_calibration.subset(indices)),
        max_evaluations=int(params["max_calibration_evaluations"]),
        progress=logger.info,
    )
    calibrations, skipped = calibrate_baselines(
        calibrator, params["baselines"], list(searched), logger.info, logger.warning
    )
    methods = []
    for budget in sorted(searched, reverse=True):
        methods.append(EvalMethod(SEARCHED, budget, FixedPolicy.of(searched[budget])))
        if is_aligned(aligned[budget]):
            methods.append(EvalMethod(ALIGNED, budget, FixedPolicy.of(aligned[budget])))
        methods.extend(
            EvalMethod(c.name, budget, c.method, c.info()) for c in calibrations if c.budget == budget
        )
    quality = _quality(adapter, reference_holdout, holdout_prompts, params)
    finals: dict[tuple[str, int], torch.Tensor] = {}
    holdout = RolloutSet.from_reference(adapter, reference_holdout)
    run, scratch = _held_out_runs(holdout, reference_holdout, [m.method for m in methods], model.params, params)
    table = evaluate_methods(
        holdout,
        methods,
        quality,
        timing_images=int(params["timing_images"]),
        collect=finals,
        progress=logger.info,
        run=run,
    )
    if scratch is not None:
        shutil.rmtree(scratch, ignore_errors=True)
    samples = _samples(finals, quality, int(params["grid_images"]), reference_holdout.steps)
    return table, table, {"calibrations": [c.summary() for c in calibrations], "unreachable": skipped}, samples


def _held_out_runs(
    holdout: RolloutSet,
    reference: ReferenceSet,
    methods: Sequence[CacheMethod],
    model_params: dict[str, Any],
    params: dict[str, Any],
) -> tuple[Callable[[CacheMethod, RolloutSet], MethodRun], Path | None]:
    """How each method's held-out run is made, and the scratch folder to remove afterwards.

    Without `params.batch_size` every method runs over all held-out pairs at once. With it the
    runs go batch by batch into a scratch folder under `params.resume_dir` (an interrupted run
    resumes there), and with `params.processes` above 1 torchrun ranks fill their blocks of
    batches first: the same batches, so the same table as one process with that batch size.
    """
    batch_size = params.get("batch_size")
    processes = process_count(params.get("processes", 1), "evaluate.processes")
    batches = batch_slices(len(holdout), batch_size)
    if processes > 1 and batch_size is None:
        raise ValueError(
            f"evaluate.processes {processes} needs evaluate.batch_size: the ranks share the held-out batches "
            "(one process with the same batch_size gives the same table)"
        )
    if batch_size is None:
        return run_method, None
    identity = {**{k: reference.manifest[k] for k in ("prompts_seeds_sha256", "model_fingerprint", "sigmas")},
                "batch_size": batch_size}
    scratch = resume_dir(params["resume_dir"], "holdout", identity)
    scratch.mkdir(parents=True, exist_ok=True)
    if processes > 1:
        if not (scratch / "reference" / "manifest.json").is_file():
            save_reference(reference, scratch / "reference")
        job = scratch / "job.json"
        job.write_text(json.dumps({
            "model": dict(model_params), "reference": str(scratch / "reference"), "batch_size": batch_size,
            "methods": [m.to_json() for m in (Uncached(), *methods)], "out_dir": str(scratch),
        }))
        logger.info("held-out runs: %d batches of %d on %d torchrun processes", len(batches), batch_size, processes)
        launch_torchrun(EVALUATION_WORKER, job, processes)
    return partial(saved_method_run, out_dir=scratch, batch_size=batch_size), scratch


def _samples(
    finals: dict[tuple[str, int], torch.Tensor], quality: QualityMetrics, count: int, steps: int
) -> dict[str, dict[str, torch.Tensor]]:
    """Decoded first `count` held-out images of each method, grouped by budget (uncached in every group)."""
    if quality.decode is None or count < 1:
        return {}
    uncached = quality.decode(finals[("uncached", steps)][:count])
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for (method, budget), final in finals.items():
        if method == "uncached":
            continue
        group = groups.setdefault(f"budget_{budget}", {"uncached": uncached})
        group[method] = quality.decode(final[:count])
    return groups


def _policy_row(rows: pd.DataFrame, policy: CachePolicy) -> pd.Series:
    return rows[rows["method"] == (ALIGNED if is_aligned(policy) else SEARCHED)].iloc[0]


def _best_baseline(rows: pd.DataFrame, ours: pd.Series) -> pd.Series | None:
    """The lowest-MSE baseline at this budget that costs no more block evaluations per image than the policy:
    a cache that also runs part of the stack on cached steps (FirstBlockCache matched on compute steps)
    buys its quality with extra work."""
    baselines = rows[
        ~rows["method"].isin([SEARCHED, ALIGNED])
        & (rows["block_evaluations_mean"] <= ours["block_evaluations_mean"] * (1 + 1e-9))
    ]
    return None if baselines.empty else baselines.loc[baselines["latent_mse"].idxmin()]


def summarise_metrics(metrics_table: pd.DataFrame, ladder: dict[int, CachePolicy]) -> dict[str, Any]:
    """The headline numbers for MLflow: per budget and method, and the policy's gain (relative
    held-out latent MSE reduction) over the best baseline at that budget that costs no more."""
    summary: dict[str, Any] = {"holdout_pairs": int(metrics_table["images"].iloc[0])}
    for row in metrics_table.itertuples(index=False):
        entry = {metric: finite_or_none(getattr(row, metric)) for metric in SUMMARY_METRICS}
        if row.method == "uncached":
            summary["uncached"] = entry
        else:
            summary.setdefault(f"budget_{row.budget}", {})[row.method] = entry
    for budget, policy in sorted(ladder.items(), reverse=True):
        rows = metrics_table[metrics_table["budget"] == budget]
        ours = _policy_row(rows, policy)
        headline: dict[str, Any] = {"latent_mse": finite_or_none(ours["latent_mse"]), "aligned": is_aligned(policy)}
        best = _best_baseline(rows, ours)
        if best is not None:
            headline["best_baseline"] = str(best["method"])
            headline["gain_over_best_baseline"] = (
                finite_or_none(1.0 - ours["latent_mse"] / best["latent_mse"]) if best["latent_mse"] > 0 else None
            )
        summary[f"budget_{budget}"]["policy"] = headline
    return summary


HEADLINE_SCALE = 1e6
"""Latent MSE is shown in millionths: `dvc metrics show` rounds to 5 decimals, which would print 2.6e-06 as 0."""


def headline_metrics(metrics_table: pd.DataFrame, ladder: dict[int, CachePolicy]) -> dict[str, dict[str, Any]]:
    """One small file per (budget, method) for `dvc metrics show`: one readable row each, a few columns.

    Every row has the method's held-out latent MSE (x1e6), its compute steps, speedup and FID;
    the policy's rows add its MSE over the best baseline's that costs no more. The full table
    stays in metrics.csv.
    """
    files: dict[str, dict[str, Any]] = {}
    for row in metrics_table.itertuples(index=False):
        files[f"budget_{row.budget:02d}-{row.method}"] = {
            "latent_mse_x1e6": finite_or_none(row.latent_mse * HEADLINE_SCALE),
            "compute_steps": finite_or_none(row.compute_steps_mean),
            "speedup": finite_or_none(row.speedup),
            "fid": finite_or_none(row.fid),
        }
    for budget, policy in ladder.items():
        rows = metrics_table[metrics_table["budget"] == budget]
        ours = _policy_row(rows, policy)
        best = _best_baseline(rows, ours)
        if best is not None and best["latent_mse"] > 0:
            files[f"budget_{budget:02d}-{ours['method']}"]["mse_vs_best_baseline"] = finite_or_none(
                ours["latent_mse"] / best["latent_mse"]
            )
    return files


def score_policies(ladder: dict[int, CachePolicy], metrics_table: pd.DataFrame) -> tuple[CachePolicy, ...]:
    """The ladder with held-out scores in each policy's provenance (what the promotion gate compares),
    in budget order (largest first)."""
    scored = []
    for budget, policy in sorted(ladder.items(), reverse=True):
        method = ALIGNED if is_aligned(policy) else SEARCHED
        row = metrics_table[(metrics_table["method"] == method) & (metrics_table["budget"] == budget)].iloc[0]
        scores = {
            **policy.provenance.get("scores", {}),
            "holdout_mse": float(row["latent_mse"]),
            "holdout_mse_std": float(row["latent_mse_std"]),
            "holdout_pairs": int(row["images"]),
            **{
                k: float(row[k])
                for k in ("psnr", "ssim", "fid", "judge_agreement")
                if finite_or_none(row[k]) is not None
            },
        }
        scored.append(policy.with_provenance(scores=scores))
    return tuple(scored)


def pareto_plot(metrics_table: pd.DataFrame) -> Figure:
    """Held-out latent MSE against mean compute steps, one line per method."""
    return plot_pareto(metrics_table)


def mask_map(ladder: dict[int, CachePolicy]) -> Figure:
    """The searched masks of the ladder, one row per budget."""
    return plot_masks({f"B={b}": ladder[b].mask for b in sorted(ladder, reverse=True)})


def forecast_gains_plot(ladder: dict[int, CachePolicy]) -> Figure:
    """The forecast gains alignment learned, per cached step, for every budget whose policy carries them."""
    ordered = sorted(ladder, reverse=True)
    return plot_forecast_gains({f"B={b}": (ladder[b].mask, ladder[b].forecast_gains) for b in ordered})


def convergence_plots(histories: dict[int, pd.DataFrame]) -> dict[str, Figure]:
    """One convergence figure per budget (`budget_<B>.png`), every start's SA then HC."""
    ordered = sorted(histories.items(), reverse=True)
    return {f"budget_{budget}.png": plot_convergence(history) for budget, history in ordered}


def sample_grids(samples: dict[str, dict[str, torch.Tensor]]) -> dict[str, Figure]:
    """One grid per budget (`budget_<B>.png`): a row per method, the same held-out pairs in each column."""
    return {f"{group}.png": plot_sample_grid(images) for group, images in samples.items()}
