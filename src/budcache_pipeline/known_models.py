"""Released models the cost model predicts for, as data: transformer configs, sizes, and quoted figures.

The configs are the `transformer/config.json` files of the diffusers checkpoints, copied here so
`docs/cost.md` can be recomputed without downloading anything. Sources:
- FLUX.1-dev: https://huggingface.co/black-forest-labs/FLUX.1-dev/blob/main/transformer/config.json
- Wan2.1-T2V-1.3B: https://huggingface.co/Wan-AI/Wan2.1-T2V-1.3B-Diffusers/blob/main/transformer/config.json
Per-call times and working memory were measured on an H200 (`budcache bench real-size`, random
weights, bfloat16, batch 1 and 2; the JSON in docs/measurements/); the other figures say their source.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from budcache_pipeline.cost import (
    CostInputs,
    CostPrediction,
    StateSize,
    TransformerShape,
    activation_estimate,
    predict,
    recommended_max_state_bytes,
    solver_history_tensors,
    state_size,
    transformer_shape,
)

FLUX_1_DEV_TRANSFORMER: dict[str, Any] = {
    "_class_name": "FluxTransformer2DModel",
    "attention_head_dim": 128,
    "axes_dims_rope": [16, 56, 56],
    "guidance_embeds": True,
    "in_channels": 64,
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 19,
    "num_single_layers": 38,
    "patch_size": 1,
    "pooled_projection_dim": 768,
}

WAN21_T2V_1_3B_TRANSFORMER: dict[str, Any] = {
    "_class_name": "WanTransformer3DModel",
    "added_kv_proj_dim": None,
    "attention_head_dim": 128,
    "cross_attn_norm": True,
    "eps": 1e-06,
    "ffn_dim": 8960,
    "freq_dim": 256,
    "image_dim": None,
    "in_channels": 16,
    "num_attention_heads": 12,
    "num_layers": 30,
    "out_channels": 16,
    "patch_size": [1, 2, 2],
    "qk_norm": "rms_norm_across_heads",
    "rope_max_seq_len": 1024,
    "text_dim": 4096,
}

WAN21_SCHEDULER: dict[str, Any] = {
    "_class_name": "UniPCMultistepScheduler",
    "prediction_type": "flow_prediction",
    "use_flow_sigmas": True,
    "flow_shift": 3.0,
}
"""The scheduler `WanPipeline` ships for Wan2.1 (solver_order 2, diffusers' default)."""

FLUX_SCHEDULER: dict[str, Any] = {"_class_name": "FlowMatchEulerDiscreteScheduler", "use_dynamic_shifting": True}


@dataclass(frozen=True)
class KnownModel:
    """A released model at the size it is served at, and the figures the cost model needs beyond its config.

    `per_call_seconds` (one transformer call, one sample, bfloat16, Hopper GPU),
    `activation_bytes_per_sample` (a call's peak memory above the weights; None: `cost.activation_estimate`),
    `resident_bytes` (text encoders and VAE kept on the GPU beside the transformer) and
    `search_rollouts` (one budget's search in calibration-rollout equivalents) are measured at real
    size, quoted, or measured on a tiny model, with `sources` saying which.
    """

    name: str
    adapter: str
    transformer: dict[str, Any]
    scheduler: dict[str, Any]
    height: int
    width: int
    num_frames: int | None
    steps: int
    budget: int
    contexts: int
    latent_dtype: str
    per_call_seconds: float
    resident_bytes: int
    search_rollouts: float
    text_tokens: int = 512
    vae_scale_factor: int = 8
    vae_temporal_factor: int = 4
    dtype: str = "bfloat16"
    guidance_scale: float | None = None
    activation_bytes_per_sample: int | None = None
    sources: dict[str, str] = field(default_factory=dict)

    def build_scheduler(self) -> Any:
        import diffusers

        settings = {k: v for k, v in self.scheduler.items() if not k.startswith("_")}
        return getattr(diffusers, self.scheduler["_class_name"])(**settings)

    def shape(self) -> TransformerShape:
        return transformer_shape(
            self.transformer, self.height, self.width, self.num_frames, text_tokens=self.text_tokens,
            vae_scale_factor=self.vae_scale_factor, vae_temporal_factor=self.vae_temporal_factor,
        )

    def state(self, forecast: str = "linear") -> StateSize:
        """One sample's prefix state as the search stores it (the default forecast is linear)."""
        return state_size(
            self.shape(), dtype=self.dtype, latent_dtype=self.latent_dtype, contexts=self.contexts,
            forecast=forecast, solver_tensors=solver_history_tensors(self.build_scheduler()),
        )


def known_inputs(
    model: KnownModel,
    *,
    per_call_seconds: float | None = None,
    calibration_prompts: int = 32,
    forecast: str = "linear",
    reference_batch: int = 4,
) -> CostInputs:
    """The cost model's inputs for `model` (its own per-call time unless a measured one is given).

    `reference_batch` 4 (`reference.batch_size`) gives 8 GPUs a batch each of 32 prompts and keeps a
    batch's working memory small; the project's default of 32 would leave 7 of 8 GPUs idle.
    """
    shape = model.shape()
    item = 2 if model.dtype in ("bfloat16", "float16") else 4
    return CostInputs(
        per_call_seconds=model.per_call_seconds if per_call_seconds is None else per_call_seconds,
        calls_per_step=model.contexts,
        steps=model.steps,
        budget=model.budget,
        calibration_prompts=calibration_prompts,
        search_rollouts=model.search_rollouts,
        state_bytes_per_sample=model.state(forecast).state_bytes,
        weight_bytes=shape.parameters * item,
        resident_bytes=model.resident_bytes,
        activation_bytes_per_sample=model.activation_bytes_per_sample or activation_estimate(shape, model.dtype),
        reference_batch=reference_batch,
    )


def plan(inputs: CostInputs, gpus: int) -> tuple[int, CostPrediction]:
    """The recommended `max_state_bytes` on `gpus` H100-class (80 GB) GPUs and the prediction under it."""
    bound = recommended_max_state_bytes(inputs, gpus)
    return bound, predict(replace(inputs, max_state_bytes=bound), gpus)


FLUX_1_DEV = KnownModel(
    name="FLUX.1-dev 1024x1024, 28 steps",
    adapter="flux",
    transformer=FLUX_1_DEV_TRANSFORMER,
    scheduler=FLUX_SCHEDULER,
    height=1024,
    width=1024,
    num_frames=None,
    steps=28,
    budget=10,
    contexts=1,
    latent_dtype="bfloat16",
    per_call_seconds=0.174,
    activation_bytes_per_sample=490_263_552,
    search_rollouts=8.9,
    resident_bytes=10_200_000_000,
    sources={
        "per_call_seconds": "measured on an H200 (2026-12-04, budcache bench real-size, random weights, bfloat16, "
        "SDPA): median step at batch 1 of three runs 172.9-174.7 ms, 175.0 ms per sample at batch 2 "
        "(docs/measurements/h200-real-size-*.json); the H100's bf16 rate is the same",
        "activation_bytes_per_sample": "measured there: peak above the weights during a call at batch 1 "
        "(484 MB per sample at batch 2; cost.activation_estimate says 340 MB)",
        "search_rollouts": "measured here on tiny FLUX (kedro run --env tiny_flux, default search settings, "
        "32 calibration pairs, budget 10 of 28) with 7 prefix states per store, what the 1-GPU bound holds "
        "(8.4 with 256 states, 9.6 with no store; same mask in every case)",
        "resident_bytes": "quoted from README (parameter counts in bfloat16): T5-XXL encoder about 9.5 GB, "
        "CLIP and the VAE under 1 GB (0.7 GB taken)",
    },
)

WAN21_T2V_1_3B = KnownModel(
    name="Wan2.1-T2V-1.3B 480x832, 81 frames, 50 steps",
    adapter="wan",
    guidance_scale=5.0,
    transformer=WAN21_T2V_1_3B_TRANSFORMER,
    scheduler=WAN21_SCHEDULER,
    height=480,
    width=832,
    num_frames=81,
    steps=50,
    budget=20,
    contexts=2,
    latent_dtype="float32",
    per_call_seconds=0.613,
    activation_bytes_per_sample=1_603_829_760,
    search_rollouts=21.6,
    resident_bytes=11_500_000_000,
    sources={
        "per_call_seconds": "measured on an H200 (2026-12-04, budcache bench real-size, random weights, bfloat16, "
        "SDPA): a guided step (2 calls) 1226.9 ms at batch 1, 613.5 ms per call per sample at batch 2 "
        "(docs/measurements/h200-real-size-unbounded.json)",
        "activation_bytes_per_sample": "measured there: peak above the weights during a call at batch 1 "
        "(cost.activation_estimate says 1.39 GB)",
        "search_rollouts": "measured here on tiny Wan (kedro run --env tiny_wan, default search settings, "
        "32 calibration pairs, budget 20 of 50, UniPC, guidance 5.0) with no prefix store, what fits on one "
        "80 GB GPU (18.9 with 256 states, 20.0 with 15; same mask in every case)",
        "resident_bytes": "quoted from README: UMT5-XXL encoder about 11 GB, the Wan VAE about 0.5 GB",
    },
)

KNOWN_MODELS: dict[str, KnownModel] = {"flux-dev": FLUX_1_DEV, "wan21-1.3b": WAN21_T2V_1_3B}


def cost_table(gpus: tuple[int, ...] = (1, 8), calibration_prompts: int = 32) -> str:
    """The figures of docs/cost.md: state sizes, and reference and search cost per known model and GPU count."""
    from budcache_pipeline.cost import format_bytes

    lines = []
    for model in KNOWN_MODELS.values():
        shape, reuse, linear = model.shape(), model.state("reuse"), model.state("linear")
        inputs = known_inputs(model, calibration_prompts=calibration_prompts)
        lines.append(
            f"{model.name}: {shape.tokens} tokens (+{shape.text_tokens_stored} text stored), hidden {shape.hidden}, "
            f"{shape.parameters / 1e9:.2f}B parameters; residual {format_bytes(reuse.residual_bytes)} per sample and "
            f"context, {model.contexts} context(s); state per sample {format_bytes(reuse.state_bytes)} (reuse), "
            f"{format_bytes(linear.state_bytes)} (linear); activations "
            f"{format_bytes(inputs.activation_bytes_per_sample)} per sample "
            f"({'measured' if model.activation_bytes_per_sample else 'estimate'})"
        )
        for k in gpus:
            bound, p = plan(inputs, k)
            lines.append(
                f"  {k} GPU(s): reference {p.reference_gpu_minutes:.1f} GPU-min, {p.reference_wall_minutes:.2f} min wall, "
                f"{format_bytes(p.reference_peak_bytes_per_gpu)}/GPU; search {p.search_gpu_minutes:.1f} GPU-min, "
                f"{p.search_wall_minutes:.2f} min wall, {format_bytes(p.search_peak_bytes_per_gpu)}/GPU "
                f"(states {format_bytes(p.search_state_bytes_per_gpu)}); max_state_bytes {format_bytes(bound)}; "
                f"one state of {-(-calibration_prompts // k)} rows {format_bytes(-(-calibration_prompts // k) * inputs.state_bytes_per_sample)}"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    print(cost_table())
