"""What every model-running node shares: the run's model handle, and the checks of rank counts and scratch folders.

Nodes take the model as the catalog's `model` entry (`datasets.ModelDataset`, registered by
`hooks.ModelHooks` from the `model:` parameters): a `ModelHandle` that knows the spec at once and
loads the adapter on first use, so a node that hands the model to torchrun ranks never holds the
weights itself. Each thread loads its own adapter once per run: under Kedro's `ThreadRunner` a search
registers cache hooks on the transformer and alignment freezes its parameters, so two budgets side by
side must not share one, while nodes run one after another in a thread reuse it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from budcache_pipeline.models.adapter import ModelSpecError, Size, adapter_class
from budcache_pipeline.models.spec import ModelSpec, load_adapter

logger = logging.getLogger(__name__)

_COUNTS = ("height", "width", "num_frames", "steps", "torch_threads")
"""Model settings that must be positive integers when set."""


def checked_spec(model_params: Any) -> ModelSpec:
    """The `model:` block as a spec a run can use, or an error naming the setting and what it takes.

    Checked before any node runs: a typo or a wrong type would otherwise surface as a
    comparison error halfway through a run, after the reference was computed.
    """
    if not isinstance(model_params, Mapping):
        raise ModelSpecError(
            f"the `model:` parameters must be a block of settings (see conf/base/parameters.yml), "
            f"got {type(model_params).__name__}"
        )
    for name in _COUNTS:
        value = model_params.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ModelSpecError(f"model.{name} must be a positive integer or null, got {value!r}")
    spec = ModelSpec.from_params(dict(model_params))
    if spec.steps is None:
        raise ModelSpecError("model.steps is not set: give the number of sampling steps the policies are searched for")
    adapter_class(spec.adapter)  # an unknown adapter is named now, not at the first load
    return spec


class ModelHandle:
    """The configured model of one run: its spec and size now, its adapter on first use, one per thread.

    `params` is the `model:` block as configured, for jobs handed to torchrun ranks; `adapter`
    loads the pipeline in the calling thread the first time that thread asks. The torch thread
    count (`model.torch_threads`) is set once per handle: by the hook before the run's worker
    threads start (threads that start later inherit it), or at the first load outside Kedro.
    """

    def __init__(self, model_params: Mapping[str, Any]) -> None:
        self.spec = checked_spec(model_params)
        self.params = dict(model_params)
        self._local = threading.local()
        self._threads_lock = threading.Lock()
        self._threads_set = False

    @property
    def steps(self) -> int:
        """The number of sampling steps the policies are searched for."""
        return int(self.spec.steps)

    @property
    def size(self) -> Size:
        """The size the policies are searched for: the block's, else the adapter's default (no load needed)."""
        return self.spec.output_size(adapter_class(self.spec.adapter))

    @property
    def adapter(self) -> Any:
        """This thread's adapter on its device, progress bars off; loaded on the thread's first call."""
        adapter = getattr(self._local, "adapter", None)
        if adapter is None:
            self.set_torch_threads()
            adapter = self._local.adapter = _load(self.spec)
        return adapter

    def set_torch_threads(self) -> None:
        """Apply `model.torch_threads` to the process, the first time only."""
        with self._threads_lock:
            if self._threads_set:
                return
            if self.spec.torch_threads:
                torch.set_num_threads(self.spec.torch_threads)
            self._threads_set = True

    def __repr__(self) -> str:
        return f"ModelHandle({self.spec.registered_name!r}, adapter={self.spec.adapter!r}, steps={self.steps})"


def _load(spec: ModelSpec) -> Any:
    """The spec's adapter; its thread count is the handle's to set, so the loader leaves it alone."""
    adapter = load_adapter(dataclasses.replace(spec, torch_threads=None))
    if hasattr(adapter.pipe, "set_progress_bar_config"):
        adapter.pipe.set_progress_bar_config(disable=True)
    logger.info(
        "loaded %s (%s) on %s in thread %s (%d torch threads)",
        spec.registered_name, spec.adapter, adapter.device, threading.current_thread().name, torch.get_num_threads(),
    )
    return adapter


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
