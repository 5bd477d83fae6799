"""Align nodes: Kedro wrappers over `search.alignment`."""

from __future__ import annotations

import logging
from typing import Any

import pandas as pd

from budcache_pipeline.pipelines.common import load_model
from budcache_pipeline.pipelines.search.nodes import calibration_subset
from budcache_pipeline.policy import CachePolicy
from budcache_pipeline.search import ReferenceSet, accept_alignment, align_schedule, aligned_policy, holdout_losses

logger = logging.getLogger(__name__)


def align_budget(
    policy: CachePolicy,
    reference_calibration: ReferenceSet,
    reference_holdout: ReferenceSet,
    calibration_prompts: pd.DataFrame,
    model_params: dict[str, Any],
    params: dict[str, Any],
) -> tuple[CachePolicy, dict[str, Any]]:
    """Learn the sigma schedule for the policy's mask when its budget is tight; returns the policy to
    evaluate (the searched one unless alignment also lowered the held-out loss) and a report.

    Above `max_budget_fraction` of the steps, cached steps sit close to a computed one
    and the schedule has little to fix, so the searched policy passes through untouched.
    """
    fraction = policy.budget / policy.steps
    report: dict[str, Any] = {
        "budget": policy.budget,
        "steps": policy.steps,
        "budget_fraction": fraction,
        "max_budget_fraction": float(params["max_budget_fraction"]),
        "attempted": False,
        "accepted": False,
    }
    if fraction > float(params["max_budget_fraction"]):
        report["reason"] = "budget above max_budget_fraction of the steps: schedule kept"
        return policy, report
    adapter = load_model(model_params)
    if not adapter.solver(reference_calibration.sigmas).differentiable:
        report["reason"] = (
            f"{type(adapter.pipe.scheduler).__name__} is a multistep solver and the pipeline runs its own "
            "sigmas: schedule kept"
        )
        return policy, report
    indices = calibration_subset(calibration_prompts, reference_calibration, params.get("calibration_size"))
    result = align_schedule(
        adapter,
        reference_calibration.subset(indices),
        policy.mask,
        variant=str(params["variant"]),
        iterations=int(params["iterations"]),
        lr=float(params["lr"]),
        seed=int(params["seed"]),
        progress=bool(params.get("progress", False)),
        forecast=policy.forecast,
    )
    holdout_before, holdout_after = holdout_losses(
        adapter, reference_holdout, policy.mask, result.sigmas, policy.forecast
    )
    accepted = accept_alignment(result, holdout_before, holdout_after, float(params.get("min_relative_gain", 0.0)))
    report.update(
        attempted=True,
        accepted=accepted,
        variant=result.variant,
        calibration_pairs=len(indices),
        calibration_loss_before=result.loss_before,
        calibration_loss_after=result.loss_after,
        holdout_loss_before=holdout_before,
        holdout_loss_after=holdout_after,
        reason=(
            "learned schedule lowers the held-out loss"
            if accepted
            else "learned schedule does not lower the held-out loss: searched schedule kept"
        ),
        sigmas=result.sigmas,
        history=result.history,
    )
    logger.info(
        "budget %d: alignment %s (held-out %.4g -> %.4g)",
        policy.budget, "kept" if accepted else "rejected", holdout_before, holdout_after,
    )
    return (aligned_policy(policy, result) if accepted else policy), report
