"""The MLflow policy registry: log runs, register policy ladders, promote, pull.

A registered model holds one ladder of policies (one per budget) for one model and
one number of steps. Each version is an MLflow pyfunc model logged from code
(`policy_ladder_model.py`) whose artifacts are the canonical policy JSON files and
their sha256 checksums, so a deployment can fetch and verify plain JSON and nothing
is ever unpickled. Aliases carry the lifecycle: `candidate` on registration,
`production` only through the quality gate in `promote`.

The `SHA256SUMS` beside the policies only catches accidents: whoever can write the
artifact store can rewrite it too. So registration also records the sha256 of every
file of the version in the registry database (version tags `sha256.<path>`, and the
same tags on the run), and every download is checked against those digests first.

Tracking and registry default to an sqlite database at the project root, because
MLflow 3 refuses the plain file store; `MLFLOW_TRACKING_URI` points both at a server.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
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
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.store.artifact.models_artifact_repo import REGISTERED_MODEL_META_FILE_NAME

from budcache_pipeline import __version__
from budcache_pipeline.policy import CachePolicy, PolicyError, load_policy
from budcache_pipeline.policy_ladder_model import (
    CHECKSUMS_FILE,
    LADDER_ARTIFACT,
    LadderIntegrityError,
    checksums_text,
    holdout_loss,
    policy_file_name,
    read_ladder,
    select_budget,
)

DEFAULT_EXPERIMENT = "budcache"
CANDIDATE_ALIAS = "candidate"
PRODUCTION_ALIAS = "production"
MODEL_ARTIFACT = "policy_ladder"
POLICIES_ARTIFACT = "policies"
DIGEST_TAG_PREFIX = "sha256."
_PARAMS_PER_BATCH = 100
_MODEL_CODE = Path(__file__).with_name("policy_ladder_model.py")
_LADDER_PATH = f"artifacts/{LADDER_ARTIFACT}"
"""Where MLflow keeps the ladder inside a logged pyfunc model."""

logger = logging.getLogger(__name__)


class RegistryError(ValueError):
    """A registry operation that was refused; the message says why and what to do."""


@dataclass(frozen=True)
class RegisteredLadder:
    """Where a registered ladder lives: registered model name, version and the run that logged it."""

    name: str
    version: str
    run_id: str
    model_uri: str


@dataclass(frozen=True)
class VerificationResult:
    """Outcome of `verify`: whether the version checked out, and one line that says why."""

    name: str
    version: str | None
    ok: bool
    message: str


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


def _store_uris(tracking_uri: str | None) -> tuple[str, str]:
    """Tracking and registry URIs: an explicit URI is both; else `MLFLOW_REGISTRY_URI` may split them.

    MLflow's `set_registry_uri` exports `MLFLOW_REGISTRY_URI` itself, so the variable must
    not outrank an explicit URI or a process would stay on the first registry it used.
    """
    uri = resolve_tracking_uri(tracking_uri)
    return uri, tracking_uri or os.environ.get("MLFLOW_REGISTRY_URI") or uri


def _client(tracking_uri: str | None) -> MlflowClient:
    """Point MLflow's fluent API and a client at the same tracking and registry store."""
    uri, registry_uri = _store_uris(tracking_uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(registry_uri)
    return MlflowClient(tracking_uri=uri, registry_uri=registry_uri)


def _sqlite_database(uri: str) -> Path | None:
    """The database file behind an `sqlite:///` URI, None for any other store."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///").partition("?")[0]).resolve()


def _experiment_id(client: MlflowClient, name: str) -> str:
    """Existing experiment, or a new one whose artifacts sit next to an sqlite database.

    MLflow would otherwise store artifacts under `./mlruns` of whatever directory the
    command ran in, scattering a project's registry across working directories.
    """
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    database = _sqlite_database(mlflow.get_tracking_uri())
    location = (database.parent / "mlartifacts" / name).as_uri() if database is not None else None
    return client.create_experiment(name, artifact_location=location)


def registered_model_name(model_name: str, steps: int) -> str:
    """`budcache-<model>-<steps>steps`: one registered model per model and sampler setting."""
    slug = re.sub(r"[^a-z0-9._-]+", "-", model_name.lower()).strip("-") or "model"
    return f"budcache-{slug}-{steps}steps"


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


def _check_ladder(policies: Mapping[int, CachePolicy]) -> None:
    """A ladder must be one model, one step count, keyed by budget, with a held-out loss each."""
    if not policies:
        raise RegistryError("the policy ladder is empty: give at least one policy")
    for budget, policy in policies.items():
        if budget != policy.budget:
            raise RegistryError(f"ladder key {budget} holds a policy with budget {policy.budget}: key by budget")
        if holdout_loss(policy.to_dict()) is None:
            raise RegistryError(
                f"policy for budget {budget} has no finite provenance['scores']['holdout_mse']: "
                "evaluate it on the holdout set before registering"
            )
    identities = {(p.model_name, p.model_fingerprint, p.steps) for p in policies.values()}
    if len(identities) > 1:
        raise RegistryError(f"the ladder mixes models or step counts {sorted(identities)}: register one per model")


def write_ladder(policies: Mapping[int, CachePolicy] | Iterable[CachePolicy], directory: str | Path) -> list[Path]:
    """Write canonical policy JSONs and their `SHA256SUMS`; returns the policy paths by budget."""
    ladder = _as_ladder(policies)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    files = {policy_file_name(b): p.to_json().encode("utf-8") for b, p in sorted(ladder.items())}
    for name, data in files.items():
        (directory / name).write_bytes(data)
    (directory / CHECKSUMS_FILE).write_text(checksums_text(files))
    return [directory / name for name in files]


def load_ladder(directory: str | Path) -> dict[int, CachePolicy]:
    """Policies by budget from a ladder directory, after checksum and schema checks."""
    directory = Path(directory)
    try:
        budgets = read_ladder(directory)
    except LadderIntegrityError as exc:
        raise RegistryError(str(exc)) from exc
    ladder = {}
    for budget in sorted(budgets):
        path = directory / policy_file_name(budget)
        try:
            policy = load_policy(path)
        except PolicyError as exc:
            raise RegistryError(f"{path} is not a valid policy: {exc}") from exc
        if policy.budget != budget:
            raise RegistryError(f"{path} holds a policy with budget {policy.budget}: the file name was changed")
        ladder[budget] = policy
    return ladder


def _as_ladder(policies: Mapping[int, CachePolicy] | Iterable[CachePolicy]) -> dict[int, CachePolicy]:
    if isinstance(policies, Mapping):
        return dict(policies)
    ladder: dict[int, CachePolicy] = {}
    for policy in policies:
        if policy.budget in ladder:
            raise RegistryError(f"two policies share budget {policy.budget}: keep one per budget")
        ladder[policy.budget] = policy
    return ladder


def pick_policy(policies: Mapping[int, CachePolicy] | Iterable[CachePolicy], budget: int) -> CachePolicy:
    """The policy to run for a request of `budget` compute steps.

    Lowest held-out loss among policies whose budget fits (larger budget on ties, and
    for unscored ladders); the same rule the registered pyfunc model serves.
    """
    ladder = _as_ladder(policies)
    if not ladder:
        raise RegistryError("no policies to pick from: pull a ladder first")
    losses = {b: holdout_loss(p.to_dict()) for b, p in ladder.items()}
    try:
        return ladder[select_budget(losses, budget)]
    except ValueError as exc:
        raise RegistryError(str(exc)) from exc


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
    client = _client(tracking_uri)
    run = client.create_run(_experiment_id(client, experiment), run_name=run_name, tags=dict(tags or {}))
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
    _check_ladder(policies)
    client = _client(tracking_uri)
    first = next(iter(policies.values()))
    name = registered_model_name(first.model_name, first.steps)
    if run_id is None:
        run_id = client.create_run(_experiment_id(client, experiment), run_name=f"register {name}").info.run_id
    with tempfile.TemporaryDirectory() as staging:
        ladder_dir = Path(staging) / LADDER_ARTIFACT
        write_ladder(policies, ladder_dir)
        with mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None):
            info = mlflow.pyfunc.log_model(
                name=MODEL_ARTIFACT,
                python_model=str(_MODEL_CODE),
                artifacts={LADDER_ARTIFACT: str(ladder_dir)},
                pip_requirements=[f"mlflow=={mlflow.__version__}", f"pandas=={pd.__version__}"],
            )
        digests = _model_digests(client, info.model_id, ladder_dir, Path(staging) / "stored")
    digest_tags = {f"{DIGEST_TAG_PREFIX}{path}": digest for path, digest in sorted(digests.items())}
    client.log_batch(run_id, tags=[RunTag(key, value) for key, value in digest_tags.items()])
    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        if not _not_found(exc):
            raise
        client.create_registered_model(
            name,
            tags={"model_name": first.model_name, "steps": str(first.steps)},
            description=f"budcache cache-policy ladders for {first.model_name} at {first.steps} steps",
        )
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
    version = mlflow.register_model(info.model_uri, name, tags=tags)
    client.set_registered_model_alias(name, CANDIDATE_ALIAS, version.version)
    return RegisteredLadder(name=name, version=str(version.version), run_id=run_id, model_uri=info.model_uri)


def _file_digests(directory: Path) -> dict[str, str]:
    """sha256 of every file under `directory`, keyed by its POSIX path relative to it.

    Leaves out `registered_model_meta` (the registered name and version): MLflow writes it
    into a version's folder of a local artifact store whenever the model is loaded by its
    `models:/` URI, and nothing budcache does reads it.
    """
    return {
        path.relative_to(directory).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.relative_to(directory).as_posix() != REGISTERED_MODEL_META_FILE_NAME
    }


def _model_digests(client: MlflowClient, model_id: str, ladder_dir: Path, directory: Path) -> dict[str, str]:
    """Digests to record for a logged model, keyed by path inside it.

    The ladder's come from the bytes this process wrote, so a file changed on its way
    into the store fails verification later; the files MLflow wrote itself (MLmodel,
    environment, model code) are known only as the store holds them.
    """
    location = client.get_logged_model(model_id).artifact_location
    stored = Path(mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=str(directory)))
    digests = {path: d for path, d in _file_digests(stored).items() if not path.startswith(f"{_LADDER_PATH}/")}
    digests.update({f"{_LADDER_PATH}/{path}": d for path, d in _file_digests(ladder_dir).items()})
    return digests


def _not_found(exc: MlflowException) -> bool:
    """MLflow's answer for a missing model or version, or (for aliases) an unknown alias."""
    return exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


def _version(client: MlflowClient, name: str, version: str | None = None, alias: str | None = None) -> ModelVersion:
    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        if not _not_found(exc):
            raise
        raise RegistryError(f"no registered model named '{name}': run the register pipeline first") from exc
    try:
        if alias is not None:
            return client.get_model_version_by_alias(name, alias)
        return client.get_model_version(name, str(version))
    except MlflowException as exc:
        if not _not_found(exc):
            raise
        what = f"alias '{alias}'" if alias is not None else f"version {version}"
        hint = "promote a version first" if alias == PRODUCTION_ALIAS else "list versions in the MLflow UI"
        raise RegistryError(f"registered model '{name}' has no {what}: {hint}") from exc


def _recorded_digests(model_version: ModelVersion) -> dict[str, str]:
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


def _download_ladder(
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
    recorded = _recorded_digests(model_version)
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
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(directory)))
    except MlflowException as exc:
        raise RegistryError(
            f"{label}: its files could not be downloaded from the artifact store ({' '.join(str(exc).split())})"
        ) from exc
    if recorded:
        _check_digests(_file_digests(local), recorded, label)
    ladder_dir = local / _LADDER_PATH
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


def _loss_table(candidate: Mapping[int, CachePolicy], production: Mapping[int, CachePolicy] | None) -> pd.DataFrame:
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


def _gate(
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
    """
    reason = reason.strip() if force and reason else None
    if force and not reason:
        raise RegistryError("a forced promotion needs a reason: pass --reason TEXT")
    client = _client(tracking_uri)
    target = _version(client, model_name, version=str(version))
    current = _current_production(client, model_name)
    with tempfile.TemporaryDirectory() as staging:
        _, candidate = _download_ladder(client, target, Path(staging) / "candidate", allow_unverified=allow_unverified)
        production = None
        if current:
            _, production = _download_ladder(
                client, current, Path(staging) / "production", allow_unverified=allow_unverified
            )
    table = _loss_table(candidate, production)
    previous = str(current.version) if current else None

    if previous == str(target.version):
        refusal = None
        message = f"version {target.version} of '{model_name}' is already production: nothing changed"
    elif production is None:
        refusal = None
        message = f"first promotion of '{model_name}': version {target.version} is now production"
    else:
        refusal = _gate(candidate, production, table)
        message = (
            f"version {target.version} beats production version {previous} at every shared budget: promoted"
            if refusal is None
            else f"refused to promote version {target.version} over production version {previous}: {refusal}"
        )
    if refusal is not None and force:
        message = f"forced promotion of version {target.version} over version {previous} ({refusal}); reason: {reason}"
    promoted = refusal is None or force
    if promoted and previous != str(target.version):
        client.set_registered_model_alias(model_name, PRODUCTION_ALIAS, target.version)
        stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
        client.set_model_version_tag(model_name, target.version, "promoted_at", stamp)
        client.set_model_version_tag(model_name, target.version, "promoted_over", previous or "none")
    if promoted and force:
        client.set_model_version_tag(model_name, target.version, "promotion_forced", "true")
        client.set_model_version_tag(model_name, target.version, "promotion_reason", reason)
    return PromotionResult(
        name=model_name,
        version=str(target.version),
        previous_version=previous,
        promoted=promoted,
        forced=force,
        reason=reason,
        message=message,
        comparison=table,
    )


def _current_production(client: MlflowClient, name: str) -> ModelVersion | None:
    try:
        return client.get_model_version_by_alias(name, PRODUCTION_ALIAS)
    except MlflowException as exc:
        if not _not_found(exc):
            raise
        return None


def format_promotion(result: PromotionResult) -> str:
    """Human-readable promotion report for the `budcache promote` command."""
    table = result.comparison.to_string(index=False, na_rep="-", float_format=lambda v: f"{v:.6g}")
    status = "PROMOTED" if result.promoted else "REFUSED"
    return f"{status}: {result.message}\n\n{table}\n"


def pull(
    model_name: str,
    alias: str,
    out_dir: str | Path,
    expect_fingerprint: str | None = None,
    expect_steps: int | None = None,
    tracking_uri: str | None = None,
    allow_unverified: bool = False,
) -> list[Path]:
    """Write the ladder behind `models:/<model_name>@<alias>` into `out_dir` after verifying it.

    Checks every file against the sha256 digests in the registry database (a version
    registered without them is refused unless `allow_unverified`, which logs a warning),
    then checksums and schema, and refuses policies made for another model
    (`expect_fingerprint`) or another number of steps (`expect_steps`). Nothing is written
    unless every check passes; the directory then holds exactly that ladder (older
    `budget_*.json` files are removed) and its `SHA256SUMS`. Returns the policy paths
    sorted by budget.
    """
    client = _client(tracking_uri)
    model_version = _version(client, model_name, alias=alias)
    with tempfile.TemporaryDirectory() as staging:
        source, ladder = _download_ladder(client, model_version, Path(staging), allow_unverified=allow_unverified)
        label = f"'{model_name}'@{alias} (version {model_version.version})"
        for budget, policy in sorted(ladder.items()):
            if expect_fingerprint is not None and policy.model_fingerprint != expect_fingerprint:
                raise RegistryError(
                    f"{label}: policy for budget {budget} was searched on model fingerprint "
                    f"{policy.model_fingerprint}, not {expect_fingerprint}: pull the ladder registered for your model"
                )
            if expect_steps is not None and policy.steps != expect_steps:
                raise RegistryError(
                    f"{label}: policy for budget {budget} has {policy.steps} steps, the model runs {expect_steps}: "
                    f"pull '{registered_model_name(policy.model_name, expect_steps)}' instead"
                )
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in out_dir.glob("budget_*.json"):
            stale.unlink()
        written = []
        for budget in sorted(ladder):
            target = out_dir / policy_file_name(budget)
            target.write_bytes((source / policy_file_name(budget)).read_bytes())
            written.append(target)
        (out_dir / CHECKSUMS_FILE).write_bytes((source / CHECKSUMS_FILE).read_bytes())
    return written


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
    for uri in _store_uris(tracking_uri):
        database = _sqlite_database(uri)
        if database is not None and not database.is_file():
            message = f"no registry database at {database}: point MLFLOW_TRACKING_URI at the registry to verify"
            return VerificationResult(model_name, None, False, message)
    found = None
    try:
        client = _client(tracking_uri)
        model_version = _version(client, model_name, version=None if version is None else str(version), alias=alias)
        found = str(model_version.version)
        with tempfile.TemporaryDirectory() as staging:
            _, ladder = _download_ladder(client, model_version, Path(staging))
        files = len(_recorded_digests(model_version))
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
