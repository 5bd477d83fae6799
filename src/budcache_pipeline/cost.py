"""A cost model of the reference and of one budget's search: GPU time and memory on K GPUs.

A search at real-model size is planned before it is run: how many GPU-minutes the teacher
trajectories and one budget's search take, and whether the prefix states fit. Time comes from a
measured (or stated) per-call time of the transformer for one sample, times the calls the search
counts (`cost.block_stack_calls` of a search summary, in full-calibration-batch units). Memory
comes from the model's weights and from the size of one prefix state, computed from the
transformer's config exactly as the cache hooks and `search.prefix_store.state_bytes` hold
them. Neglected: cached steps (embedders and `proj_out` only), the all-reduce of a sharded
search (one float64 sum per batch of candidates), prefix-state copies and text encoding.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
FORECASTS = ("reuse", "linear")
_CLASSES = ("FluxTransformer2DModel", "WanTransformer3DModel")


class CostModelError(ValueError):
    """An input the cost model cannot use; the message names it."""


def _dtype_bytes(dtype: str | torch.dtype) -> int:
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPE_BYTES:
        raise CostModelError(f"dtype {dtype!r} is not one of {sorted(DTYPE_BYTES)}")
    return DTYPE_BYTES[name]


def _check_non_negative(**values: float | int | None) -> None:
    for name, value in values.items():
        if value is not None and (not math.isfinite(value) or value < 0):
            raise CostModelError(f"{name} must be a finite number >= 0, got {value}")


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CostModelError(f"{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class TransformerShape:
    """What decides a transformer's memory at one output size, per sample.

    `text_tokens_stored` counts the text tokens whose residual the cache stores: FLUX's blocks
    return the text stream too, Wan2.1's only the video stream (cross-attention reads the text).
    """

    class_name: str
    parameters: int
    hidden: int
    ffn_hidden: int
    tokens: int
    text_tokens_stored: int
    latent_elements: int


def build_on_meta(config: dict[str, Any]) -> torch.nn.Module:
    """The diffusers transformer of `config` (its `_class_name`) on the meta device: shapes, no memory."""
    import diffusers

    name = config.get("_class_name")
    if name not in _CLASSES:
        raise CostModelError(f"transformer class {name!r} is not one of {list(_CLASSES)}: give `_class_name`")
    settings = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.device("meta"):
        return getattr(diffusers, name)(**settings)


def _stores_text_stream(transformer: torch.nn.Module) -> bool:
    """Whether the hooks store a text residual: the head and tail blocks both pass the text stream on."""
    from diffusers.hooks._helpers import TransformerBlockRegistry

    from budcache_pipeline.caching.budcache import transformer_blocks

    blocks = transformer_blocks(transformer)
    ends = (blocks[0][1], blocks[-1][1])
    return all(TransformerBlockRegistry.get(type(b)).return_encoder_hidden_states_index is not None for b in ends)


def transformer_shape(
    config: dict[str, Any],
    height: int,
    width: int,
    num_frames: int | None = None,
    *,
    text_tokens: int = 512,
    vae_scale_factor: int = 8,
    vae_temporal_factor: int = 4,
) -> TransformerShape:
    """Tokens, widths and parameters of a FluxTransformer2DModel or WanTransformer3DModel config at a size.

    The latent sizes follow the pipelines: FLUX packs 2x2 latent patches (`FluxPipeline`), Wan2.1 has
    (frames - 1) / temporal + 1 latent frames and patches them by `patch_size`. `text_tokens` is the
    text encoder's sequence length (512 for FLUX.1-dev's T5 and Wan2.1's UMT5).
    """
    _check_positive(height=height, width=width, text_tokens=text_tokens, vae_scale_factor=vae_scale_factor,
                    vae_temporal_factor=vae_temporal_factor)
    transformer = build_on_meta(config)
    cfg = transformer.config
    hidden = int(cfg.num_attention_heads * cfg.attention_head_dim)
    ffn = int(cfg.get("ffn_dim") or 4 * hidden)  # FLUX's blocks use mlp_ratio 4
    lh, lw = height // vae_scale_factor, width // vae_scale_factor
    if type(transformer).__name__ == "WanTransformer3DModel":
        if num_frames is None or num_frames < 1 or (num_frames - 1) % vae_temporal_factor:
            raise CostModelError(f"a video model needs num_frames of the form {vae_temporal_factor}k + 1, got {num_frames}")
        frames = (num_frames - 1) // vae_temporal_factor + 1
        pt, ph, pw = cfg.patch_size
        tokens = (frames // pt) * (lh // ph) * (lw // pw)
        latent = cfg.in_channels * frames * lh * lw
    else:
        if num_frames is not None:
            raise CostModelError(f"{type(transformer).__name__} makes images: num_frames must be None, got {num_frames}")
        tokens = (lh // 2) * (lw // 2)
        latent = tokens * cfg.in_channels
    if tokens < 1:
        raise CostModelError(f"{height}x{width} is too small for this model: it gives no tokens")
    return TransformerShape(
        class_name=type(transformer).__name__,
        parameters=sum(p.numel() for p in transformer.parameters()),
        hidden=hidden,
        ffn_hidden=ffn,
        tokens=tokens,
        text_tokens_stored=text_tokens if _stores_text_stream(transformer) else 0,
        latent_elements=latent,
    )


def solver_history_tensors(scheduler: Any) -> int:
    """Latent-sized tensors a scheduler carries between steps (saved in every prefix state).

    FLUX's Euler step is closed-form (none); a multistep solver keeps its `model_outputs` (UniPC:
    `solver_order` of them) and the previous sample for its corrector.
    """
    from budcache_pipeline.solvers import _is_plain_euler

    if _is_plain_euler(scheduler):
        return 0
    outputs = getattr(scheduler, "model_outputs", None) or []
    return len(outputs) + int(hasattr(scheduler, "last_sample"))


@dataclass(frozen=True)
class StateSize:
    """Bytes of one sample's prefix state and its parts (`state_bytes` = latents + contexts + solver)."""

    residual_bytes: int
    context_bytes: int
    contexts: int
    latent_bytes: int
    solver_bytes: int
    state_bytes: int


def state_size(
    shape: TransformerShape,
    *,
    dtype: str | torch.dtype = "bfloat16",
    latent_dtype: str | torch.dtype | None = None,
    contexts: int = 1,
    forecast: str = "linear",
    solver_tensors: int = 0,
) -> StateSize:
    """One sample's prefix state once every stored tensor exists, as `prefix_store.state_bytes` counts it.

    Per cache context: one residual per stored stream (image/video, and FLUX's text) in the model
    dtype; a linear forecast adds the slopes (as large) and one sigma per row. Latents are in
    `latent_dtype` (the model dtype for FLUX, float32 for Wan2.1), as is the solver's history.
    """
    if forecast not in FORECASTS:
        raise CostModelError(f"forecast {forecast!r} is not one of {list(FORECASTS)}")
    _check_positive(contexts=contexts)
    _check_non_negative(solver_tensors=solver_tensors)
    item = _dtype_bytes(dtype)
    latent_item = _dtype_bytes(latent_dtype if latent_dtype is not None else dtype)
    residual = (shape.tokens + shape.text_tokens_stored) * shape.hidden * item
    context = residual if forecast == "reuse" else 2 * residual + item
    latents = shape.latent_elements * latent_item
    solver = solver_tensors * latents
    return StateSize(residual, context, contexts, latents, solver, latents + contexts * context + solver)


def activation_estimate(shape: TransformerShape, dtype: str | torch.dtype = "bfloat16") -> int:
    """A rough bound on one call's working memory per sample: one block's transient tensors.

    (tokens + text tokens) x (8 x hidden + FFN width) elements: block input and output, norm output,
    q, k, v, attention output and the FFN's intermediate. An estimate, not a measurement:
    `budcache bench gpu` measures the real peak.
    """
    tokens = shape.tokens + shape.text_tokens_stored
    return tokens * (8 * shape.hidden + shape.ffn_hidden) * _dtype_bytes(dtype)


def search_rollouts(cost: dict[str, Any], steps: int) -> float:
    """A search summary's `cost` in uncached calibration-rollout equivalents: block-stack calls / steps.

    `block_stack_calls` counts compute steps run over the whole calibration batch (screening
    subsets weighted by their share of rows, the starts' rollouts included).
    """
    _check_positive(steps=steps)
    if "block_stack_calls" not in cost:
        raise CostModelError("the search cost has no `block_stack_calls`: give a search summary's `cost` dict")
    calls = float(cost["block_stack_calls"])
    _check_non_negative(block_stack_calls=calls)
    return calls / steps


@dataclass(frozen=True)
class CostInputs:
    """Everything a prediction is computed from; see docs/cost.md for each value's source."""

    per_call_seconds: float
    calls_per_step: int
    steps: int
    budget: int
    calibration_prompts: int
    search_rollouts: float
    state_bytes_per_sample: int
    weight_bytes: int
    resident_bytes: int = 0
    activation_bytes_per_sample: int = 0
    reference_prompts: int | None = None
    reference_batch: int = 32
    max_cached_states: int = 256
    max_state_bytes: int | None = None
    prefix_stores: int = 2

    def __post_init__(self) -> None:
        _check_non_negative(
            per_call_seconds=self.per_call_seconds, search_rollouts=self.search_rollouts,
            state_bytes_per_sample=self.state_bytes_per_sample, weight_bytes=self.weight_bytes,
            resident_bytes=self.resident_bytes, activation_bytes_per_sample=self.activation_bytes_per_sample,
            max_cached_states=self.max_cached_states, max_state_bytes=self.max_state_bytes,
        )
        _check_positive(calls_per_step=self.calls_per_step, steps=self.steps, budget=self.budget,
                        calibration_prompts=self.calibration_prompts, reference_batch=self.reference_batch,
                        prefix_stores=self.prefix_stores)
        if self.reference_prompts is not None:
            _check_positive(reference_prompts=self.reference_prompts)
        if self.budget > self.steps:
            raise CostModelError(f"budget {self.budget} exceeds the {self.steps} steps")


@dataclass(frozen=True)
class CostPrediction:
    """GPU-minutes (summed over GPUs), wall minutes and peak bytes per GPU, on `gpus` GPUs."""

    gpus: int
    image_seconds_uncached: float
    image_seconds_cached: float
    reference_gpu_minutes: float
    reference_wall_minutes: float
    reference_peak_bytes_per_gpu: int
    search_gpu_minutes: float
    search_wall_minutes: float
    search_state_bytes_per_gpu: int
    search_peak_bytes_per_gpu: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def predict(inputs: CostInputs, gpus: int = 1) -> CostPrediction:
    """The reference's and one budget's search's cost on `gpus` GPUs (rows sharded, all-reduce neglected).

    Time: every transformer call costs `per_call_seconds` per sample (linear in rows: a big model's
    call is compute-bound). The reference runs `steps x calls_per_step` calls per prompt; the search
    `search_rollouts x steps x calls_per_step` calls per calibration prompt. GPU-minutes do not
    depend on K; the search's wall time divides by K (rows sharded), the reference's by as many
    GPUs as it has batches of `reference_batch` (ranks take whole batches). Memory per GPU: weights
    and resident components, plus the working memory of the rows in one forward (a reference batch;
    the search's P/K calibration rows, one candidate per forward), plus, for the search, the prefix states: each of
    `prefix_stores` stores (the objective and its screening subset) holds up to `max_cached_states`
    states of P/K rows, at most `max_state_bytes`.
    """
    _check_positive(gpus=gpus)
    if gpus > inputs.calibration_prompts:
        raise CostModelError(f"{gpus} GPUs for {inputs.calibration_prompts} calibration rows: use at most one GPU per row")
    call = inputs.per_call_seconds * inputs.calls_per_step
    reference_prompts = inputs.reference_prompts or inputs.calibration_prompts
    reference_seconds = reference_prompts * inputs.steps * call
    search_seconds = inputs.search_rollouts * inputs.steps * inputs.calibration_prompts * call
    rows = math.ceil(inputs.calibration_prompts / gpus)
    reference_rows = min(inputs.reference_batch, reference_prompts)
    batches = math.ceil(reference_prompts / reference_rows)
    reference_wall = math.ceil(batches / gpus) * reference_rows * inputs.steps * call
    fixed = inputs.weight_bytes + inputs.resident_bytes
    per_store = inputs.max_cached_states * rows * inputs.state_bytes_per_sample
    if inputs.max_state_bytes is not None:
        per_store = min(per_store, inputs.max_state_bytes)
    states = inputs.prefix_stores * per_store
    return CostPrediction(
        gpus=gpus,
        image_seconds_uncached=inputs.steps * call,
        image_seconds_cached=inputs.budget * call,
        reference_gpu_minutes=reference_seconds / 60,
        reference_wall_minutes=min(reference_wall, reference_seconds) / 60,
        reference_peak_bytes_per_gpu=fixed + reference_rows * inputs.activation_bytes_per_sample,
        search_gpu_minutes=search_seconds / 60,
        search_wall_minutes=search_seconds / 60 / gpus,
        search_state_bytes_per_gpu=states,
        search_peak_bytes_per_gpu=fixed + rows * inputs.activation_bytes_per_sample + states,
    )


def recommended_max_state_bytes(
    inputs: CostInputs, gpus: int, gpu_bytes: int = 80 * 10**9, margin_bytes: int = 8 * 10**9
) -> int:
    """`search.max_state_bytes` for one store: what a GPU has left after weights, resident components,
    one forward's working memory and a margin (allocator, CUDA context), shared by the prefix stores.

    0 (no prefix store) when not even one state of P/K rows fits: a smaller bound than one state stores nothing.
    """
    _check_positive(gpus=gpus)
    _check_non_negative(gpu_bytes=gpu_bytes, margin_bytes=margin_bytes)
    rows = math.ceil(inputs.calibration_prompts / gpus)
    free = gpu_bytes - margin_bytes - inputs.weight_bytes - inputs.resident_bytes
    free -= rows * inputs.activation_bytes_per_sample
    bound = max(0, free) // inputs.prefix_stores
    return int(bound) if bound >= rows * inputs.state_bytes_per_sample else 0


def format_bytes(value: float) -> str:
    """Decimal units (MB, GB), as the design notes quote sizes."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{int(value)} B"
