"""The one interface every stage reaches a model through, and the registry of adapters by name.

Reference generation, search, alignment, evaluation, the bench, the console and the
deployment job know a model only as a `ModelAdapter`: it loads a pipeline from a spec,
encodes prompts once into a `Conditioning` (stored with the reference trajectories, so
the search never runs a text encoder), draws each sample's noise from its seed as the
pipeline would, computes the velocity exactly as the pipeline's denoising loop does
(guidance and cache contexts included), steps with the pipeline's own scheduler, and
decodes. What differs between FLUX, Wan2.1 and SD3 lives in their adapter modules.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from budcache_pipeline.solvers import Solver, make_solver

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
OFFLOAD_MODES = ("none", "model", "sequential")


class ModelSpecError(ValueError):
    """A model configuration that cannot be loaded; the message names the field and the fix."""


@dataclass(frozen=True)
class Size:
    """The output size a pipeline is called with; `num_frames` only for video models."""

    height: int
    width: int
    num_frames: int | None = None

    def __post_init__(self) -> None:
        if self.height < 1 or self.width < 1:
            raise ModelSpecError(f"height and width must be positive, got {self.height}x{self.width}")
        if self.num_frames is not None and self.num_frames < 1:
            raise ModelSpecError(f"num_frames must be positive, got {self.num_frames}")

    def to_dict(self) -> dict[str, int]:
        data = {"height": self.height, "width": self.width}
        if self.num_frames is not None:
            data["num_frames"] = self.num_frames
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Size:
        frames = data.get("num_frames")
        return cls(int(data["height"]), int(data["width"]), None if frames is None else int(frames))


@dataclass(frozen=True)
class Conditioning:
    """A batch's encoded prompts: `rows` have one entry per sample (leading dim), `shared` serve all rows."""

    rows: dict[str, torch.Tensor]
    shared: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        counts = {name: t.shape[0] for name, t in self.rows.items()}
        if len(set(counts.values())) > 1:
            raise ValueError(f"conditioning rows disagree on the batch size: {counts}")

    def __len__(self) -> int:
        return next(iter(self.rows.values())).shape[0] if self.rows else 0

    def select(self, index: slice | Sequence[int] | torch.Tensor) -> Conditioning:
        """The conditioning of some rows (a slice keeps views; indices gather)."""
        if not isinstance(index, slice):
            index = torch.as_tensor(list(index) if not torch.is_tensor(index) else index, dtype=torch.long)
        return Conditioning({k: v[index] for k, v in self.rows.items()}, dict(self.shared))

    def tile(self, copies: int) -> Conditioning:
        """`copies` stacked copies of the batch: rows of copy c are c*B ... c*B+B-1."""
        if copies == 1:
            return self
        return Conditioning(
            {k: v.repeat(copies, *([1] * (v.dim() - 1))) for k, v in self.rows.items()}, dict(self.shared)
        )

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Conditioning:
        """On `device`; floating tensors cast to `dtype` when given."""

        def move(t: torch.Tensor) -> torch.Tensor:
            cast = dtype if dtype is not None and t.is_floating_point() else t.dtype
            return t.to(device=device, dtype=cast)

        return Conditioning({k: move(v) for k, v in self.rows.items()}, {k: move(v) for k, v in self.shared.items()})

    def tensors(self) -> dict[str, torch.Tensor]:
        """Flat name -> tensor form for safetensors files (`rows.*`, `shared.*`)."""
        flat = {f"rows.{k}": v for k, v in self.rows.items()}
        flat.update({f"shared.{k}": v for k, v in self.shared.items()})
        return flat

    @classmethod
    def from_tensors(cls, flat: dict[str, torch.Tensor]) -> Conditioning:
        rows = {k.removeprefix("rows."): v for k, v in flat.items() if k.startswith("rows.")}
        shared = {k.removeprefix("shared."): v for k, v in flat.items() if k.startswith("shared.")}
        return cls(rows, shared)

    @classmethod
    def cat(cls, parts: Sequence[Conditioning]) -> Conditioning:
        """Batches of the same model joined row-wise (shared tensors from the first)."""
        if not parts:
            raise ValueError("nothing to concatenate")
        rows = {k: torch.cat([p.rows[k] for p in parts]) for k in parts[0].rows}
        return cls(rows, dict(parts[0].shared))


@runtime_checkable
class ModelAdapter(Protocol):
    """What every stage knows of a model (see the module docstring)."""

    name: str
    pipe: Any
    contexts: tuple[str, ...]

    @property
    def transformer(self) -> torch.nn.Module: ...

    def default_sigmas(self, steps: int, size: Size) -> list[float]: ...

    def schedule_kwargs(self, sigmas: Sequence[float], size: Size) -> dict[str, Any]: ...

    def solver(self, sigmas: Sequence[float] | torch.Tensor) -> Solver: ...

    def prepare(self, prompts: Sequence[str], seeds: Sequence[int], size: Size) -> tuple[Conditioning, torch.Tensor]: ...

    def velocity(self, conditioning: Conditioning, latents: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor: ...

    def pipeline_inputs(self, conditioning: Conditioning, noise: torch.Tensor, size: Size) -> dict[str, Any]: ...

    def decode(self, latents: torch.Tensor, size: Size) -> torch.Tensor: ...

    def quality_metrics(self, reference: Any, categories: Sequence[Any] | None = None) -> Any: ...


@dataclass
class BoundDenoiser:
    """An adapter bound to a batch's conditioning: (latents, timestep) -> velocity, for rollouts."""

    adapter: Any
    conditioning: Conditioning

    @property
    def transformer(self) -> torch.nn.Module:
        return self.adapter.transformer

    def __len__(self) -> int:
        return len(self.conditioning)

    def velocity(self, latents: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return self.adapter.velocity(self.conditioning, latents, timestep)

    def subset(self, index: slice | Sequence[int] | torch.Tensor) -> BoundDenoiser:
        return BoundDenoiser(self.adapter, self.conditioning.select(index))

    def tile(self, copies: int) -> BoundDenoiser:
        return dataclasses.replace(self, conditioning=self.conditioning.tile(copies))


class PipelineAdapter:
    """What the adapters of diffusers pipelines share: device, dtype, the solver, seeded noise.

    `embedder` replaces the pipeline's text encoders (tiny test models have none): it maps a
    list of prompts to the keyword tensors the pipeline's `encode_prompt` would return.
    """

    name = "pipeline"
    contexts: tuple[str, ...] = ("cond",)

    def __init__(self, pipe: Any, *, embedder: Callable[[list[str]], dict[str, torch.Tensor]] | None = None,
                 guidance_scale: float | None = None, negative_prompt: str = "") -> None:
        if not isinstance(getattr(pipe, "transformer", None), torch.nn.Module):
            raise ModelSpecError(f"{type(pipe).__name__} has no transformer: give a diffusers pipeline")
        self.pipe = pipe
        self.embedder = embedder
        self.guidance_scale = self.default_guidance_scale if guidance_scale is None else float(guidance_scale)
        self.negative_prompt = negative_prompt

    default_guidance_scale = 1.0
    pipeline_class = "DiffusionPipeline"
    """The diffusers pipeline class the adapter loads weights as."""

    @classmethod
    def tiny_pipeline(cls) -> Any:
        """A random-weight pipeline of the adapter's classes, built from a small config."""
        raise ModelSpecError(f"the {cls.name} adapter has no tiny model: give model.weights")

    @classmethod
    def tiny_text_shapes(cls) -> dict[str, tuple[int, ...]]:
        """The prompt tensors the tiny pipeline is given instead of a text encoder's."""
        raise ModelSpecError(f"the {cls.name} adapter has no tiny model: give model.weights")

    @classmethod
    def load(cls, spec: Any) -> PipelineAdapter:
        """The adapter over `spec.weights` (a folder, a cached hub id, or `tiny`), placed as the spec says."""
        import diffusers

        from budcache_pipeline.models.spec import TINY_WEIGHTS, from_pretrained, place
        from budcache_pipeline.models.tiny import HashEmbedder

        settings = {"guidance_scale": spec.guidance_scale, "negative_prompt": spec.negative_prompt}
        if spec.weights == TINY_WEIGHTS:
            spec.resolve_dtype()
            embedder = HashEmbedder(cls.tiny_text_shapes(), negative_prompt=spec.negative_prompt)
            return cls(place(cls.tiny_pipeline(), spec), embedder=embedder, **settings)
        if spec.weights is None:
            raise ModelSpecError(
                f"model.weights is required for the {cls.name} adapter: a {cls.pipeline_class} folder or hub id"
            )
        return cls(from_pretrained(getattr(diffusers, cls.pipeline_class), spec), **settings)

    @property
    def transformer(self) -> torch.nn.Module:
        return self.pipe.transformer

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    @property
    def latent_dtype(self) -> torch.dtype:
        """The dtype the pipeline keeps latents in between steps."""
        return self.dtype

    @property
    def calls_per_step(self) -> int:
        """Transformer calls a compute step costs (a guided Wan step calls it twice)."""
        return len(self.contexts)

    def solver(self, sigmas: Sequence[float] | torch.Tensor) -> Solver:
        return make_solver(self.pipe.scheduler, sigmas, device=self.device)

    def settings(self) -> dict[str, Any]:
        """What, besides the weights, changes the trajectories (stored in the reference's manifest)."""
        return {"adapter": self.name, "guidance_scale": self.guidance_scale, "negative_prompt": self.negative_prompt}

    def seeded_noise(self, seeds: Sequence[int], draw: Callable[[torch.Generator], torch.Tensor]) -> torch.Tensor:
        """Each sample's noise from its own CPU generator, as the pipeline draws it for one image."""
        return torch.cat([draw(torch.Generator(device="cpu").manual_seed(int(seed))) for seed in seeds])

    def check_batch(self, prompts: Sequence[str], seeds: Sequence[int]) -> None:
        if len(prompts) != len(seeds):
            raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds: pass one seed per prompt")
        if not prompts:
            raise ValueError("the batch is empty: pass at least one prompt")

    def quality_metrics(self, reference: Any, categories: Sequence[Any] | None = None) -> Any:
        """Image metrics for evaluation: PSNR/SSIM of decoded outputs (none without a decoder).

        Adapters with a quality plug-in (a judge, FID features) add to this; `categories`
        are the prompts' categories in reference order.
        """
        from budcache_pipeline.evaluation import QualityMetrics

        if getattr(self.pipe, "vae", True) is None:
            return QualityMetrics()
        size = reference.size
        return QualityMetrics(decode=lambda latents: self.decode(latents.to(self.device), size).cpu())

    def encode(self, prompts: list[str], encode_prompt: Callable[[list[str]], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The pipeline's prompt tensors, from `embedder` when one replaces the text encoders."""
        if self.embedder is None and all(
            getattr(self.pipe, name, None) is None for name in ("text_encoder", "text_encoder_2", "text_encoder_3")
        ):
            raise ModelSpecError(
                f"{type(self.pipe).__name__} has no text encoder: load weights that include them "
                "(or give the adapter an embedder that returns the prompt tensors)"
            )
        with torch.no_grad():
            return self.embedder(prompts) if self.embedder is not None else encode_prompt(prompts)


ADAPTERS: dict[str, type] = {}


def register_adapter(name: str) -> Callable[[type], type]:
    """Class decorator: make an adapter loadable by name from a `model:` config block."""

    def register(cls: type) -> type:
        cls.name = name
        ADAPTERS[name] = cls
        return cls

    return register


def adapter_class(name: str) -> type:
    """The adapter registered under `name` (imports the built-in ones on first use)."""
    import budcache_pipeline.models.builtin  # noqa: F401  (registers digits, flux, wan, sd3)

    if name not in ADAPTERS:
        raise ModelSpecError(f"unknown model adapter {name!r}: choose one of {sorted(ADAPTERS)}")
    return ADAPTERS[name]


def torch_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` is bfloat16 on a GPU and float32 on a CPU; half precision on a CPU is refused."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ModelSpecError(f"model.dtype {name!r} is not one of {['auto', *_DTYPES]}")
    dtype = _DTYPES[name]
    if device.type == "cpu" and dtype != torch.float32:
        raise ModelSpecError(
            f"model.dtype {name} on a CPU runs slowly or not at all: set model.dtype to float32 (or auto) on a CPU"
        )
    return dtype
