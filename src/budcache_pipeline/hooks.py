"""Kedro hooks: the run's model as the catalog entry `model`, built from the `model:` parameters.

The catalog cannot read parameters, and the model block must follow the environment
(`conf/tiny_flux`) and `--params model.steps=...` like any parameter, so the entry is made here
from the parameters the context resolved. Every node that computes with the model takes it as
the input `model`, which `kedro viz` shows as the data flow it is.
"""

from __future__ import annotations

from typing import Any

from kedro.framework.hooks import hook_impl
from kedro.io import CatalogProtocol
from kedro.pipeline import Pipeline

MODEL = "model"
"""The catalog name nodes take the model by."""


class ModelHooks:
    """Registers `model` in every catalog, and sets the torch thread count once before a run that uses it."""

    @hook_impl
    def after_catalog_created(self, catalog: CatalogProtocol, parameters: dict[str, Any]) -> None:
        """A bad model block stops here, before any node runs, with the setting and the fix."""
        # Imported here: Kedro imports the settings (so this module) for every command, torch is slow to import.
        from budcache_pipeline.datasets import ModelDataset
        from budcache_pipeline.models.adapter import ModelSpecError

        if "params:model" not in parameters:
            raise ModelSpecError("the parameters have no `model:` block: see conf/base/parameters.yml for its fields")
        catalog[MODEL] = ModelDataset(model=parameters["params:model"])

    @hook_impl
    def before_pipeline_run(self, pipeline: Pipeline, catalog: CatalogProtocol) -> None:
        """Before the runner starts its worker threads, so every thread computes with `model.torch_threads`."""
        if MODEL in pipeline.inputs():
            catalog[MODEL].load().set_torch_threads()
