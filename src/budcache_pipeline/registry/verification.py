"""Checking a registered version: every file against the digests in the registry database, then the ladder.

The `SHA256SUMS` beside the policies only catches accidents: whoever can write the
artifact store can rewrite it too. So every download is checked first against the sha256
digests that registration recorded in the registry database (version tags `sha256.<path>`).
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.store.artifact.models_artifact_repo import REGISTERED_MODEL_META_FILE_NAME

from budcache_pipeline.policy import CachePolicy
from budcache_pipeline.policy_ladder_model import LADDER_ARTIFACT
from budcache_pipeline.registry.ladder import load_ladder
from budcache_pipeline.registry.store import (
    PRODUCTION_ALIAS,
    RegistryError,
    find_version,
    open_client,
    sqlite_database,
    store_uris,
)

DIGEST_TAG_PREFIX = "sha256."
LADDER_PATH = f"artifacts/{LADDER_ARTIFACT}"
"""Where MLflow keeps the ladder inside a logged pyfunc model."""

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class VerificationResult:
    """Outcome of `verify`: whether the version checked out, and one line that says why."""

    name: str
    version: str | None
    ok: bool
    message: str


MAX_ARTIFACT_BYTES = 64 * 2**20
"""No file of a registered version comes near this (the model code, MLmodel, a few kB of policies)."""


def file_digests(directory: Path) -> dict[str, str]:
    """sha256 of every file under `directory`, keyed by its POSIX path relative to it.

    Leaves out `registered_model_meta` (the registered name and version): MLflow writes it
    into a version's folder of a local artifact store whenever the model is loaded by its
    `models:/` URI, and nothing budcache does reads it. A symbolic link or a file over
    MAX_ARTIFACT_BYTES is refused before anything is read from it.
    """
    digests = {}
    for path in sorted(directory.rglob("*")):
        relative = path.relative_to(directory).as_posix()
        if path.is_symlink():
            raise RegistryError(f"{relative} in the artifact store is a symbolic link: versions hold plain files")
        if not path.is_file() or relative == REGISTERED_MODEL_META_FILE_NAME:
            continue
        if path.stat().st_size > MAX_ARTIFACT_BYTES:
            raise RegistryError(
                f"{relative} in the artifact store is {path.stat().st_size:,} bytes, over the {MAX_ARTIFACT_BYTES:,} "
                "any file of a policy ladder could be: do not deploy this version"
            )
        with path.open("rb") as handle:
            digests[relative] = hashlib.file_digest(handle, "sha256").hexdigest()
    return digests


def recorded_digests(model_version: ModelVersion) -> dict[str, str]:
    """The sha256 digests the registry database holds for a version's files, by path in the model."""
    return {
        key.removeprefix(DIGEST_TAG_PREFIX): value
        for key, value in model_version.tags.items()
        if key.startswith(DIGEST_TAG_PREFIX)
    }


def _check_digests(found: Mapping[str, str], recorded: Mapping[str, str], label: str) -> None:
    """Refuse unless the downloaded files are exactly the recorded ones, byte for byte."""
    differences = {
        "modified": sorted(path for path in found.keys() & recorded.keys() if found[path] != recorded[path]),
        "added": sorted(found.keys() - recorded.keys()),
        "removed": sorted(recorded.keys() - found.keys()),
    }
    problems = "; ".join(f"{kind}: {paths}" for kind, paths in differences.items() if paths)
    if problems:
        raise RegistryError(
            f"{label} failed verification: its files in the artifact store do not match the sha256 digests in the "
            f"registry database ({problems}): do not deploy it; restore the files from a trusted copy or register "
            "the ladder again"
        )


def download_ladder(
    client: MlflowClient, model_version: ModelVersion, directory: Path, *, allow_unverified: bool = False
) -> tuple[Path, dict[int, CachePolicy]]:
    """Fetch a version's files into `directory` and verify them; returns the ladder folder and policies.

    Files are read as plain bytes, the model is never loaded. Every file of the model is
    checked against the registry database's digests first, because `SHA256SUMS` can be
    rewritten by whoever alters the files, and a version with any altered file (its model
    code too) is compromised; then `SHA256SUMS`, the schema and the fingerprint tag. A
    version without digests is refused unless `allow_unverified`, which logs a warning.
    """
    label = f"version {model_version.version} of '{model_version.name}'"
    recorded = recorded_digests(model_version)
    if not recorded and not allow_unverified:
        raise RegistryError(
            f"{label} has no file digests in the registry database (it was registered before budcache recorded "
            "them), so tampering with its artifacts cannot be detected: re-register its ladder "
            "(`kedro run --pipelines register`) and promote the new version, or pass --allow-unverified to "
            "`budcache pull` or `budcache promote` to accept it unverified (logged as a warning)"
        )
    if not recorded:
        logger.warning(
            "%s has no file digests in the registry database: accepted unverified (--allow-unverified); its files "
            "are checked only against the SHA256SUMS beside them, which does not detect tampering",
            label,
        )
    source = client.get_model_version_download_uri(model_version.name, model_version.version)
    try:
        local = Path(mlflow.artifacts.download_artifacts(
            artifact_uri=source, dst_path=str(directory), tracking_uri=client.tracking_uri
        ))
    except MlflowException as exc:
        raise RegistryError(
            f"{label}: its files could not be downloaded from the artifact store ({' '.join(str(exc).split())})"
        ) from exc
    if recorded:
        _check_digests(file_digests(local), recorded, label)
    ladder_dir = local / LADDER_PATH
    try:
        ladder = load_ladder(ladder_dir)
    except RegistryError as exc:
        raise RegistryError(f"{label} failed verification: {exc}") from exc
    fingerprint = model_version.tags.get("model_fingerprint")
    for policy in ladder.values():
        if fingerprint is not None and policy.model_fingerprint != fingerprint:
            raise RegistryError(
                f"{label}: policy for budget {policy.budget} has fingerprint {policy.model_fingerprint}, "
                f"the version is tagged {fingerprint}: the registry entry was altered"
            )
    return ladder_dir, ladder


def verify(
    model_name: str,
    *,
    alias: str | None = None,
    version: str | int | None = None,
    tracking_uri: str | None = None,
) -> VerificationResult:
    """Check a registered version end to end without writing anything, for an audit job.

    The same checks as `pull`: every file of the model (the ladder, the model code MLflow
    would run, MLmodel) against the registry database's digests, then `SHA256SUMS`, the
    policy schema and the fingerprint tag. `alias` defaults to `production` when no
    `version` is given. Failures, versions without digests included, come back as
    `ok=False` with a one-line message; an sqlite database that does not exist is not created.
    """
    if alias is not None and version is not None:
        raise RegistryError("give an alias or a version to verify, not both")
    if alias is None and version is None:
        alias = PRODUCTION_ALIAS
    for uri in store_uris(tracking_uri):
        database = sqlite_database(uri)
        if database is not None and not database.is_file():
            message = f"no registry database at {database}: point MLFLOW_TRACKING_URI at the registry to verify"
            return VerificationResult(model_name, None, False, message)
    found = None
    try:
        client = open_client(tracking_uri)
        model_version = find_version(client, model_name, version=None if version is None else str(version), alias=alias)
        found = str(model_version.version)
        with tempfile.TemporaryDirectory() as staging:
            _, ladder = download_ladder(client, model_version, Path(staging))
        files = len(recorded_digests(model_version))
    except (RegistryError, MlflowException) as exc:
        return VerificationResult(model_name, found, False, " ".join(str(exc).split()))
    where = f" (alias {alias})" if alias is not None else ""
    fingerprint = model_version.tags.get("model_fingerprint")
    return VerificationResult(
        model_name,
        found,
        True,
        f"version {found} of '{model_name}'{where}: {files} files match the sha256 digests in the registry "
        f"database; policies for budgets {sorted(ladder)} pass the schema and fingerprint ({fingerprint}) checks",
    )
