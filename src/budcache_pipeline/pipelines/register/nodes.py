"""Register nodes: Kedro wrappers over `registry.log_run` and `registry.register_ladder`."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

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


def collect_tables(*paths: Path) -> list[Path]:
    """The table files (one path each, from `<name>@file` views) as one list."""
    return list(paths)


def _stage_folder(files: list[Path], staging: Path, name: str) -> Path:
    """Copies of `files` in `staging/<name>`, laid out as below their common folder, to log as one artifact folder."""
    folder = staging / name
    base = Path(os.path.commonpath([f.parent for f in files]))
    for path in files:
        target = folder / path.relative_to(base)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    return folder


def dvc_md5(path: Path) -> str:
    """DVC's content hash of a file (md5) or a directory (md5 of its sorted file listing + `.dir`),
    so the value matches the `md5` that `dvc.lock` records for the same data."""
    if path.is_file():
        return hashlib.md5(path.read_bytes()).hexdigest()
    if not path.is_dir():
        raise FileNotFoundError(f"{path} does not exist: run the pipeline that produces it before registering")
    entries = [
        {"md5": hashlib.md5(f.read_bytes()).hexdigest(), "relpath": f.relative_to(path).as_posix()}
        for f in path.rglob("*")
        if f.is_file()
    ]
    listing = json.dumps(sorted(entries, key=lambda e: e["relpath"]), sort_keys=True)
    return hashlib.md5(listing.encode("utf-8")).hexdigest() + ".dir"


def _lock_hashes(lock: Path) -> dict[str, str]:
    """Every path's md5 recorded in `dvc.lock` (deps and outs of all stages)."""
    if not lock.is_file():
        return {}
    recorded: dict[str, str] = {}
    for stage in (yaml.safe_load(lock.read_text()) or {}).get("stages", {}).values():
        for entry in [*stage.get("deps", []), *stage.get("outs", [])]:
            if "md5" in entry:
                recorded[entry["path"]] = entry["md5"]
    return recorded


def data_hash(paths: Iterable[str], project_root: Path) -> dict[str, Any]:
    """The DVC data hash of the prompts and references a ladder was searched and judged on.

    Each path's hash is DVC's md5; `source` says whether `dvc.lock` records the same
    values (the run is a `dvc repro` of committed data) or they were only computed here.
    """
    hashes = {p: dvc_md5(project_root / p) for p in paths}
    recorded = _lock_hashes(project_root / "dvc.lock")
    source = "dvc.lock" if hashes and all(recorded.get(p) == h for p, h in hashes.items()) else "computed"
    combined = hashlib.sha256("".join(f"{p} {h}\n" for p, h in sorted(hashes.items())).encode()).hexdigest()
    return {"hash": combined, "paths": hashes, "source": source}


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


def register_policies(
    ladder: dict[int, CachePolicy],
    metrics_summary: dict[str, Any],
    search_summaries: dict[int, dict[str, Any]],
    alignment_reports: dict[int, dict[str, Any]],
    reference_summary: dict[str, Any],
    ingest_summary: dict[str, Any],
    parameters: dict[str, Any],
    plots: list[Path],
    tables: list[Path],
) -> dict[str, Any]:
    """Log one MLflow run (every parameter, metrics, plots, tables, policies) and register the ladder as
    a new version with alias `candidate`, tagged with code version, DVC data hash and model fingerprint.

    `plots` (logged under `plots/`) and `tables` (metrics.csv, calibrations) come from the catalog, so
    the DAG runs this node after the nodes that write them and it uploads exactly those files."""
    # mlflow takes seconds to import; only this node needs it, so other pipelines start faster.
    from budcache_pipeline.registry import CANDIDATE_ALIAS, code_version, find_project_root, log_run, register_ladder

    params = parameters["register"]
    root = find_project_root()
    version = code_version(root)
    data = data_hash(params["data_paths"], root)
    fingerprint = next(iter(ladder.values())).model_fingerprint
    search = {
        b: {
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
        b: {k: r[k] for k in ("accepted", "holdout_loss_before", "holdout_loss_after") if k in r}
        for b, r in alignment_reports.items()
    }
    metrics = {
        **_metrics("", metrics_summary),
        **_metrics("search", {f"budget_{b}": s for b, s in search.items()}),
        **_metrics("align", {f"budget_{b}": a for b, a in alignment.items()}),
    }
    run_params = {
        **parameters,
        "budgets": ",".join(str(b) for b in sorted(ladder, reverse=True)),
        "reference": {**parameters.get("reference", {}), "pairs": reference_summary["pairs"]},
        "prompts": {"source": ingest_summary.get("source"), **ingest_summary["splits"]},
        "data": {"source": data["source"], **data["paths"]},
    }
    tags = {"code_version": version, "dvc_data_hash": data["hash"], "model_fingerprint": fingerprint}
    with tempfile.TemporaryDirectory() as staging:
        run_id = log_run(
            run_params,
            metrics,
            artifacts=[_stage_folder(plots, Path(staging), "plots"), *tables, *(root / p for p in params["artifacts"])],
            policies=ladder,
            experiment=str(params["experiment"]),
            run_name=params.get("run_name") or f"{parameters['model'].get('name') or parameters['model']['adapter']} B={run_params['budgets']}",
            tags=tags,
        )
    registered = register_ladder(
        ladder, code_version=version, data_hash=data["hash"], run_id=run_id, experiment=str(params["experiment"])
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
        "code_version": version,
        "dvc_data_hash": data["hash"],
        "data_source": data["source"],
        "model_fingerprint": fingerprint,
        "budgets": sorted(ladder, reverse=True),
    }
