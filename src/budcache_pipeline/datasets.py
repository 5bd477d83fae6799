"""Kedro datasets for the project's own file formats, and atomic saves for kedro-datasets' ones."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
from kedro.io import AbstractDataset, DatasetError
from matplotlib.figure import Figure

from budcache_pipeline.atomic import atomic_folder, atomic_path
from budcache_pipeline.pipelines.common import ModelHandle
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


class AtomicDataset(AbstractDataset[Any, Any]):
    """A kedro-datasets file dataset (e.g. `json.JSONDataset`, `pandas.CSVDataset`) whose saves are atomic.

    kedro-datasets write through fsspec straight into the target, truncating it first, so a job
    killed mid-save leaves a partial file that the next pipeline reads as finished. This saves the
    wrapped dataset to a temporary file beside the target and renames it over; loads are the
    wrapped dataset's.
    """

    def __init__(self, dataset: str | dict[str, Any], filepath: str, metadata: dict[str, Any] | None = None) -> None:
        self._config = {"type": dataset} if isinstance(dataset, str) else dict(dataset)
        self._filepath = Path(filepath)
        self.metadata = metadata

    def _wrapped(self, path: Path) -> AbstractDataset:
        return AbstractDataset.from_config(self._filepath.name, {**self._config, "filepath": str(path)})

    def load(self) -> Any:
        return self._wrapped(self._filepath).load()

    def save(self, data: Any) -> None:
        with atomic_path(self._filepath) as temporary:
            self._wrapped(temporary).save(data)

    def _exists(self) -> bool:
        return self._filepath.is_file()

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath), "dataset": self._config}


class FigureDataset(AbstractDataset["Figure | dict[str, Figure]", list[Path]]):
    """Matplotlib figures as PNG files: one figure at `filepath`, or a dict of them as the folder `filepath`.

    Written atomically (kedro-datasets' MatplotlibDataset writes in place and, with `overwrite`,
    deletes the folder before redrawing it); a folder is replaced whole, so no plot of an earlier
    run survives beside the new ones. Loads as the written files, sorted, for whoever uploads them.
    """

    def __init__(self, filepath: str, dpi: int = 120, metadata: dict[str, Any] | None = None) -> None:
        self._filepath = Path(filepath)
        self._dpi = dpi
        self.metadata = metadata

    def _draw(self, figure: Figure, path: Path) -> None:
        if not isinstance(figure, Figure):
            raise DatasetError(f"{self._filepath} stores matplotlib figures, got {type(figure).__name__}")
        figure.savefig(path, dpi=self._dpi, format="png")

    def load(self) -> list[Path]:
        if self._filepath.is_file():
            return [self._filepath]
        if self._filepath.is_dir():
            return sorted(p for p in self._filepath.iterdir() if p.is_file())
        raise DatasetError(f"no plots at {self._filepath}: run the pipeline that draws them first")

    def save(self, data: Figure | dict[str, Figure]) -> None:
        if isinstance(data, dict):
            with atomic_folder(self._filepath) as staging:
                for name, figure in data.items():
                    if Path(name).name != name:
                        raise DatasetError(f"plot name {name!r} must be a file name, without folders")
                    self._draw(figure, staging / name)
            return
        with atomic_path(self._filepath) as temporary:
            self._draw(data, temporary)

    def _exists(self) -> bool:
        return self._filepath.exists()

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath), "dpi": self._dpi}


class FileDataset(AbstractDataset[None, Path]):
    """A file that another catalog entry writes, loaded as its path, for a node that uploads the file itself.

    Used as the `<name>@file` view of `<name>@<format>` (Kedro transcoding): both are one dataset
    to the DAG, so the uploading node runs after the node that writes the file.
    """

    def __init__(self, filepath: str, metadata: dict[str, Any] | None = None) -> None:
        self._filepath = Path(filepath)
        self.metadata = metadata

    def load(self) -> Path:
        if not self._filepath.is_file():
            raise DatasetError(f"{self._filepath} does not exist: run the pipeline that writes it first")
        return self._filepath

    def save(self, data: None) -> None:
        raise DatasetError(f"{self._filepath} is written through its other catalog entry, not this file view")

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
        """Atomic (`CachePolicy.save`): a kill mid-save leaves the previous policy, never a truncated one."""
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


class ModelDataset(AbstractDataset[Any, ModelHandle]):
    """The run's model as a load-only catalog entry: every load returns the same `ModelHandle`.

    The catalog cannot read parameters, so `hooks.ModelHooks` builds this entry from the `model:`
    parameters as the run resolved them (environment, `--params model.steps=...`). The handle loads
    the adapter on first use, once per thread, so the entry costs nothing until a node computes with
    it and a node that launches torchrun ranks never loads the weights in its own process.
    """

    def __init__(self, model: Mapping[str, Any], metadata: dict[str, Any] | None = None) -> None:
        self._handle = ModelHandle(model)
        self.metadata = metadata

    def load(self) -> ModelHandle:
        return self._handle

    def save(self, data: Any) -> None:
        raise DatasetError("`model` is configured by the `model:` parameters, not written by a pipeline")

    def _exists(self) -> bool:
        return True

    def _describe(self) -> dict[str, Any]:
        return {"model": self._handle.params}
