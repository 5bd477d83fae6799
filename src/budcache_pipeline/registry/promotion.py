"""Promotion: the quality gate as a pure decision on two ladders, and moving alias `production` when it passes."""

from __future__ import annotations

import getpass
import json
import os
import socket
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from budcache_pipeline.policy import CachePolicy
from budcache_pipeline.policy_ladder_model import holdout_loss
from budcache_pipeline.registry.lock import promotion_lock
from budcache_pipeline.registry.store import (
    PRODUCTION_ALIAS,
    RegistryError,
    find_registered_model,
    find_version,
    not_found,
    open_client,
    retry_locked,
)
from budcache_pipeline.registry.verification import download_ladder

HISTORY_TAG_PREFIX = "production_history."
"""Registered-model tags, one per move of `production`: `production_history.<UTC time>.v<version>`."""


@dataclass(frozen=True)
class PromotionResult:
    """Outcome of `promote`: whether `production` moved, and the per-budget comparison behind it."""

    name: str
    version: str
    previous_version: str | None
    promoted: bool
    forced: bool
    reason: str | None
    message: str
    comparison: pd.DataFrame


def loss_table(candidate: Mapping[int, CachePolicy], production: Mapping[int, CachePolicy] | None) -> pd.DataFrame:
    production = production or {}
    rows = []
    for budget in sorted(set(candidate) | set(production)):
        new = holdout_loss(candidate[budget].to_dict()) if budget in candidate else None
        old = holdout_loss(production[budget].to_dict()) if budget in production else None
        if new is not None and old is not None:
            verdict = "better" if new < old else ("equal" if new == old else "worse")
        else:
            verdict = "new budget" if old is None else "dropped"
        rows.append(
            {
                "budget": budget,
                "candidate_holdout_mse": new,
                "production_holdout_mse": old,
                "delta": new - old if new is not None and old is not None else None,
                "verdict": verdict,
            }
        )
    return pd.DataFrame(rows, columns=["budget", "candidate_holdout_mse", "production_holdout_mse", "delta", "verdict"])


def gate(
    candidate: Mapping[int, CachePolicy], production: Mapping[int, CachePolicy], table: pd.DataFrame
) -> str | None:
    """Why the candidate may not replace production, or None when it beats it everywhere it can."""
    new, old = next(iter(candidate.values())), next(iter(production.values()))
    if new.model_fingerprint != old.model_fingerprint:
        return (
            f"model fingerprints differ (candidate {new.model_fingerprint}, production {old.model_fingerprint}): "
            "held-out losses of different models are not comparable"
        )
    shared = table[table["verdict"].isin(["better", "equal", "worse"])]
    if shared.empty:
        return "candidate and production share no budget, so the candidate cannot be shown to be better"
    failing = shared[shared["verdict"] != "better"]
    if not failing.empty:
        return f"held-out loss is not lower at budget(s) {failing['budget'].tolist()}"
    return None


def promote(
    model_name: str,
    version: str | int,
    force: bool = False,
    reason: str | None = None,
    tracking_uri: str | None = None,
    allow_unverified: bool = False,
) -> PromotionResult:
    """Move alias `production` to `version` if its held-out loss beats production's at every
    shared budget (a first promotion always passes); `force` needs a `reason`, kept as a tag.

    Both ladders are verified as `pull` does; `allow_unverified` accepts versions registered
    without digests (logged). The comparison table is returned either way so the operator sees why.
    Promotions of one model run one at a time (`registry.lock`), so each compares itself with
    the production it replaces.
    """
    reason = reason.strip() if force and reason else None
    if force and not reason:
        raise RegistryError("a forced promotion needs a reason: pass --reason TEXT")
    client = open_client(tracking_uri)
    target = find_version(client, model_name, version=str(version))
    with promotion_lock(client, model_name, holder=actor()):
        current = current_production(client, model_name)
        result = _decide(client, model_name, target, current, force, reason, allow_unverified)
        if result.promoted and result.previous_version != result.version:
            _move_production(client, result)
    return result


def _version_of(model_version: ModelVersion | None) -> str | None:
    return str(model_version.version) if model_version else None


def _decide(
    client: MlflowClient,
    model_name: str,
    target: ModelVersion,
    current: ModelVersion | None,
    force: bool,
    reason: str | None,
    allow_unverified: bool,
) -> PromotionResult:
    """Verify both ladders and apply the gate; changes nothing in the registry."""
    with tempfile.TemporaryDirectory() as staging:
        _, candidate = download_ladder(client, target, Path(staging) / "candidate", allow_unverified=allow_unverified)
        production = None
        if current:
            _, production = download_ladder(
                client, current, Path(staging) / "production", allow_unverified=allow_unverified
            )
    table = loss_table(candidate, production)
    previous = _version_of(current)
    if previous == str(target.version):
        refusal = None
        message = f"version {target.version} of '{model_name}' is already production: nothing changed"
    elif production is None:
        refusal = None
        message = f"first promotion of '{model_name}': version {target.version} is now production"
    else:
        refusal = gate(candidate, production, table)
        message = (
            f"version {target.version} beats production version {previous} at every shared budget: promoted"
            if refusal is None
            else f"refused to promote version {target.version} over production version {previous}: {refusal}"
        )
    if refusal is not None and force:
        message = f"forced promotion of version {target.version} over version {previous} ({refusal}); reason: {reason}"
    return PromotionResult(
        name=model_name,
        version=str(target.version),
        previous_version=previous,
        promoted=refusal is None or force,
        forced=force,
        reason=reason,
        message=message,
        comparison=table,
    )


def _move_production(client: MlflowClient, result: PromotionResult) -> None:
    """Point `production` at the promoted version and record the move: version tags and one history tag.

    History tags are keyed by time and version, so promotions racing each other each add their
    own entry instead of overwriting one value.
    """
    name, version = result.name, result.version
    moved_at = datetime.now(timezone.utc)
    entry = {
        "version": version,
        "previous": result.previous_version,
        "at": moved_at.isoformat(timespec="microseconds"),
        "by": actor(),
        "forced": result.forced,
        "reason": result.reason,
    }
    writes = {
        "alias": lambda: client.set_registered_model_alias(name, PRODUCTION_ALIAS, version),
        "history": lambda: client.set_registered_model_tag(
            name, f"{HISTORY_TAG_PREFIX}{moved_at.strftime('%Y%m%dT%H%M%S.%fZ')}.v{version}", json.dumps(entry)
        ),
        "promoted_at": lambda: client.set_model_version_tag(name, version, "promoted_at", entry["at"]),
        "promoted_over": lambda: client.set_model_version_tag(
            name, version, "promoted_over", result.previous_version or "none"
        ),
    }
    if result.forced:
        writes["promotion_forced"] = lambda: client.set_model_version_tag(name, version, "promotion_forced", "true")
        writes["promotion_reason"] = lambda: client.set_model_version_tag(
            name, version, "promotion_reason", result.reason
        )
    for what, write in writes.items():
        retry_locked(write, f"promoting version {version} of '{name}' ({what})")


def actor() -> str:
    """Who moves an alias: `$BUDCACHE_ACTOR` (a CI job, a person) or user@host and the process id."""
    return os.environ.get("BUDCACHE_ACTOR") or f"{getpass.getuser()}@{socket.gethostname()} pid {os.getpid()}"


def alias_history(model_name: str, tracking_uri: str | None = None) -> pd.DataFrame:
    """Every move of `production` that budcache recorded, oldest first: version, previous, when, by whom."""
    client = open_client(tracking_uri)
    model = find_registered_model(client, model_name)
    entries = [json.loads(value) for key, value in model.tags.items() if key.startswith(HISTORY_TAG_PREFIX)]
    columns = ["at", "version", "previous", "by", "forced", "reason"]
    return pd.DataFrame(sorted(entries, key=lambda e: e["at"]), columns=columns)


def current_production(client: MlflowClient, name: str) -> ModelVersion | None:
    try:
        return client.get_model_version_by_alias(name, PRODUCTION_ALIAS)
    except MlflowException as exc:
        if not not_found(exc):
            raise
        return None


def format_promotion(result: PromotionResult) -> str:
    """Human-readable promotion report for the `budcache promote` command."""
    table = result.comparison.to_string(index=False, na_rep="-", float_format=lambda v: f"{v:.6g}")
    status = "PROMOTED" if result.promoted else "REFUSED"
    return f"{status}: {result.message}\n\n{table}\n"
