"""What every model-running node shares: the configured model adapter, loaded once per thread.

Nodes get the `model:` block (`conf/base/parameters.yml`) and ask for its adapter here; the
first node that asks loads it (and sets the torch thread count), later nodes of the same run
reuse it, so a FLUX.1-dev checkpoint is read from disk once per `kedro run`. Under Kedro's
`ThreadRunner` each worker thread loads its own copy: a search registers cache hooks on the
transformer and alignment freezes its parameters, so two budgets side by side must not share one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from pathlib import Path
from typing import Any

import torch

from budcache_pipeline.models.adapter import Size
from budcache_pipeline.models.spec import ModelSpec, load_adapter

logger = logging.getLogger(__name__)


class _Loaded(threading.local):
    """This thread's loaded adapter, by the `model:` block's content."""

    def __init__(self) -> None:
        self.adapters: dict[str, Any] = {}


_LOADED = _Loaded()


def model_spec(model_params: dict[str, Any]) -> ModelSpec:
    return ModelSpec.from_params(dict(model_params))


def load_model(model_params: dict[str, Any]) -> Any:
    """The configured adapter on its device (cached per thread by the block's content), progress bars off."""
    key = json.dumps(model_params, sort_keys=True, default=str)
    loaded = _LOADED.adapters
    if key not in loaded:
        spec = model_spec(model_params)
        adapter = load_adapter(spec)
        if hasattr(adapter.pipe, "set_progress_bar_config"):
            adapter.pipe.set_progress_bar_config(disable=True)
        logger.info(
            "loaded %s (%s) on %s (%d torch threads)",
            spec.registered_name, spec.adapter, adapter.device, torch.get_num_threads(),
        )
        loaded.clear()
        loaded[key] = adapter
    return loaded[key]


def model_size(adapter: Any, model_params: dict[str, Any]) -> Size:
    """The size the policies are searched for: the block's, else the adapter's default."""
    return model_spec(model_params).output_size(adapter)


def model_steps(model_params: dict[str, Any]) -> int:
    steps = model_spec(model_params).steps
    if steps is None:
        raise ValueError("model.steps is not set: give the number of sampling steps the policies are searched for")
    return int(steps)


def process_count(value: Any, name: str) -> int:
    """`value` as a torchrun rank count, refused naming the parameter `name` unless a positive integer.

    One check for every node that launches ranks (`search.processes`, `evaluate.processes`);
    a bool is refused although Python counts it as an int.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer (torchrun ranks), got {value!r}")
    return value


def resume_dir(root: str, name: str, identity: dict[str, Any]) -> Path:
    """A scratch folder per (name, model, settings, inputs): an interrupted run resumes in it,
    and a run with other inputs or settings never picks up its batches."""
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return Path(root) / f"{name}-{digest}"
