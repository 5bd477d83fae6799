"""Writing to the registry: runs with their parameters, metrics and files, and ladders registered as versions.

Each version is an MLflow pyfunc model logged from code (`policy_ladder_model.py`) whose
artifacts are the canonical policy JSON files and their checksums, tagged with the sha256
of every file of the model (the digests every download is checked against).
"""

from __future__ import annotations

import math
import subprocess
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from budcache_pipeline import __version__
from budcache_pipeline.policy import CachePolicy
from budcache_pipeline.policy_ladder_model import LADDER_ARTIFACT, holdout_loss
from budcache_pipeline.registry.ladder import check_ladder, write_ladder
from budcache_pipeline.registry.store import (
    CANDIDATE_ALIAS,
    DEFAULT_EXPERIMENT,
    RegistryError,
    already_exists,
    experiment_id,
    find_project_root,
    fluent_store,
    not_found,
    open_client,
    registered_model_name,
    retry_locked,
)
from budcache_pipeline.registry.verification import (
    DIGEST_TAG_PREFIX,
    LADDER_PATH,
    file_digests,
)

MODEL_ARTIFACT = "policy_ladder"
POLICIES_ARTIFACT = "policies"
_PARAMS_PER_BATCH = 100
_MODEL_CODE = Path(__file__).parent.parent / "policy_ladder_model.py"


@dataclass(frozen=True)
class RegisteredLadder:
    """Where a registered ladder lives: registered model name, version and the run that logged it."""

    name: str
    version: str
    run_id: str
    model_uri: str


def code_version(project_root: str | Path | None = None) -> str:
    """Package version plus the git commit (and `-dirty`) when the project is a git checkout."""
    root = find_project_root(project_root)
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return __version__
    return f"{__version__}+g{commit}{'-dirty' if dirty else ''}"


def _flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = str(value)
    return flat


def log_run(
    params: Mapping[str, Any],
    metrics: Mapping[str, float],
    *,
    artifacts: Iterable[str | Path] = (),
    policies: Mapping[int, CachePolicy] | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
    run_name: str | None = None,
    tags: Mapping[str, str] | None = None,
    tracking_uri: str | None = None,
) -> str:
    """Log one run: flattened parameters, metrics, files or directories (plots, tables) and the
    policy JSONs with their checksums under `policies/`. Returns the run id."""
    client = open_client(tracking_uri)
    run = client.create_run(experiment_id(client, experiment), run_name=run_name, tags=dict(tags or {}))
    run_id = run.info.run_id
    try:
        flat = [Param(key, value) for key, value in _flatten(params).items()]
        for start in range(0, len(flat), _PARAMS_PER_BATCH):
            client.log_batch(run_id, params=flat[start : start + _PARAMS_PER_BATCH])
        for key, value in metrics.items():
            if not math.isfinite(float(value)):
                raise RegistryError(f"metric {key} is {value}: log finite metrics only")
        stamp = int(datetime.now(timezone.utc).timestamp() * 1000)
        client.log_batch(run_id, metrics=[Metric(key, float(value), stamp, 0) for key, value in metrics.items()])
        for artifact in artifacts:
            path = Path(artifact)
            if path.is_dir():
                client.log_artifacts(run_id, str(path), path.name)
            elif path.is_file():
                client.log_artifact(run_id, str(path))
            else:
                raise RegistryError(f"artifact {path} does not exist: produce it before logging the run")
        if policies:
            with tempfile.TemporaryDirectory() as staging:
                write_ladder(policies, staging)
                client.log_artifacts(run_id, staging, POLICIES_ARTIFACT)
    except Exception:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return run_id


def register_ladder(
    policies: Mapping[int, CachePolicy],
    *,
    code_version: str,
    data_hash: str,
    run_id: str | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
    tracking_uri: str | None = None,
) -> RegisteredLadder:
    """Register a ladder as a new version of `budcache-<model>-<steps>steps`, alias `candidate`.

    The version is a pyfunc model logged from code into `run_id` (or a new run) with the
    policy JSONs and checksums as artifacts, tagged with the code version, the DVC data
    hash, the model fingerprint, the steps, each budget's held-out loss and the sha256 of
    every file of the model (`sha256.<path>`, also set on the run): the digests pull,
    promote and verify trust, because they live in the database rather than beside the files.
    """
    check_ladder(policies)
    client = open_client(tracking_uri)
    first = next(iter(policies.values()))
    name = registered_model_name(first.model_name, first.steps)
    if run_id is None:
        run_id = client.create_run(experiment_id(client, experiment), run_name=f"register {name}").info.run_id
    with tempfile.TemporaryDirectory() as staging:
        ladder_dir = Path(staging) / LADDER_ARTIFACT
        write_ladder(policies, ladder_dir)
        with fluent_store(tracking_uri), mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None):
            info = mlflow.pyfunc.log_model(
                name=MODEL_ARTIFACT,
                python_model=str(_MODEL_CODE),
                artifacts={LADDER_ARTIFACT: str(ladder_dir)},
                pip_requirements=[f"mlflow=={mlflow.__version__}", f"pandas=={pd.__version__}"],
            )
        digests = _model_digests(client, info.model_id, ladder_dir, Path(staging) / "stored")
    digest_tags = {f"{DIGEST_TAG_PREFIX}{path}": digest for path, digest in sorted(digests.items())}
    client.log_batch(run_id, tags=[RunTag(key, value) for key, value in digest_tags.items()])
    _create_registered_model(client, name, first)
    tags = {
        "code_version": code_version,
        "dvc_data_hash": data_hash,
        "model_fingerprint": first.model_fingerprint,
        "model_name": first.model_name,
        "steps": str(first.steps),
        "budgets": ",".join(str(b) for b in sorted(policies)),
        **{f"holdout_mse.budget_{b}": repr(holdout_loss(p.to_dict())) for b, p in sorted(policies.items())},
        **digest_tags,
    }
    with fluent_store(tracking_uri):
        version = mlflow.register_model(info.model_uri, name, tags=tags)
    retry_locked(
        lambda: client.set_registered_model_alias(name, CANDIDATE_ALIAS, version.version),
        f"setting {name}@{CANDIDATE_ALIAS} to version {version.version}",
    )
    return RegisteredLadder(name=name, version=str(version.version), run_id=run_id, model_uri=info.model_uri)


def _create_registered_model(client: MlflowClient, name: str, first: CachePolicy) -> None:
    """The registered model of a ladder, created unless it exists (another job may create it at the same moment)."""
    try:
        client.get_registered_model(name)
        return
    except MlflowException as exc:
        if not not_found(exc):
            raise
    try:
        client.create_registered_model(
            name,
            tags={"model_name": first.model_name, "steps": str(first.steps)},
            description=f"budcache cache-policy ladders for {first.model_name} at {first.steps} steps",
        )
    except MlflowException as exc:
        if not already_exists(exc):
            raise


def _model_digests(client: MlflowClient, model_id: str, ladder_dir: Path, directory: Path) -> dict[str, str]:
    """Digests to record for a logged model, keyed by path inside it.

    The ladder's come from the bytes this process wrote, so a file changed on its way
    into the store fails verification later; the files MLflow wrote itself (MLmodel,
    environment, model code) are known only as the store holds them.
    """
    location = client.get_logged_model(model_id).artifact_location
    stored = Path(mlflow.artifacts.download_artifacts(
        artifact_uri=location, dst_path=str(directory), tracking_uri=client.tracking_uri
    ))
    digests = {path: d for path, d in file_digests(stored).items() if not path.startswith(f"{LADDER_PATH}/")}
    digests.update({f"{LADDER_PATH}/{path}": d for path, d in file_digests(ladder_dir).items()})
    return digests
