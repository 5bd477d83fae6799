"""Where the registry lives and how to reach it: URIs, the MLflow client, lookups, retries on a locked database.

Tracking and registry default to an sqlite database at the project root, because
MLflow 3 refuses the plain file store; `MLFLOW_TRACKING_URI` points both at a server.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

DEFAULT_EXPERIMENT = "budcache"
CANDIDATE_ALIAS = "candidate"
PRODUCTION_ALIAS = "production"


class RegistryError(ValueError):
    """A registry operation that was refused; the message says why and what to do."""


def find_project_root(start: str | Path | None = None) -> Path:
    """The nearest directory holding a Kedro `pyproject.toml`, else the start directory."""
    start = Path(start or Path.cwd()).resolve()
    for directory in (start, *start.parents):
        pyproject = directory / "pyproject.toml"
        if pyproject.is_file() and "[tool.kedro]" in pyproject.read_text():
            return directory
    return start


def resolve_tracking_uri(tracking_uri: str | None = None, project_root: str | Path | None = None) -> str:
    """Explicit URI, else `MLFLOW_TRACKING_URI`, else `sqlite:///<project root>/mlflow.db`."""
    if tracking_uri:
        return tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{find_project_root(project_root) / 'mlflow.db'}"


def store_uris(tracking_uri: str | None) -> tuple[str, str]:
    """Tracking and registry URIs: an explicit URI is both; else `MLFLOW_REGISTRY_URI` may split them.

    MLflow's `set_registry_uri` exports `MLFLOW_REGISTRY_URI` itself, so the variable must
    not outrank an explicit URI or a process would stay on the first registry it used.
    """
    uri = resolve_tracking_uri(tracking_uri)
    return uri, tracking_uri or os.environ.get("MLFLOW_REGISTRY_URI") or uri


def open_client(tracking_uri: str | None) -> MlflowClient:
    """Point MLflow's fluent API and a client at the same tracking and registry store."""
    uri, registry_uri = store_uris(tracking_uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(registry_uri)
    return MlflowClient(tracking_uri=uri, registry_uri=registry_uri)


def sqlite_database(uri: str) -> Path | None:
    """The database file behind an `sqlite:///` URI, None for any other store."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///").partition("?")[0]).resolve()


def experiment_id(client: MlflowClient, name: str) -> str:
    """Existing experiment, or a new one whose artifacts sit next to an sqlite database.

    MLflow would otherwise store artifacts under `./mlruns` of whatever directory the
    command ran in, scattering a project's registry across working directories.
    """
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    database = sqlite_database(mlflow.get_tracking_uri())
    location = (database.parent / "mlartifacts" / name).as_uri() if database is not None else None
    return client.create_experiment(name, artifact_location=location)


def registered_model_name(model_name: str, steps: int) -> str:
    """`budcache-<model>-<steps>steps`: one registered model per model and sampler setting."""
    slug = re.sub(r"[^a-z0-9._-]+", "-", model_name.lower()).strip("-") or "model"
    return f"budcache-{slug}-{steps}steps"


def not_found(exc: MlflowException) -> bool:
    """MLflow's answer for a missing model or version, or (for aliases) an unknown alias."""
    return exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


def find_version(client: MlflowClient, name: str, version: str | None = None, alias: str | None = None) -> ModelVersion:
    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        if not not_found(exc):
            raise
        raise RegistryError(f"no registered model named '{name}': run the register pipeline first") from exc
    try:
        if alias is not None:
            return client.get_model_version_by_alias(name, alias)
        return client.get_model_version(name, str(version))
    except MlflowException as exc:
        if not not_found(exc):
            raise
        what = f"alias '{alias}'" if alias is not None else f"version {version}"
        hint = "promote a version first" if alias == PRODUCTION_ALIAS else "list versions in the MLflow UI"
        raise RegistryError(f"registered model '{name}' has no {what}: {hint}") from exc
