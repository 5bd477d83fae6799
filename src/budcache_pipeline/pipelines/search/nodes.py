"""Search nodes: Kedro wrappers over `search.engine.search_policy`."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import pandas as pd

from budcache_pipeline.pipelines.common import load_model, model_spec
from budcache_pipeline.policy import CachePolicy, model_fingerprint, weights_digest
from budcache_pipeline.search import MaskObjective, ReferenceSet, result_to_policy, search_policy
from budcache_pipeline.search.objective import mask_key
from budcache_pipeline.search.prefix_store import PREFIX_STATE_STATS, parse_bytes

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


def search_budget(
    reference_calibration: ReferenceSet,
    calibration_prompts: pd.DataFrame,
    model_params: dict[str, Any],
    params: dict[str, Any],
    budget: int,
) -> tuple[CachePolicy, pd.DataFrame, dict[str, Any]]:
    """Multi-start SA + HC for one budget; returns the policy, its convergence record and a summary.

    The search checkpoints into `params.checkpoint_dir` and resumes from there when a run
    is interrupted; the checkpoint is removed once the policy exists.
    """
    if budget > reference_calibration.steps:
        raise ValueError(
            f"budget {budget} exceeds the reference's {reference_calibration.steps} steps: "
            "lower BUDCACHE_BUDGETS / settings.BUDGETS or raise model.steps"
        )
    adapter = load_model(model_params)
    indices = calibration_subset(calibration_prompts, reference_calibration, params.get("calibration_size"))
    reference = reference_calibration.subset(indices)
    settings = {
        "budget": budget,
        "starts": list(params["starts"]),
        "forced": list(params["forced"]),
        "seed": int(params["seed"]),
        "sa_iterations": int(params["sa_iterations"]),
        "hc_rounds": int(params["hc_rounds"]),
        "screen_samples": params.get("screen_samples"),
        "dp_samples": int(params["dp_samples"]),
        "calibration_pairs": len(reference),
        "forecast": str(params.get("forecast", "reuse")),
    }
    identity = {k: reference.manifest[k] for k in ("prompts_seeds_sha256", "model_fingerprint", "sigmas")}
    checkpoint = _checkpoint(params.get("checkpoint_dir"), budget, {**settings, **identity})
    objective = MaskObjective(
        adapter,
        reference,
        max_cached_states=int(params["max_cached_states"]),
        forecast=settings["forecast"],
        max_state_bytes=parse_bytes(params.get("max_state_bytes")),
        max_host_state_bytes=parse_bytes(params.get("max_host_state_bytes")) or 0,
    )
    result = search_policy(
        objective,
        budget,
        starts=tuple(params["starts"]),
        forced=tuple(params["forced"]),
        seed=int(params["seed"]),
        sa_iterations=int(params["sa_iterations"]),
        hc_rounds=int(params["hc_rounds"]),
        checkpoint=checkpoint,
        progress=bool(params.get("progress", False)),
        screen_samples=params.get("screen_samples"),
        dp_samples=int(params["dp_samples"]),
    )
    policy = result_to_policy(
        result,
        model_name=model_spec(model_params).registered_name,
        model_fingerprint=model_fingerprint(adapter.transformer),
        model_weights=weights_digest(adapter.transformer),
        sigmas=reference.sigmas,
        settings=settings,
        scores={"calibration_mse": result.loss},
    )
    if checkpoint is not None:
        checkpoint.unlink(missing_ok=True)
    summary = {
        "budget": budget,
        "steps": result.steps,
        "mask": mask_key(result.mask),
        "calibration_mse": result.loss,
        "start_spread": result.spread,
        "starts": [
            {k: s[k] for k in ("start", "initial_loss", "sa_loss", "final_loss")} for s in result.starts
        ],
        "cost": result.cost,
        "prefix_states": {k: objective.stats.get(k, 0) for k in PREFIX_STATE_STATS},
        "settings": settings,
    }
    logger.info(
        "budget %d: calibration MSE %.4g (starts %.4g..%.4g), %d evaluations in %.1fs",
        budget, result.loss, result.spread["min"], result.spread["max"],
        result.cost["evaluations"], result.cost["wall_seconds"],
    )
    return policy, result.history, summary
