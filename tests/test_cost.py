"""The cost model: state sizes from configs against the prefix states a real search stores, and predictions."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from budcache_pipeline.cost import (
    CostInputs,
    CostModelError,
    predict,
    recommended_max_state_bytes,
    search_rollouts,
    solver_history_tensors,
    state_size,
    transformer_shape,
)
from budcache_pipeline.known_models import FLUX_1_DEV, WAN21_T2V_1_3B
from budcache_pipeline.models.spec import load_adapter
from budcache_pipeline.search import MaskObjective, SearchConfig, compute_reference, search_policy
from budcache_pipeline.search.prefix_store import state_bytes

STEPS = 6
PROMPTS = ["a red fox", "a blue boat", "a green hill"]


def _searched_states(adapter_name: str, forecast: str) -> tuple[object, list[tuple[int, int, int]]]:
    """A short search on a tiny model; (adapter, [(step, rows, state_bytes)] of every stored prefix state)."""
    adapter = load_adapter({"adapter": adapter_name, "weights": "tiny", "torch_threads": 1})
    size = adapter.tiny_size
    reference = compute_reference(adapter, PROMPTS, [0, 1, 2], STEPS, size, progress=False)
    objective = MaskObjective(adapter, reference, forecast=forecast)
    search_policy(objective, 3, SearchConfig(starts=("uniform",), sa_iterations=4, hc_rounds=1, screen_samples=None))
    states = [state for state, _ in objective.prefix_store._device.values()]
    assert states, "the search stored no prefix states"
    return adapter, [(s.step, s.latents.shape[0], state_bytes(s)) for s in states]


def _shape_of(adapter) -> object:
    size = adapter.tiny_size
    pipe = adapter.pipe
    return transformer_shape(
        {"_class_name": type(adapter.transformer).__name__, **adapter.transformer.config},
        size.height,
        size.width,
        size.num_frames,
        text_tokens=adapter.embedder.shapes["prompt_embeds"][0],
        vae_scale_factor=getattr(pipe, "vae_scale_factor", None) or pipe.vae_scale_factor_spatial,
        vae_temporal_factor=getattr(pipe, "vae_scale_factor_temporal", 4),
    )


@pytest.mark.parametrize(
    ("adapter_name", "forecast"), [("flux", "linear"), ("flux", "reuse"), ("wan", "linear"), ("wan", "reuse")]
)
def test_state_formula_matches_the_prefix_states_a_search_stores(adapter_name, forecast):
    adapter, stored = _searched_states(adapter_name, forecast)
    shape = _shape_of(adapter)
    size = state_size(
        shape,
        dtype=adapter.dtype,
        latent_dtype=adapter.latent_dtype,
        contexts=len(adapter.contexts),
        forecast=forecast,
        solver_tensors=solver_history_tensors(adapter.pipe.scheduler),
    )
    per_sample = [bytes_ // rows for _, rows, bytes_ in stored]
    assert all(bytes_ % rows == 0 for _, rows, bytes_ in stored)
    # Early states lack what later steps add (a slope after two computes, the solver's history after its
    # order's steps): the formula is the size once everything exists, the most any stored state holds.
    assert max(per_sample) == size.state_bytes
    assert all(b <= size.state_bytes for b in per_sample)


def test_tiny_models_exercise_both_stream_layouts_and_a_solver_history():
    flux = _shape_of(load_adapter({"adapter": "flux", "weights": "tiny"}))
    wan_adapter = load_adapter({"adapter": "wan", "weights": "tiny"})
    wan = _shape_of(wan_adapter)
    assert flux.text_tokens_stored > 0 and wan.text_tokens_stored == 0
    assert solver_history_tensors(wan_adapter.pipe.scheduler) == wan_adapter.pipe.scheduler.config.solver_order + 1
    assert len(wan_adapter.contexts) == 2


def test_real_model_sizes_reproduce_the_quoted_figures():
    flux = transformer_shape(FLUX_1_DEV.transformer, 1024, 1024)
    assert (flux.tokens, flux.text_tokens_stored, flux.hidden) == (4096, 512, 3072)
    assert flux.parameters == pytest.approx(11.9e9, rel=1e-3)
    image_mb = flux.tokens * flux.hidden * 2 / 1e6
    text_mb = flux.text_tokens_stored * flux.hidden * 2 / 1e6
    assert round(image_mb) == 25 and round(text_mb) == 3
    linear = state_size(flux, dtype="bfloat16", forecast="linear")
    assert round(linear.residual_bytes / 1e6) == 28 and round(linear.state_bytes / 1e6) == 57

    wan = transformer_shape(WAN21_T2V_1_3B.transformer, 480, 832, 81)
    assert (wan.tokens, wan.hidden, wan.text_tokens_stored) == (32760, 1536, 0)
    reuse = state_size(wan, dtype="bfloat16", latent_dtype="float32", contexts=2, forecast="reuse")
    assert round(reuse.residual_bytes / 1e6, -1) == 100
    assert reuse.contexts * reuse.context_bytes == 2 * reuse.residual_bytes


def _inputs(**changes) -> CostInputs:
    base = CostInputs(
        per_call_seconds=0.2, calls_per_step=1, steps=28, budget=10, calibration_prompts=32, search_rollouts=8.0,
        state_bytes_per_sample=57_000_000, weight_bytes=24_000_000_000, resident_bytes=10_000_000_000,
        activation_bytes_per_sample=400_000_000, max_state_bytes=None,
    )
    return dataclasses.replace(base, **changes)


def test_prediction_scales_with_its_inputs_and_shards_over_gpus():
    one, eight = predict(_inputs(), 1), predict(_inputs(), 8)
    inputs = _inputs()
    assert one.search_gpu_minutes == pytest.approx(
        inputs.search_rollouts * inputs.steps * inputs.calibration_prompts * inputs.per_call_seconds / 60
    )
    assert eight.search_gpu_minutes == pytest.approx(one.search_gpu_minutes)
    assert eight.search_wall_minutes == pytest.approx(one.search_wall_minutes / 8)
    assert eight.search_state_bytes_per_gpu == pytest.approx(one.search_state_bytes_per_gpu / 8)
    guided = predict(_inputs(calls_per_step=2), 1)
    assert guided.reference_gpu_minutes == pytest.approx(2 * one.reference_gpu_minutes)
    assert one.image_seconds_cached / one.image_seconds_uncached == pytest.approx(10 / 28)
    assert eight.reference_gpu_minutes == pytest.approx(one.reference_gpu_minutes)
    # Ranks take whole reference batches: one batch of 32 cannot be shared, eight batches of 4 can.
    assert eight.reference_wall_minutes == pytest.approx(one.reference_wall_minutes)
    small = predict(_inputs(reference_batch=4), 8)
    assert small.reference_wall_minutes == pytest.approx(one.reference_wall_minutes / 8)
    assert small.reference_peak_bytes_per_gpu < eight.reference_peak_bytes_per_gpu
    bounded = predict(_inputs(max_state_bytes=5_000_000_000), 1)
    assert bounded.search_state_bytes_per_gpu == 2 * 5_000_000_000
    assert bounded.search_peak_bytes_per_gpu < one.search_peak_bytes_per_gpu


def test_recommended_bound_fills_the_gpu_or_stores_nothing():
    inputs = _inputs()
    bound = recommended_max_state_bytes(inputs, 1, gpu_bytes=80 * 10**9, margin_bytes=8 * 10**9)
    left = 80e9 - 8e9 - inputs.weight_bytes - inputs.resident_bytes - 32 * inputs.activation_bytes_per_sample
    assert bound == int(left // 2) and bound >= 32 * inputs.state_bytes_per_sample
    peak = predict(dataclasses.replace(inputs, max_state_bytes=bound), 1).search_peak_bytes_per_gpu
    assert peak <= 80e9 - 8e9
    huge = dataclasses.replace(inputs, state_bytes_per_sample=10**9)
    assert recommended_max_state_bytes(huge, 1) == 0


def test_search_rollouts_from_a_summary_cost():
    assert search_rollouts({"block_stack_calls": 56.0, "evaluations": 3}, 28) == 2.0
    with pytest.raises(CostModelError, match="block_stack_calls"):
        search_rollouts({"evaluations": 3}, 28)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"per_call_seconds": -0.1}, "per_call_seconds"),
        ({"search_rollouts": -1.0}, "search_rollouts"),
        ({"state_bytes_per_sample": -5}, "state_bytes_per_sample"),
        ({"max_state_bytes": -1}, "max_state_bytes"),
        ({"calibration_prompts": 0}, "calibration_prompts"),
        ({"steps": -28}, "steps"),
        ({"budget": 29}, "budget 29"),
        ({"per_call_seconds": float("nan")}, "per_call_seconds"),
    ],
)
def test_bad_inputs_name_the_field(changes, field):
    with pytest.raises(CostModelError, match=field):
        _inputs(**changes)


def test_bad_sizes_gpus_and_dtypes_are_refused():
    with pytest.raises(CostModelError, match="gpus"):
        predict(_inputs(), 0)
    with pytest.raises(CostModelError, match="one GPU per row"):
        predict(_inputs(), 64)
    with pytest.raises(CostModelError, match="num_frames"):
        transformer_shape(WAN21_T2V_1_3B.transformer, 480, 832, 80)
    with pytest.raises(CostModelError, match="height"):
        transformer_shape(FLUX_1_DEV.transformer, -1024, 1024)
    with pytest.raises(CostModelError, match="not one of"):
        transformer_shape({"_class_name": "UNet2DModel"}, 64, 64)
    flux = transformer_shape(FLUX_1_DEV.transformer, 1024, 1024)
    with pytest.raises(CostModelError, match="dtype"):
        state_size(flux, dtype=torch.int8)
