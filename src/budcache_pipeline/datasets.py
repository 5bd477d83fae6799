"""Kedro datasets for the project's own file formats."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
from kedro.io import AbstractDataset, DatasetError

from budcache_pipeline.policy import CachePolicy, PolicyError, load_policy
from budcache_pipeline.prompts import read_prompts
from budcache_pipeline.search.reference import (
    MANIFEST_FILE,
    ReferenceSet,
    ReferenceSetError,
    load_reference,
    save_reference,
)


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
        except ReferenceSetError as exc:
            raise DatasetError(f"{exc}; run `kedro run --pipelines {self._run_first}` again to finish it") from exc

    def save(self, data: ReferenceSet) -> None:
        """Replace the folder whole: it never mixes batches of two references."""
        if not isinstance(data, ReferenceSet):
            raise DatasetError(f"{self._path} stores a ReferenceSet, got {type(data).__name__}")
        save_reference(data, self._path)

    def _exists(self) -> bool:
        return (self._path / MANIFEST_FILE).is_file()

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path), "run_first": self._run_first}
