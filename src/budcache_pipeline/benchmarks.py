"""Benchmarks that print figures: runtime speedup of a policy against no cache on a stock pipeline."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from budcache_pipeline.caching import disable_budcache, enable_budcache
from budcache_pipeline.models.flux import flux_default_sigmas
from budcache_pipeline.policy import CachePolicy, model_fingerprint
from budcache_pipeline.schedules import image_seq_len, scheduler_input_sigmas

BENCH_STEPS = 28
BENCH_BUDGETS = (28, 14, 10, 7, 5)


def bench_flux_pipeline(seed: int = 0) -> Any:
    """A FLUX-architecture pipeline big enough that the block stack dominates a step on CPU.

    8 blocks (2 dual-stream, 6 single-stream), inner dim 128, 256 image tokens at 256x256.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=2,
        num_single_layers=6,
        attention_head_dim=32,
        num_attention_heads=4,
        joint_attention_dim=64,
        pooled_projection_dim=64,
        axes_dims_rope=(8, 12, 12),
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    pipe = FluxPipeline(scheduler, None, None, None, None, None, transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _time_once(run: Callable[[], Any]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def bench_runtime(
    budgets: Sequence[int] = BENCH_BUDGETS,
    steps: int = BENCH_STEPS,
    repeats: int = 5,
    size: int = 256,
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Best-of-`repeats` seconds per image for each budget, against the same pipeline without hooks.

    Configurations are timed round-robin, so background load hits all of them alike.
    """
    pipe = bench_flux_pipeline()
    torch.manual_seed(0)
    prompt_embeds, pooled = torch.randn(1, 32, 64), torch.randn(1, 64)
    sigmas = flux_default_sigmas(pipe, steps, size, size)
    call_sigmas = scheduler_input_sigmas(pipe.scheduler, sigmas, image_seq_len(pipe, size, size))
    fingerprint = model_fingerprint(pipe.transformer)
    policies = {b: CachePolicy.uniform(steps, b, "bench-flux", fingerprint, sigmas) for b in budgets}

    def generate() -> torch.Tensor:
        return pipe(
            prompt_embeds=prompt_embeds,
            pooled_prompt_embeds=pooled,
            num_inference_steps=steps,
            sigmas=call_sigmas,
            height=size,
            width=size,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
        ).images

    def generate_with(budget: int) -> float:
        enable_budcache(pipe, policies[budget])
        try:
            return _time_once(generate)
        finally:
            disable_budcache(pipe)

    best: dict[int | None, float] = {}
    with torch.inference_mode():
        generate()
        for repeat in range(repeats):
            best[None] = min(best.get(None, float("inf")), _time_once(generate))
            for budget in budgets:
                best[budget] = min(best.get(budget, float("inf")), generate_with(budget))
            progress(f"round {repeat + 1}/{repeats}: no cache {best[None]:.3f} s/image (best so far)")
    baseline = best[None]
    rows = [
        {
            "budget": budget,
            "steps": steps,
            "seconds_per_image": best[budget],
            "speedup": baseline / best[budget],
            "ideal_speedup": steps / budget,
            "speedup_over_ideal": baseline / best[budget] / (steps / budget),
        }
        for budget in budgets
    ]
    full = next((r for r in rows if r["budget"] == steps), None)
    return {
        "model": "bench-flux (8 blocks, inner dim 128, 256 image tokens)",
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "no_cache_seconds_per_image": baseline,
        "rows": rows,
        "overhead_full_budget": (full["seconds_per_image"] / baseline - 1.0) if full else None,
    }


def format_runtime_table(result: dict[str, Any]) -> str:
    lines = [
        f"{'budget':>8} {'s/image':>10} {'speedup':>8} {'ideal':>6} {'÷ideal':>7}",
        f"{'none':>8} {result['no_cache_seconds_per_image']:>10.4f} {1.0:>8.2f} {1.0:>6.2f} {1.0:>7.2f}",
    ]
    for row in result["rows"]:
        lines.append(
            f"{row['budget']:>5}/{row['steps']:<2} {row['seconds_per_image']:>10.4f} {row['speedup']:>8.2f} "
            f"{row['ideal_speedup']:>6.2f} {row['speedup_over_ideal']:>7.2f}"
        )
    if result["overhead_full_budget"] is not None:
        lines.append(f"overhead at full budget: {result['overhead_full_budget']:+.2%}")
    return "\n".join(lines)
