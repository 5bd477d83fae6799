"""What every model-running node shares: loading the configured model on the right device.

Nodes name the model by an import path (`module:function`) in `params:model`, so the
same pipelines run the embedded digits model, a FLUX checkpoint loader or a test double.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

import torch

logger = logging.getLogger(__name__)


def resolve_device(device: str | None) -> torch.device:
    """`auto` (or nothing) means the GPU when one is present, else the CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def import_object(path: str) -> Any:
    """`package.module:attribute`, the form entry points use."""
    module, _, attribute = path.partition(":")
    if not module or not attribute:
        raise ValueError(f"model loader {path!r} must look like 'package.module:function'")
    return getattr(importlib.import_module(module), attribute)


def load_model(model_params: dict[str, Any]) -> Any:
    """The configured pipeline on its device, with progress bars off and torch threads as configured.

    Small models can run faster on fewer threads than torch's default (one per core, and
    more on shared machines), so the thread count is a parameter.
    """
    threads = model_params.get("torch_threads")
    if threads:
        torch.set_num_threads(int(threads))
    device = resolve_device(model_params.get("device"))
    pipe = import_object(model_params["loader"])(device=device)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    logger.info("loaded %s on %s (%d torch threads)", model_params["name"], device, torch.get_num_threads())
    return pipe
