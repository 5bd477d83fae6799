"""Ingest nodes: Kedro wrappers over `budcache_pipeline.prompts`."""

from __future__ import annotations

from typing import Any

import pandas as pd

from budcache_pipeline.prompts import DEFAULT_SALT, prepare_prompts, split_prompts


def clean_prompts(raw_prompts: pd.DataFrame, params: dict[str, Any]) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Normalise, de-duplicate, seed and assign a split to every prompt; summarise."""
    return prepare_prompts(
        raw_prompts,
        holdout_fraction=float(params["holdout_fraction"]),
        salt=str(params.get("split_salt", DEFAULT_SALT)),
    )


def split_sets(prepared_prompts: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Separate the calibration set (searched on) from the holdout set (judged on)."""
    return split_prompts(prepared_prompts)
