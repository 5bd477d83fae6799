"""Model adapters and the embedded default model."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from budcache_pipeline.models.digits.pipeline import DigitsFluxPipeline


def load_default_pipeline(device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> DigitsFluxPipeline:
    """The shipped digits pipeline, loaded offline; imported lazily so `budcache_pipeline.models` stays light."""
    import torch

    from budcache_pipeline.models.digits.pipeline import load_default_pipeline as load

    return load(device=device, dtype=dtype if dtype is not None else torch.float32)
