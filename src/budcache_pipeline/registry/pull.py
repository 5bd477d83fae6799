"""Pulling a verified ladder into a deployment folder."""

from __future__ import annotations

import tempfile
from pathlib import Path

from budcache_pipeline.atomic import write_bytes_atomic
from budcache_pipeline.policy_ladder_model import CHECKSUMS_FILE, policy_file_name
from budcache_pipeline.registry.store import (
    RegistryError,
    find_version,
    open_client,
    registered_model_name,
)
from budcache_pipeline.registry.verification import download_ladder


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
    client = open_client(tracking_uri)
    model_version = find_version(client, model_name, alias=alias)
    with tempfile.TemporaryDirectory() as staging:
        source, ladder = download_ladder(client, model_version, Path(staging), allow_unverified=allow_unverified)
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
        return _write_pulled(source, sorted(ladder), Path(out_dir))


def _write_pulled(source: Path, budgets: list[int], out_dir: Path) -> list[Path]:
    """Each file written atomically, `SHA256SUMS` last, stale policies removed after it.

    A job killed half-way leaves whole files only, and a folder whose files disagree with its
    `SHA256SUMS` is refused by `load_ladder` instead of being served.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [
        write_bytes_atomic(out_dir / policy_file_name(b), (source / policy_file_name(b)).read_bytes()) for b in budgets
    ]
    write_bytes_atomic(out_dir / CHECKSUMS_FILE, (source / CHECKSUMS_FILE).read_bytes())
    for stale in set(out_dir.glob("budget_*.json")) - set(written):
        stale.unlink()
    return written
