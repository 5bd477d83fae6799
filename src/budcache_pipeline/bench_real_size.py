"""`budcache bench real-size`: a released model's cost at its served size, measured with random weights.

Speed, memory and state sizes depend on a transformer's shapes, not on its weights, so this
builds the transformer of a known model (FLUX.1-dev, Wan2.1-1.3B: `known_models`) from its
config with seeded random weights, on the GPU, without downloading anything, and measures per
call and per sample what the cost model (`cost.py`, `docs/cost.md`) otherwise assumes:
seconds per transformer call at batch 1 and at the calibration batch, activation memory, one
prefix state's bytes (against the cost model's formula), and, for models named in `search`,
a short search of one budget on a few calibration prompts (its wall time against
rollouts x steps x per-call time, its peak state bytes under the bound) and the denoising
loop's speedup under the searched mask. Text encoders and the VAE are not built: prompts get
seeded embeddings of the real shapes (`HashEmbedder`), and timings are of the denoising loop.
Quality figures are meaningless with random weights and none are reported.
"""

from __future__ import annotations

import gc
import inspect
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from budcache_pipeline.call_timer import synchronize
from budcache_pipeline.cost import activation_estimate
from budcache_pipeline.known_models import KnownModel


class RealSizeError(ValueError):
    """The measurement cannot run as asked; the message says what to change."""


@dataclass(frozen=True)
class SearchProbe:
    """The short search measured per model: few prompts and iterations, so it fits a short GPU lease.

    The cost in calibration rollouts is what `known_models` quotes for the full default search;
    this probe measures what one such rollout costs in seconds and bytes at real size.
    """

    prompts: int = 2
    budget: int = 10
    starts: tuple[str, ...] = ("uniform",)
    sa_iterations: int = 16
    hc_rounds: int = 0
    dp_samples: int = 1
    max_state_bytes: int | None = None


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def run_real_size(
    names: Sequence[str],
    search: Sequence[str] = (),
    *,
    probe: SearchProbe = SearchProbe(),
    device: str = "cuda",
    progress: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """`measure_model` for each known model in `names`, with the search probe for those in `search`."""
    from budcache_pipeline.known_models import KNOWN_MODELS

    unknown = sorted(set(names) - set(KNOWN_MODELS)) + sorted(set(search) - set(names))
    if unknown:
        raise RealSizeError(f"unknown or unlisted model(s) {unknown}: choose from {sorted(KNOWN_MODELS)} "
                            "(a --search model must also be a --model)")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RealSizeError("no CUDA device here: real-size models need a GPU (the tests run tiny configs on CPU)")
    return [measure_model(KNOWN_MODELS[n], device, probe=probe if n in search else None, progress=progress)
            for n in names]


def random_transformer(config: dict[str, Any], device: torch.device, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """The diffusers transformer of `config` with its default initialisation, seeded, built on `device` in `dtype`."""
    import diffusers

    settings = {k: v for k, v in config.items() if not k.startswith("_")}
    cls = getattr(diffusers, config["_class_name"])
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), _default_dtype(dtype), device:
        torch.manual_seed(seed)
        return cls(**settings).to(device=device, dtype=dtype).eval()


def _text_shapes(model: KnownModel, names: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """The prompt tensors of the real text encoders: (text tokens, the transformer's text width), pooled width."""
    config = model.transformer
    width = config.get("joint_attention_dim") or config.get("text_dim")
    shapes: dict[str, tuple[int, ...]] = {}
    for name in names:
        base = name.removeprefix("negative_")
        shapes[name] = (config["pooled_projection_dim"],) if base == "pooled_prompt_embeds" else (model.text_tokens, width)
    return shapes


def random_weight_adapter(model: KnownModel, device: torch.device | str, seed: int = 0) -> Any:
    """The model's adapter over its stock pipeline with a random-weight transformer and no text encoder or VAE."""
    import diffusers

    from budcache_pipeline.models.adapter import adapter_class, torch_dtype
    from budcache_pipeline.models.tiny import HashEmbedder

    device = torch.device(device)
    adapter_cls = adapter_class(model.adapter)
    transformer = random_transformer(model.transformer, device, torch_dtype(model.dtype, device), seed)
    pipeline_cls = getattr(diffusers, adapter_cls.pipeline_class)
    required = [
        name for name, p in inspect.signature(pipeline_cls.__init__).parameters.items()
        if name != "self" and p.default is inspect.Parameter.empty
    ]
    components = {name: None for name in required}
    pipe = pipeline_cls(**{**components, "transformer": transformer, "scheduler": model.build_scheduler()})
    embedder = HashEmbedder(_text_shapes(model, list(adapter_cls.tiny_text_shapes())))
    return adapter_cls(pipe, embedder=embedder, guidance_scale=model.guidance_scale)


def _memory_now(device: torch.device) -> int | None:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def time_steps(adapter: Any, size: Any, batch: int, repeats: int) -> dict[str, Any]:
    """Median seconds of one sampling step's transformer work (every context) at `batch`, after a warm-up,
    and the peak memory above the weights while it runs."""
    device = adapter.device
    conditioning, noise = adapter.prepare([f"prompt {k}" for k in range(batch)], list(range(batch)), size)
    latents = noise.to(adapter.latent_dtype)
    solver = adapter.solver(adapter.default_sigmas(2, size))
    timestep = solver.timestep(0)
    seconds = []
    with torch.inference_mode():
        adapter.velocity(conditioning, latents, timestep)
        synchronize(device)
        base = _memory_now(device)
        _reset_peak(device)
        for _ in range(repeats):
            started = time.perf_counter()
            adapter.velocity(conditioning, latents, timestep)
            synchronize(device)
            seconds.append(time.perf_counter() - started)
    peak = _peak(device)
    step = sorted(seconds)[len(seconds) // 2]
    return {
        "batch": batch,
        "step_seconds": step,
        "per_call_seconds_per_sample": step / adapter.calls_per_step / batch,
        "activation_bytes_per_sample": (peak - base) / batch if peak is not None and base is not None else None,
    }


def measure_state(adapter: Any, size: Any, steps: int, forecast: str = "linear") -> int:
    """Bytes of one sample's prefix state after three computed steps (a linear forecast holds two residuals)."""
    from budcache_pipeline.sampling import rollout
    from budcache_pipeline.models.adapter import BoundDenoiser
    from budcache_pipeline.search.objective import budcache_session
    from budcache_pipeline.search.prefix_store import state_bytes

    sigmas = adapter.default_sigmas(steps, size)
    conditioning, noise = adapter.prepare(["state probe"], [0], size)
    mask = [k < 3 for k in range(steps)]
    with torch.inference_mode(), budcache_session(adapter.transformer, sigmas, forecast) as runtime:
        result = rollout(BoundDenoiser(adapter, conditioning), runtime, noise.to(adapter.latent_dtype),
                         adapter.solver(sigmas), mask=mask, capture=[3])
    return state_bytes(result.states[3])


def time_loop(adapter: Any, size: Any, steps: int, mask: Sequence[bool] | None, forecast: str = "linear") -> float:
    """Seconds of one batch-1 denoising loop, uncached (`mask` None) or under BudCache with `mask`."""
    from budcache_pipeline.sampling import rollout
    from budcache_pipeline.models.adapter import BoundDenoiser
    from budcache_pipeline.search.objective import budcache_session

    sigmas = adapter.default_sigmas(steps, size)
    conditioning, noise = adapter.prepare(["loop probe"], [1], size)
    denoiser, latents, solver = BoundDenoiser(adapter, conditioning), noise.to(adapter.latent_dtype), adapter.solver(sigmas)
    synchronize(adapter.device)
    started = time.perf_counter()
    with torch.inference_mode():
        if mask is None:
            rollout(denoiser, None, latents, solver)
        else:
            with budcache_session(adapter.transformer, sigmas, forecast) as runtime:
                rollout(denoiser, runtime, latents, solver, mask=mask)
    synchronize(adapter.device)
    return time.perf_counter() - started


def probe_search(adapter: Any, model: KnownModel, probe: SearchProbe, size: Any) -> dict[str, Any]:
    """Reference of `probe.prompts` pairs, then a short search of one budget: seconds, rollouts, state and GPU bytes."""
    from budcache_pipeline.search.config import SearchConfig
    from budcache_pipeline.search.engine import search_policy
    from budcache_pipeline.search.objective import MaskObjective
    from budcache_pipeline.search.reference import compute_reference

    device = adapter.device
    prompts = [f"calibration prompt {k}" for k in range(probe.prompts)]
    synchronize(device)
    started = time.perf_counter()
    reference = compute_reference(adapter, prompts, list(range(probe.prompts)), model.steps, size,
                                  batch_size=probe.prompts, progress=False)
    synchronize(device)
    reference_seconds = time.perf_counter() - started
    _reset_peak(device)
    objective = MaskObjective(adapter, reference, forecast="linear", max_state_bytes=probe.max_state_bytes)
    started = time.perf_counter()
    config = SearchConfig(starts=probe.starts, dp_samples=probe.dp_samples, sa_iterations=probe.sa_iterations,
                          hc_rounds=probe.hc_rounds)
    result = search_policy(objective, probe.budget, config)
    synchronize(device)
    seconds = time.perf_counter() - started
    rollouts = float(result.cost["calibration_rollouts"])
    return {
        "prompts": probe.prompts,
        "budget": probe.budget,
        "mask": list(result.mask),
        "reference_seconds": reference_seconds,
        "search_seconds": seconds,
        "calibration_rollouts": rollouts,
        "seconds_per_rollout": seconds / rollouts if rollouts else None,
        "peak_state_bytes": int(objective.stats.get("peak_state_bytes", 0)),
        "max_state_bytes": probe.max_state_bytes,
        "peak_gpu_bytes": _peak(device),
    }


def measure_model(
    model: KnownModel,
    device: torch.device | str,
    *,
    probe: SearchProbe | None = None,
    repeats: int = 5,
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Every figure of the module doc for one model; `probe` None skips the search and the loop timing."""
    from budcache_pipeline.models.adapter import Size

    device = torch.device(device)
    size = Size(model.height, model.width, model.num_frames)
    progress(f"{model.name}: building the transformer with random weights on {device} ...")
    _reset_peak(device)
    started = time.perf_counter()
    adapter = random_weight_adapter(model, device)
    out: dict[str, Any] = {"model": model.name, "device": str(device), "build_seconds": time.perf_counter() - started,
                           "weight_bytes": _memory_now(device), "calls_per_step": adapter.calls_per_step}
    batch = probe.prompts if probe else 2
    progress(f"{model.name}: timing steps at batch 1 and {batch} ...")
    out["batch_1"] = time_steps(adapter, size, 1, repeats)
    out[f"batch_{batch}"] = time_steps(adapter, size, batch, repeats)
    out["per_call_seconds"] = out["batch_1"]["per_call_seconds_per_sample"]
    out["activation_estimate_bytes"] = activation_estimate(model.shape(), model.dtype)
    out["state_bytes"] = measure_state(adapter, size, model.steps)
    out["state_bytes_formula"] = model.state("linear").state_bytes
    if probe is not None:
        progress(f"{model.name}: reference of {probe.prompts} prompts and a short search of budget {probe.budget} ...")
        search = probe_search(adapter, model, probe, size)
        per_row_call = out[f"batch_{batch}"]["per_call_seconds_per_sample"]
        search["predicted_seconds_per_rollout"] = model.steps * adapter.calls_per_step * probe.prompts * per_row_call
        out["search"] = search
        progress(f"{model.name}: timing the denoising loop uncached and under the searched mask ...")
        uncached = time_loop(adapter, size, model.steps, None)
        cached = time_loop(adapter, size, model.steps, search["mask"])
        out["loop"] = {"uncached_seconds": uncached, "cached_seconds": cached, "speedup": uncached / cached,
                       "ideal": model.steps / probe.budget}
    del adapter
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def format_real_size(results: Sequence[dict[str, Any]]) -> str:
    """The figures as `budcache bench real-size` prints them, one block per model."""
    from budcache_pipeline.cost import format_bytes

    def size(value: float | None) -> str:
        return format_bytes(value) if value is not None else "n/a (CPU)"

    lines = ["random weights (speed and memory only, no quality); text encoders and VAE not built"]
    for r in results:
        lines.append(f"{r['model']} on {r['device']}: weights {size(r['weight_bytes'])}, built in {r['build_seconds']:.1f} s")
        for key in [k for k in r if k.startswith("batch_")]:
            b = r[key]
            lines.append(
                f"  batch {b['batch']}: step {b['step_seconds'] * 1000:.1f} ms ({r['calls_per_step']} call(s)), "
                f"{b['per_call_seconds_per_sample'] * 1000:.1f} ms per call per sample, activations "
                f"{size(b['activation_bytes_per_sample'])} per sample (estimate {format_bytes(r['activation_estimate_bytes'])})"
            )
        lines.append(f"  prefix state per sample (linear): {format_bytes(r['state_bytes'])} measured, "
                     f"{format_bytes(r['state_bytes_formula'])} by the cost model's formula")
        if "search" in r:
            s, loop = r["search"], r["loop"]
            lines.append(
                f"  search probe ({s['prompts']} prompts, budget {s['budget']}): reference {s['reference_seconds']:.1f} s, "
                f"search {s['search_seconds']:.1f} s for {s['calibration_rollouts']:.2f} calibration rollouts = "
                f"{s['seconds_per_rollout']:.2f} s each (predicted {s['predicted_seconds_per_rollout']:.2f}); "
                f"peak states {format_bytes(s['peak_state_bytes'])}, peak GPU {size(s['peak_gpu_bytes'])}"
            )
            lines.append(f"  denoising loop, batch 1: uncached {loop['uncached_seconds']:.2f} s, budget {s['budget']} "
                         f"{loop['cached_seconds']:.2f} s, speedup {loop['speedup']:.2f} (ideal {loop['ideal']:.2f})")
    return "\n".join(lines)
