"""Register nodes: Kedro wrappers over `registry.log_run` and `registry.register_ladder`."""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from budcache_pipeline.policy import CachePolicy

logger = logging.getLogger(__name__)
_METRIC_NAME = re.compile(r"[^\w./\- ]")


def by_budget(budgets: tuple[int, ...]) -> Callable[..., dict[int, Any]]:
    """A node function that keys the namespaced pipelines' per-budget outputs (given in `budgets` order) by budget."""

    def collect_by_budget(*items: Any) -> dict[int, Any]:
        return dict(zip(budgets, items))

    return collect_by_budget


def collect_files(*groups: list[Path]) -> list[Path]:
    """The files of several catalog entries (e.g. each plot dataset's PNGs) as one list."""
    return [path for group in groups for path in group]


def collect_paths(*paths: Path) -> list[Path]:
    """Files given one path each (`<name>@file` views) as one list."""
    return list(paths)


def collect_folders(plots: list[Path], search: list[Path], align: list[Path]) -> dict[str, list[Path]]:
    """The files the run logs in folders, by folder name: plots, the searches' records, the alignment reports."""
    return {"plots": plots, "search": search, "align": align}


def _stage_folder(files: list[Path], staging: Path, name: str) -> Path:
    """Copies of `files` in `staging/<name>`, laid out as below their common folder, to log as one artifact folder."""
    folder = staging / name
    base = Path(os.path.commonpath([f.parent for f in files]))
    for path in files:
        target = folder / path.relative_to(base)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    return folder


def _metrics(prefix: str, value: Any) -> dict[str, float]:
    """Nested numbers as MLflow metric names (`budget_10.budcache.latent_mse`); None and NaN are left out."""
    if isinstance(value, Mapping):
        out: dict[str, float] = {}
        for key, item in value.items():
            out.update(_metrics(f"{prefix}.{key}" if prefix else str(key), item))
        return out
    if isinstance(value, (int, float)) and (not isinstance(value, float) or math.isfinite(value)):
        return {_METRIC_NAME.sub("_", prefix): float(value)}
    return {}


def _run_metrics(
    metrics_summary: dict[str, Any],
    search_summaries: dict[int, dict[str, Any]],
    alignment_reports: dict[int, dict[str, Any]],
) -> dict[str, float]:
    """The held-out metrics, and per budget what the search found and cost and what alignment did."""
    search = {
        f"budget_{b}": {
            "calibration_mse": s["calibration_mse"],
            "start_spread_std": s["start_spread"]["std"],
            "start_spread_max": s["start_spread"]["max"],
            "evaluations": s["cost"]["evaluations"],
            "block_stack_calls": s["cost"]["block_stack_calls"],
            "calibration_rollouts": s["cost"]["calibration_rollouts"],
            "wall_seconds": s["cost"]["wall_seconds"],
        }
        for b, s in search_summaries.items()
    }
    alignment = {
        f"budget_{b}": {k: r[k] for k in ("accepted", "holdout_loss_before", "holdout_loss_after") if k in r}
        for b, r in alignment_reports.items()
    }
    return {**_metrics("", metrics_summary), **_metrics("search", search), **_metrics("align", alignment)}


def _run_params(
    parameters: dict[str, Any],
    ladder: dict[int, CachePolicy],
    reference_summary: dict[str, Any],
    ingest_summary: dict[str, Any],
    provenance: dict[str, Any],
) -> dict[str, Any]:
    """Every parameter of the run, with the ladder's budgets, the data's sizes and the data's DVC hashes."""
    data = provenance["data"]
    return {
        **parameters,
        "budgets": ",".join(str(b) for b in sorted(ladder, reverse=True)),
        "reference": {**parameters.get("reference", {}), "pairs": reference_summary["pairs"]},
        "prompts": {"source": ingest_summary.get("source"), **ingest_summary["splits"]},
        "data": {"source": data["source"], **data["paths"]},
    }


def _run_name(parameters: dict[str, Any], budgets: str) -> str:
    """`register.run_name`, else "<model> B=<budgets>"."""
    model = parameters["model"]
    return parameters["register"].get("run_name") or f"{model.get('name') or model['adapter']} B={budgets}"


def register_policies(
    ladder: dict[int, CachePolicy],
    metrics_summary: dict[str, Any],
    search_summaries: dict[int, dict[str, Any]],
    alignment_reports: dict[int, dict[str, Any]],
    reference_summary: dict[str, Any],
    ingest_summary: dict[str, Any],
    provenance: dict[str, Any],
    parameters: dict[str, Any],
    files: list[Path],
    folders: dict[str, list[Path]],
) -> dict[str, Any]:
    """Log one MLflow run (every parameter, metrics, plots, tables, reports, policies) and register the ladder
    as a new version with alias `candidate`, tagged with the code version, DVC data hash and model fingerprint
    of `provenance`.

    `files` (tables and summaries) and `folders` (plots, search, align) are the catalog's files the run logs;
    taken as catalog inputs, they are written before this node runs and nothing else is uploaded."""
    # mlflow takes seconds to import; only this node needs it, so other pipelines start faster.
    from budcache_pipeline.registry import CANDIDATE_ALIAS, log_run, register_ladder

    experiment = str(parameters["register"]["experiment"])
    run_params = _run_params(parameters, ladder, reference_summary, ingest_summary, provenance)
    tags = {
        "code_version": provenance["code_version"],
        "dvc_data_hash": provenance["data"]["hash"],
        "model_fingerprint": provenance["model_fingerprint"],
    }
    with tempfile.TemporaryDirectory() as staging:
        staged = [_stage_folder(paths, Path(staging), name) for name, paths in folders.items()]
        run_id = log_run(
            run_params,
            _run_metrics(metrics_summary, search_summaries, alignment_reports),
            artifacts=[*files, *staged],
            policies=ladder,
            experiment=experiment,
            run_name=_run_name(parameters, run_params["budgets"]),
            tags=tags,
        )
    registered = register_ladder(
        ladder, code_version=tags["code_version"], data_hash=tags["dvc_data_hash"], run_id=run_id,
        experiment=experiment,
    )
    logger.info(
        "registered %s version %s (alias %s), run %s", registered.name, registered.version, CANDIDATE_ALIAS, run_id
    )
    return {
        "registered_model": registered.name,
        "version": registered.version,
        "alias": CANDIDATE_ALIAS,
        "run_id": run_id,
        "model_uri": registered.model_uri,
        "code_version": tags["code_version"],
        "dvc_data_hash": tags["dvc_data_hash"],
        "data_source": provenance["data"]["source"],
        "model_fingerprint": tags["model_fingerprint"],
        "budgets": sorted(ladder, reverse=True),
    }
