"""The provenance node: which code, data and model a ladder comes from, as one catalog dataset.

Computed once, by `record_provenance`, into `provenance` (08_reporting/provenance.json); the register
node tags the registered version and the MLflow run from that dataset and reads nothing else of the
project's state. DVC hashes are DVC's own md5s, so `source` can say whether `dvc.lock` records them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from budcache_pipeline.policy import CachePolicy


def dvc_md5(path: Path) -> str:
    """DVC's content hash of a file (md5) or a directory (md5 of its sorted file listing + `.dir`),
    so the value matches the `md5` that `dvc.lock` records for the same data."""
    if path.is_file():
        return hashlib.md5(path.read_bytes()).hexdigest()
    if not path.is_dir():
        raise FileNotFoundError(f"{path} does not exist: run the pipeline that produces it before registering")
    entries = [
        {"md5": hashlib.md5(f.read_bytes()).hexdigest(), "relpath": f.relative_to(path).as_posix()}
        for f in path.rglob("*")
        if f.is_file()
    ]
    listing = json.dumps(sorted(entries, key=lambda e: e["relpath"]), sort_keys=True)
    return hashlib.md5(listing.encode("utf-8")).hexdigest() + ".dir"


def _lock_hashes(lock: Path) -> dict[str, str]:
    """Every path's md5 recorded in `dvc.lock` (deps and outs of all stages)."""
    if not lock.is_file():
        return {}
    recorded: dict[str, str] = {}
    for stage in (yaml.safe_load(lock.read_text()) or {}).get("stages", {}).values():
        for entry in [*stage.get("deps", []), *stage.get("outs", [])]:
            if "md5" in entry:
                recorded[entry["path"]] = entry["md5"]
    return recorded


def data_hash(paths: Iterable[str], project_root: Path) -> dict[str, Any]:
    """The DVC data hash of the prompts and references a ladder was searched and judged on.

    Each path's hash is DVC's md5; `source` says whether `dvc.lock` records the same
    values (the run is a `dvc repro` of committed data) or they were only computed here.
    """
    hashes = {p: dvc_md5(project_root / p) for p in paths}
    recorded = _lock_hashes(project_root / "dvc.lock")
    source = "dvc.lock" if hashes and all(recorded.get(p) == h for p, h in hashes.items()) else "computed"
    combined = hashlib.sha256("".join(f"{p} {h}\n" for p, h in sorted(hashes.items())).encode()).hexdigest()
    return {"hash": combined, "paths": hashes, "source": source}


def record_provenance(ladder: dict[int, CachePolicy], data_paths: list[str]) -> dict[str, Any]:
    """The ladder's code version (package version and git commit), the DVC hash of `data_paths`
    (relative to the project root) and the model fingerprint its policies were searched for.

    Takes the scored ladder, so it runs once every policy, and so the data it hashes, is final.
    """
    # mlflow takes seconds to import and the registry imports it; only the register pipeline needs it.
    from budcache_pipeline.registry import code_version, find_project_root

    root = find_project_root()
    return {
        "code_version": code_version(root),
        "data": data_hash(data_paths, root),
        # one model per ladder: registering refuses a ladder whose policies name several
        "model_fingerprint": next(iter(ladder.values())).model_fingerprint,
    }
