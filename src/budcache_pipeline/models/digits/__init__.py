"""The embedded default model: a FLUX-architecture text-to-digit generator, its trainer and its judge.

Names are imported on first use, so `budcache_pipeline.metrics` can use the judge without pulling in
the trainer (which itself uses the metrics).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from budcache_pipeline.models.digits.judge import Judge, load_default_judge
    from budcache_pipeline.models.digits.pipeline import DigitsFluxPipeline, load_default_pipeline
    from budcache_pipeline.models.digits.text_encoder import DigitsTextEncoder, DigitsTokenizer
    from budcache_pipeline.models.digits.train import train_default_model

_EXPORTS = {
    "DigitsFluxPipeline": "pipeline",
    "DigitsTextEncoder": "text_encoder",
    "DigitsTokenizer": "text_encoder",
    "Judge": "judge",
    "load_default_judge": "judge",
    "load_default_pipeline": "pipeline",
    "train_default_model": "train",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
