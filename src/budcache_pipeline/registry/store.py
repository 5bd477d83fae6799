"""Where the registry lives and how to reach it: URIs, the MLflow client, lookups, retries on a locked database.

Tracking and registry default to an sqlite database at the project root, because
MLflow 3 refuses the plain file store; `MLFLOW_TRACKING_URI` points both at a server.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import mlflow
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion, RegisteredModel
from mlflow.exceptions import MlflowException
from mlflow.tracking._model_registry import utils as registry_utils
from mlflow.tracking._tracking_service import utils as tracking_utils
from mlflow.utils.file_utils import ExclusiveFileLock
from sqlalchemy.exc import OperationalError

DEFAULT_EXPERIMENT = "budcache"
CANDIDATE_ALIAS = "candidate"
PRODUCTION_ALIAS = "production"
LOCK_ATTEMPTS = 6
"""Tries of a registry write while an sqlite database stays locked by other writers (backoff 0.5 s, doubling)."""
LOCK_BACKOFF_SECONDS = 0.5

logger = logging.getLogger(__name__)
_T = TypeVar("_T")
_INITIALISED: set[str] = set()
_TRACKING_ENV, _REGISTRY_ENV = "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"


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
    """A client of the tracking and registry store; MLflow's process-wide URIs are left as they are."""
    uri, registry_uri = store_uris(tracking_uri)
    databases = {str(d) for d in (sqlite_database(uri), sqlite_database(registry_uri)) if d is not None}
    if databases <= _INITIALISED or os.name == "nt":
        return MlflowClient(tracking_uri=uri, registry_uri=registry_uri)
    with ExclusiveFileLock(_init_lock_path(databases)):
        client = MlflowClient(tracking_uri=uri, registry_uri=registry_uri)
        client.search_registered_models(max_results=1)
    _INITIALISED.update(databases)
    return client


@contextmanager
def fluent_store(tracking_uri: str | None) -> Iterator[None]:
    """MLflow's fluent API on the store `open_client(tracking_uri)` opens, for one block, then the
    process's URIs as they were.

    `mlflow.pyfunc.log_model` and `mlflow.register_model` have no client form, and they read the
    process-wide URIs, which `set_tracking_uri` / `set_registry_uri` also export as environment
    variables. MLflow has no public way to tell "never set" from "set to the default", so the
    module globals are saved as MLflow's own `_use_tracking_uri` saves them, and the variables
    are put back exactly as they were.
    """
    uri, registry_uri = store_uris(tracking_uri)
    saved_env = {name: os.environ.get(name) for name in (_TRACKING_ENV, _REGISTRY_ENV)}
    saved = (tracking_utils._tracking_uri, registry_utils._registry_uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(registry_uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved[0])
        mlflow.set_registry_uri(saved[1])
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _init_lock_path(databases: set[str]) -> str:
    """The lock held while this process first opens an sqlite store.

    MLflow's tracking store creates and migrates a new database's tables without a lock, so
    two jobs starting on a fresh database at once fail ("duplicate column name", alembic's
    "expected to match one row"). The lock lives in the temporary folder, as MLflow's own for
    its jobs store does, never beside the database.
    """
    digest = hashlib.sha256("\n".join(sorted(databases)).encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), f"budcache-registry-{digest}.lock")


def _locked(exc: BaseException) -> bool:
    return "database is locked" in str(exc) or "database table is locked" in str(exc)


def retry_locked(write: Callable[[], _T], what: str) -> _T:
    """Run one registry write, retrying a bounded number of times while sqlite reports a lock.

    MLflow already waits 20 s on a busy sqlite database per statement; this covers writers
    that hold it longer (a long registration, a backup). Only idempotent writes (aliases, tags)
    go through it, so a retry never doubles an effect.
    """
    delay, attempt = LOCK_BACKOFF_SECONDS, 1
    while True:
        try:
            return write()
        except (MlflowException, OperationalError) as exc:
            if not _locked(exc):
                raise
            if attempt == LOCK_ATTEMPTS:
                raise RegistryError(
                    f"{what}: the registry database stayed locked by other writers through {LOCK_ATTEMPTS} attempts; "
                    "nothing was changed by this step: run the command again when the other jobs finish, or serve "
                    "the registry with `mlflow server` and point MLFLOW_TRACKING_URI at it for many concurrent writers"
                ) from exc
            logger.warning(
                "%s: registry database locked (attempt %d of %d), retrying in %.1f s",
                what,
                attempt,
                LOCK_ATTEMPTS,
                delay,
            )
            time.sleep(delay)
            delay, attempt = delay * 2, attempt + 1


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
    database = sqlite_database(client.tracking_uri)
    location = (database.parent / "mlartifacts" / name).as_uri() if database is not None else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException as exc:
        if not already_exists(exc):
            raise
        return client.get_experiment_by_name(name).experiment_id


def already_exists(exc: MlflowException) -> bool:
    """MLflow's answer when another job created the same experiment or registered model first."""
    return exc.error_code == "RESOURCE_ALREADY_EXISTS"


def registered_model_name(model_name: str, steps: int) -> str:
    """`budcache-<model>-<steps>steps`: one registered model per model and sampler setting."""
    slug = re.sub(r"[^a-z0-9._-]+", "-", model_name.lower()).strip("-") or "model"
    return f"budcache-{slug}-{steps}steps"


def not_found(exc: MlflowException) -> bool:
    """MLflow's answer for a missing model or version, or (for aliases) an unknown alias."""
    return exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


def find_registered_model(client: MlflowClient, name: str) -> RegisteredModel:
    """The registered model `name`, or a RegistryError that says how one comes to exist."""
    try:
        return client.get_registered_model(name)
    except MlflowException as exc:
        if not not_found(exc):
            raise
        raise RegistryError(f"no registered model named '{name}': run the register pipeline first") from exc


def find_version(client: MlflowClient, name: str, version: str | None = None, alias: str | None = None) -> ModelVersion:
    """A version by number or alias; a missing model, version or alias is a RegistryError naming the fix."""
    find_registered_model(client, name)
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
