"""Model adapters and the embedded default model."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from budcache_pipeline.models.digits.pipeline import DigitsFluxPipeline


def load_default_pipeline(device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> DigitsFluxPipeline:
    """The shipped digits pipeline, loaded offline; imported lazily so `budcache_pipeline.models` stays light."""
    import torch

    from budcache_pipeline.models.digits.pipeline import load_default_pipeline as load

    return load(device=device, dtype=dtype if dtype is not None else torch.float32)


def train_default_model(out_dir: str | Path, *, steps: int, seed: int, num_threads: int) -> dict[str, Any]:
    """Reproduce the shipped default model from scratch (see `budcache train-default-model`)."""
    from budcache_pipeline.models.digits.train import train_default_model as train

    return train(out_dir, steps=steps, seed=seed, num_threads=num_threads)
