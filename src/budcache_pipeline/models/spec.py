"""The `model:` configuration block, and loading an adapter from it.

One block says which adapter, which weights (a local folder, a hub id the user's cache
holds, or `tiny` for a random-weight model built from a config), the dtype, device and
offload, the size and steps the policies are searched for, and the guidance settings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from budcache_pipeline.models.adapter import OFFLOAD_MODES, ModelSpecError, Size, adapter_class, torch_dtype

TINY_WEIGHTS = "tiny"


@dataclass(frozen=True)
class ModelSpec:
    """A model to load; see `conf/base/parameters.yml` for each field's meaning."""

    adapter: str = "digits"
    weights: str | None = None
    name: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    offload: str = "none"
    height: int | None = None
    width: int | None = None
    num_frames: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    negative_prompt: str = ""
    torch_threads: int | None = None

    def __post_init__(self) -> None:
        if self.offload not in OFFLOAD_MODES:
            raise ModelSpecError(f"model.offload {self.offload!r} is not one of {list(OFFLOAD_MODES)}")
        if self.steps is not None and self.steps < 1:
            raise ModelSpecError(f"model.steps must be at least 1, got {self.steps}")

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> ModelSpec:
        """From a parameters dict; an unknown key is an error (a typo would otherwise be ignored)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ModelSpecError(f"unknown model settings {unknown}: the model block takes {sorted(known)}")
        return cls(**params)

    @property
    def registered_name(self) -> str:
        return self.name or self.adapter

    def size(self, default: Size) -> Size:
        """The configured size, with the adapter's defaults for what is not set."""
        return Size(
            self.height or default.height,
            self.width or default.width,
            self.num_frames if self.num_frames is not None else default.num_frames,
        )

    def output_size(self, adapter: Any) -> Size:
        """The size to sample at: the block's, else the adapter's default (its tiny size for `tiny` weights)."""
        return self.size(adapter.tiny_size if self.weights == TINY_WEIGHTS else adapter.default_size)

    def resolve_device(self) -> torch.device:
        """`auto` (or nothing) means the GPU when one is present, else the CPU."""
        if self.device in (None, "auto"):
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ModelSpecError(f"model.device {self.device!r} but no GPU is visible: set model.device to auto or cpu")
        return device

    def resolve_dtype(self) -> torch.dtype:
        return torch_dtype(self.dtype, self.resolve_device())

    def check_weights(self) -> None:
        """A local-looking path that does not exist is a clear error, not a hub lookup."""
        weights = self.weights
        if weights in (None, TINY_WEIGHTS):
            return
        looks_local = weights.startswith((".", "/", "~")) or Path(weights).expanduser().exists()
        if looks_local and not Path(weights).expanduser().is_dir():
            raise ModelSpecError(
                f"model.weights {weights!r} is not a folder: give a diffusers model folder "
                "(with model_index.json) or a hub id that your local cache holds"
            )


def read_model_block(path: str | Path) -> dict[str, Any]:
    """The `model:` block of a YAML file (a parameters file or a deployment's own), for jobs outside Kedro."""
    import yaml

    data = yaml.safe_load(Path(path).read_text())
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise ModelSpecError(f"{path} has no `model:` block: see conf/base/parameters.yml for its fields")
    return data["model"]


def load_adapter(spec: ModelSpec | dict[str, Any]) -> Any:
    """The adapter of `spec`, with its pipeline loaded on the configured device."""
    spec = ModelSpec.from_params(spec) if isinstance(spec, dict) else spec
    spec.check_weights()
    if spec.torch_threads:
        torch.set_num_threads(int(spec.torch_threads))
    return adapter_class(spec.adapter).load(spec)


def place(pipe: Any, spec: ModelSpec) -> Any:
    """Move `pipe` to the spec's device, or set up diffusers' CPU offload on the GPU."""
    device = spec.resolve_device()
    if spec.offload == "none":
        return pipe.to(device)
    if device.type != "cuda":
        raise ModelSpecError(f"model.offload {spec.offload!r} moves weights to a GPU: set model.offload: none on a CPU")
    if spec.offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.enable_sequential_cpu_offload(device=device)
    return pipe


def from_pretrained(pipeline_class: type, spec: ModelSpec) -> Any:
    """`pipeline_class.from_pretrained(weights)` with the spec's dtype; wrong or missing weights say so."""
    dtype = spec.resolve_dtype()
    found = _pipeline_class_name(spec.weights)
    if found is not None and found != pipeline_class.__name__:
        raise ModelSpecError(
            f"model.weights {spec.weights!r} hold a {found}, but model.adapter {spec.adapter!r} loads a "
            f"{pipeline_class.__name__}: set model.adapter to the adapter of that pipeline"
        )
    try:
        pipe = pipeline_class.from_pretrained(
            spec.weights, torch_dtype=dtype, local_files_only=True, **_absent_components(spec.weights)
        )
    except (OSError, ValueError, TypeError) as exc:
        raise ModelSpecError(
            f"could not load {pipeline_class.__name__} from {spec.weights!r} ({type(exc).__name__}: {exc}): "
            f"give the folder or hub id of a {pipeline_class.__name__} checkpoint (model.adapter {spec.adapter!r}); "
            "a hub id is read from your Hugging Face cache only, nothing is downloaded: fetch it once with "
            f"`huggingface-cli download {spec.weights}`"
        ) from exc
    return place(pipe, spec)


def _model_index(weights: str) -> dict[str, Any]:
    index = Path(weights).expanduser() / "model_index.json"
    return json.loads(index.read_text()) if index.is_file() else {}


def _pipeline_class_name(weights: str) -> str | None:
    """The pipeline class a local folder was saved from (None for hub ids, checked by diffusers)."""
    return _model_index(weights).get("_class_name")


def _absent_components(weights: str) -> dict[str, None]:
    """Components a local folder's model_index.json lists as null (saved without text encoders, say)."""
    entries = _model_index(weights)
    return {name: None for name, value in entries.items() if isinstance(value, list) and value[:1] == [None]}
