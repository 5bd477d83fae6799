"""Search nodes: Kedro wrappers over `search.engine.search_policy`."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

from budcache_pipeline.pipelines.common import ModelHandle, process_count
from budcache_pipeline.policy import CachePolicy
from budcache_pipeline.search import (
    MaskObjective,
    ProgressBar,
    ReferenceSet,
    SearchConfig,
    result_to_policy,
    search_policy,
)
from budcache_pipeline.search.distributed import launch_torchrun
from budcache_pipeline.search.engine import SearchResult
from budcache_pipeline.search.objective import mask_key
from budcache_pipeline.search.prefix_store import parse_bytes
from budcache_pipeline.search.reference import save_reference
from budcache_pipeline.search.search_worker import MODULE as SEARCH_WORKER
from budcache_pipeline.search.search_worker import search_record

logger = logging.getLogger(__name__)


def calibration_subset(prompts: pd.DataFrame, reference: ReferenceSet, size: int | None) -> list[int]:
    """Indices of `size` reference pairs taken round-robin over categories, in file order within each.

    The search's cost grows with the number of calibration pairs; a category-balanced
    subset keeps every kind of prompt in the objective when it is cut down.
    """
    index = {(p, int(s)): i for i, (p, s) in enumerate(zip(reference.prompts, reference.seeds))}
    missing = [p for p, s in zip(prompts["prompt"], prompts["seed"]) if (p, int(s)) not in index]
    if missing:
        raise ValueError(
            f"{len(missing)} calibration prompt(s) have no teacher (e.g. {missing[0]!r}): "
            "run `kedro run --pipelines reference` again"
        )
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise ValueError(f"calibration_size must be a positive integer or null (all prompts), got {size!r}")
    if size is not None and size > len(prompts):
        logger.warning(
            "calibration_size %d is more than the %d calibration prompts: searching on all of them "
            "(add prompts to the prompt file or lower calibration_size)", size, len(prompts),
        )
    if size is None or size >= len(prompts):
        return sorted(index[(p, int(s))] for p, s in zip(prompts["prompt"], prompts["seed"]))
    groups = [list(group.itertuples(index=False)) for _, group in prompts.groupby("category", sort=True)]
    chosen: list[int] = []
    for depth in range(max(len(g) for g in groups)):
        for group in groups:
            if depth < len(group) and len(chosen) < size:
                chosen.append(index[(group[depth].prompt, int(group[depth].seed))])
    return sorted(chosen)


def _checkpoint(directory: str | None, budget: int, signature: dict[str, Any]) -> Path | None:
    """A checkpoint file per budget and search signature, so a stale one is never resumed."""
    if not directory:
        return None
    digest = hashlib.sha256(json.dumps(signature, sort_keys=True).encode()).hexdigest()[:16]
    return Path(directory) / f"budget_{budget}-{digest}.json"


def _objective_options(params: dict[str, Any], forecast: str) -> dict[str, Any]:
    """`MaskObjective`'s bounds: what a search may keep in memory, which never changes its result."""
    options = {
        "max_cached_states": int(params["max_cached_states"]),
        "forecast": forecast,
        "max_state_bytes": parse_bytes(params.get("max_state_bytes")),
        "max_host_state_bytes": parse_bytes(params.get("max_host_state_bytes")) or 0,
    }
    if params.get("max_rows_per_forward") is not None:
        options["max_rows_per_forward"] = int(params["max_rows_per_forward"])
    return options


def _search(
    reference: ReferenceSet, model: ModelHandle, objective_options: dict[str, Any],
    budget: int, config: SearchConfig, checkpoint: Path | None, processes: int, progress: bool,
) -> dict[str, Any]:
    """The search's result, the prefix store's counters and the model's identity.

    In this process when `processes` is 1, else on that many torchrun ranks; the node reads
    the same keys from either, so it picks neither runner itself. Only the one-process search
    loads the model here; torchrun ranks get its settings and each loads it itself.
    """
    if processes > 1:
        return _search_under_torchrun(reference, model.params, objective_options, budget, config,
                                      checkpoint, processes, progress)
    objective = MaskObjective(model.adapter, reference, **objective_options)
    bar = ProgressBar() if progress else None
    result = search_policy(objective, budget, config, checkpoint=checkpoint, progress=bar)
    return {"result": result, **search_record(objective)}


def _search_under_torchrun(
    reference: ReferenceSet, model_params: dict[str, Any], objective_options: dict[str, Any],
    budget: int, config: SearchConfig, checkpoint: Path | None, processes: int, progress: bool,
) -> dict[str, Any]:
    """The search on `processes` torchrun ranks sharing the calibration rows (the one-process mask).

    The node writes the calibration subset and a job file to a scratch folder and reads back
    rank 0's result; it never loads the model itself, so a GPU box holds the model once per rank.
    On a CPU each rank gets its share of the configured torch threads.
    """
    threads = int(model_params.get("torch_threads") or os.cpu_count() or 1)
    with tempfile.TemporaryDirectory(prefix=f"budcache-search-{budget}-") as scratch:
        folder = Path(scratch)
        save_reference(reference, folder / "reference")
        job = {
            "model": {**model_params, "torch_threads": max(1, threads // processes)},
            "reference": str(folder / "reference"),
            "budget": budget,
            "torch_threads": max(1, threads // processes),
            "search": config.to_dict(),
            "progress": progress,
            "objective": objective_options,
            "checkpoint": str(checkpoint) if checkpoint else None,
            "result": str(folder / "result.json"),
        }
        (folder / "job.json").write_text(json.dumps(job))
        launch_torchrun(SEARCH_WORKER, folder / "job.json", processes)
        written = json.loads((folder / "result.json").read_text())
    return {**written, "result": SearchResult.from_dict(written)}


def search_budget(
    reference_calibration: ReferenceSet,
    calibration_prompts: pd.DataFrame,
    model: ModelHandle,
    params: dict[str, Any],
    budget: int,
) -> tuple[CachePolicy, pd.DataFrame, dict[str, Any]]:
    """Multi-start SA + HC for one budget; returns the policy, its convergence record and a summary.

    The search checkpoints into `params.checkpoint_dir` and resumes from there when a run
    is interrupted; the checkpoint is removed once the policy exists. With `params.processes`
    above 1 it runs on that many torchrun ranks, each holding its share of the rows.
    """
    if budget > reference_calibration.steps:
        raise ValueError(
            f"budget {budget} exceeds the reference's {reference_calibration.steps} steps: "
            "lower BUDCACHE_BUDGETS / settings.BUDGETS or raise model.steps"
        )
    processes = process_count(params.get("processes", 1), "search.processes")
    indices = calibration_subset(calibration_prompts, reference_calibration, params.get("calibration_size"))
    reference = reference_calibration.subset(indices)
    config = SearchConfig.from_params(params, budget, reference.steps)
    settings = config.settings(budget, len(reference), str(params.get("forecast", "reuse")))
    identity = {k: reference.manifest[k] for k in ("prompts_seeds_sha256", "model_fingerprint", "sigmas")}
    checkpoint = _checkpoint(params.get("checkpoint_dir"), budget, {**settings, **identity})
    found = _search(reference, model, _objective_options(params, settings["forecast"]), budget,
                    config, checkpoint, processes, bool(params.get("progress", False)))
    result: SearchResult = found["result"]
    policy = result_to_policy(
        result,
        model_name=model.spec.registered_name,
        model_fingerprint=found["model_fingerprint"],
        model_weights=found["model_weights"],
        sigmas=reference.sigmas,
        settings=settings,
        scores={"calibration_mse": result.loss},
    )
    if checkpoint is not None:
        checkpoint.unlink(missing_ok=True)
    logger.info(
        "budget %d: calibration MSE %.4g (starts %.4g..%.4g), %d evaluations (%.2f calibration rollouts) in %.1fs "
        "on %d process(es)",
        budget, result.loss, result.spread["min"], result.spread["max"],
        result.cost["evaluations"], result.cost["calibration_rollouts"], result.cost["wall_seconds"], processes,
    )
    return policy, result.history, _summary(result, settings, found["prefix_states"], processes)


def _summary(
    result: SearchResult, settings: dict[str, Any], prefix_states: dict[str, Any], processes: int
) -> dict[str, Any]:
    """What the search found and what it cost, for the report and the MLflow run."""
    return {
        "budget": result.budget,
        "steps": result.steps,
        "mask": mask_key(result.mask),
        "calibration_mse": result.loss,
        "start_spread": result.spread,
        "starts": [
            {k: s[k] for k in ("start", "initial_loss", "sa_loss", "final_loss")} for s in result.starts
        ],
        "cost": result.cost,
        "processes": processes,
        "prefix_states": prefix_states,
        "settings": settings,
    }
