"""Kedro datasets for the project's own file formats."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
from kedro.io import AbstractDataset, DatasetError

from budcache_pipeline.prompts import read_prompts


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
