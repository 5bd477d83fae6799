"""Kedro datasets for the project's own file formats."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
from kedro.io import AbstractDataset, DatasetError
from safetensors.torch import save_file

from budcache_pipeline.policy import CachePolicy, PolicyError, load_policy
from budcache_pipeline.prompts import read_prompts
from budcache_pipeline.search.reference import MANIFEST_FILE, ReferenceError, ReferenceSet, load_reference

_BATCH_FILE = "batch_{:05d}.safetensors"
"""Batch file names of the folder layout `search.reference.load_reference` reads."""


class PromptFileDataset(AbstractDataset[None, pd.DataFrame]):
    """A raw prompt file (csv, jsonl, parquet or txt), read as-is by `prompts.read_prompts`.

    One catalog entry covers every supported format, chosen by the file's extension;
    it is read-only because raw inputs are never rewritten by a pipeline.
    """

    def __init__(self, filepath: str, metadata: dict[str, Any] | None = None) -> None:
        self._filepath = Path(filepath)
        self.metadata = metadata

    def load(self) -> pd.DataFrame:
        return read_prompts(self._filepath)

    def save(self, data: None) -> None:
        raise DatasetError(f"{self._filepath} is a raw input: edit the file, pipelines do not write it")

    def _exists(self) -> bool:
        return self._filepath.is_file()

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath)}


class PolicyDataset(AbstractDataset[CachePolicy, CachePolicy]):
    """One cache policy as its canonical JSON (`CachePolicy.to_json`), never a pickle.

    Loading validates the file, so a policy edited by hand into an undeployable state
    fails the pipeline that reads it, not the deployment that would have run it.
    """

    def __init__(self, filepath: str, metadata: dict[str, Any] | None = None) -> None:
        self._filepath = Path(filepath)
        self.metadata = metadata

    def load(self) -> CachePolicy:
        if not self._filepath.is_file():
            raise DatasetError(f"policy {self._filepath} does not exist: run the pipeline that writes it first")
        try:
            return load_policy(self._filepath)
        except PolicyError as exc:
            raise DatasetError(f"{self._filepath} is not a valid policy: {exc}") from exc

    def save(self, data: CachePolicy) -> None:
        if not isinstance(data, CachePolicy):
            raise DatasetError(f"{self._filepath} stores a CachePolicy, got {type(data).__name__}")
        data.save(self._filepath)

    def _exists(self) -> bool:
        return self._filepath.is_file()

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath)}


class ReferenceSetDataset(AbstractDataset[ReferenceSet, ReferenceSet]):
    """Teacher trajectories in a folder: `manifest.json` plus safetensors batches, as `compute_reference` writes.

    `run_first` names the pipeline that produces the folder, so a pipeline started too
    early (e.g. `search` before `reference`) stops with the command that fixes it.
    """

    def __init__(self, path: str, run_first: str = "reference", metadata: dict[str, Any] | None = None) -> None:
        self._path = Path(path)
        self._run_first = run_first
        self.metadata = metadata

    def load(self) -> ReferenceSet:
        if not (self._path / MANIFEST_FILE).is_file():
            raise DatasetError(
                f"no reference trajectories in {self._path}: run `kedro run --pipelines {self._run_first}` first"
            )
        try:
            return load_reference(self._path)
        except ReferenceError as exc:
            raise DatasetError(f"{exc}; run `kedro run --pipelines {self._run_first}` again to finish it") from exc

    def save(self, data: ReferenceSet) -> None:
        """Rewrite the folder from scratch: a folder never mixes batches of two references."""
        if not isinstance(data, ReferenceSet):
            raise DatasetError(f"{self._path} stores a ReferenceSet, got {type(data).__name__}")
        if self._path.exists():
            shutil.rmtree(self._path)
        self._path.mkdir(parents=True)
        batch_size = int(data.manifest["batch_size"])
        for number, begin in enumerate(range(0, len(data), batch_size)):
            rows = slice(begin, begin + batch_size)
            tensors = {"noise": data.noise[rows], "final": data.final[rows]}
            path = self._path / _BATCH_FILE.format(number)
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))
        # The manifest describes exactly these pairs, also when `data` is a subset of another reference.
        manifest = {
            **data.manifest,
            "prompts": data.prompts,
            "seeds": data.seeds,
            "sigmas": data.sigmas,
            "count": len(data),
        }
        (self._path / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")

    def _exists(self) -> bool:
        return (self._path / MANIFEST_FILE).is_file()

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path), "run_first": self._run_first}
