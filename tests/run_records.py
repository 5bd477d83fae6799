"""What a `kedro run` registered, in a form two runs can be compared by: its policies and its MLflow run.

Only what measures time is left out: the policies' `provenance.created_at`, and the run's
wall-clock metrics (seconds, images per second, speedups measured by a timer).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mlflow import MlflowClient

from tests.reduced_project import environment

TIMED = ("seconds", "per_second", "speedup", "wall")
"""Metric names holding any of these measure a clock, not the policies."""


def data_folder(project: Path, env: str) -> Path:
    return project / "data" / env if env.startswith("tiny_") else project / "data"


def ladder_files(project: Path, env: str) -> dict[str, Any]:
    """Each policy file of the ladder as parsed JSON, its creation time removed."""
    ladder = {}
    for path in sorted((data_folder(project, env) / "06_models" / "policies").glob("budget_*.json")):
        policy = json.loads(path.read_text())
        policy["provenance"].pop("created_at")
        ladder[path.name] = policy
    assert ladder, f"no policies under {project}"
    return ladder


def run_record(project: Path, env: str) -> dict[str, Any]:
    """The registered run's parameters, untimed metrics, artifact paths, and the registered version's
    budgets and model tags."""
    registration = json.loads((data_folder(project, env) / "08_reporting" / "registration.json").read_text())
    uri = environment(project)["MLFLOW_TRACKING_URI"]
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    run = client.get_run(registration["run_id"])
    version = client.get_model_version(registration["registered_model"], registration["version"])

    def artifacts(path: str | None = None) -> list[str]:
        found = []
        for item in client.list_artifacts(run.info.run_id, path):
            found.extend(artifacts(item.path) if item.is_dir else [item.path])
        return sorted(found)

    return {
        "params": run.data.params,
        "metrics": {k: v for k, v in run.data.metrics.items() if not any(t in k for t in TIMED)},
        "artifacts": artifacts(),
        "version_tags": {k: v for k, v in version.tags.items() if k in ("budgets", "model_fingerprint")},
    }
