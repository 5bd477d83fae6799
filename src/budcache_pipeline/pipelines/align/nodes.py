"""Align nodes: Kedro wrappers over `search.alignment`."""

from __future__ import annotations

import logging
from typing import Any

import pandas as pd

from budcache_pipeline.pipelines.common import ModelHandle
from budcache_pipeline.pipelines.search.nodes import calibration_subset
from budcache_pipeline.policy import CachePolicy
from budcache_pipeline.search import (
    AlignmentResult,
    ReferenceSet,
    accept_alignment,
    align_schedule,
    aligned_policy,
    holdout_losses,
)

logger = logging.getLogger(__name__)


def align_budget(
    policy: CachePolicy,
    reference_calibration: ReferenceSet,
    reference_holdout: ReferenceSet,
    calibration_prompts: pd.DataFrame,
    model: ModelHandle,
    params: dict[str, Any],
) -> tuple[CachePolicy, dict[str, Any]]:
    """Learn the sigma schedule (and forecast gains) for the policy's mask when its budget is tight; returns
    the policy to evaluate (the searched one unless alignment also lowered the held-out loss) and a report.

    Above `max_budget_fraction` of the steps, cached steps sit close to a computed one
    and the schedule has little to fix, so the searched policy passes through untouched
    (and the model is never loaded).
    """
    report = _report(policy, params)
    if report["budget_fraction"] > report["max_budget_fraction"]:
        report["reason"] = "budget above max_budget_fraction of the steps: schedule kept"
        return policy, report
    adapter = model.adapter
    if not adapter.solver(reference_calibration.sigmas).differentiable:
        report["reason"] = (
            f"{type(adapter.pipe.scheduler).__name__} is a multistep solver and the pipeline runs its own "
            "sigmas: schedule kept"
        )
        return policy, report
    indices = calibration_subset(calibration_prompts, reference_calibration, params.get("calibration_size"))
    result = _learn_schedule(adapter, reference_calibration.subset(indices), policy, params)
    holdout_before, holdout_after = holdout_losses(
        adapter, reference_holdout, policy.mask, result.sigmas, policy.forecast, result.gains
    )
    accepted = accept_alignment(result, holdout_before, holdout_after, float(params.get("min_relative_gain", 0.0)))
    report.update(
        _outcome(result, accepted, holdout_before, holdout_after),
        attempted=True,
        calibration_pairs=len(indices),
    )
    logger.info(
        "budget %d: alignment %s (held-out %.4g -> %.4g)",
        policy.budget, "kept" if accepted else "rejected", holdout_before, holdout_after,
    )
    return (aligned_policy(policy, result) if accepted else policy), report


def _report(policy: CachePolicy, params: dict[str, Any]) -> dict[str, Any]:
    """The report of a policy not (yet) aligned: its budget against the fraction alignment is tried under."""
    return {
        "budget": policy.budget,
        "steps": policy.steps,
        "budget_fraction": policy.budget / policy.steps,
        "max_budget_fraction": float(params["max_budget_fraction"]),
        "attempted": False,
        "accepted": False,
    }


def _learn_schedule(
    adapter: Any, reference: ReferenceSet, policy: CachePolicy, params: dict[str, Any]
) -> AlignmentResult:
    """The schedule learned for the policy's mask on the calibration pairs, with the `align` settings."""
    return align_schedule(
        adapter,
        reference,
        policy.mask,
        variant=str(params["variant"]),
        iterations=int(params["iterations"]),
        lr=float(params["lr"]),
        seed=int(params["seed"]),
        progress=bool(params.get("progress", False)),
        forecast=policy.forecast,
        gain_channels=int(params.get("gain_channels") or 0),
    )


def _outcome(result: AlignmentResult, accepted: bool, holdout_before: float, holdout_after: float) -> dict[str, Any]:
    """What the learned schedule did on calibration and held-out pairs, and whether it is kept."""
    return {
        "accepted": accepted,
        "variant": result.variant,
        "calibration_loss_before": result.loss_before,
        "calibration_loss_after": result.loss_after,
        "holdout_loss_before": holdout_before,
        "holdout_loss_after": holdout_after,
        "reason": (
            "learned schedule lowers the held-out loss"
            if accepted
            else "learned schedule does not lower the held-out loss: searched schedule kept"
        ),
        "sigmas": result.sigmas,
        "gain_channels": result.gains.channels if result.gains is not None else 0,
        "cost": result.cost,
        "history": result.history,
    }
