"""`budcache check-model`: load a user's weights through their adapter and time two sampling steps.

The first thing to run on real weights: it fails early, naming the fix, on a missing path,
weights of another architecture, a dtype the device cannot run, or out-of-memory, and
prints the per-step time and peak memory that size the reference and search stages.
"""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch

from budcache_pipeline.models.adapter import BoundDenoiser, ModelSpecError, Size
from budcache_pipeline.models.spec import TINY_WEIGHTS, ModelSpec, load_adapter
from budcache_pipeline.policy import model_fingerprint

CHECK_STEPS = 2
_SMALL_SIZES = {"flux": Size(256, 256), "sd3": Size(256, 256), "wan": Size(128, 128, 5), "digits": Size(16, 16)}


@dataclass(frozen=True)
class ModelCheck:
    """What `check_model` measured."""

    adapter: str
    transformer: str
    fingerprint: str
    parameters: int
    device: str
    dtype: str
    size: Size
    transformer_calls_per_step: int
    step_seconds: list[float]
    peak_memory_bytes: int
    memory_kind: str

    def lines(self) -> list[str]:
        size = f"{self.size.height}x{self.size.width}" + (
            f"x{self.size.num_frames} frames" if self.size.num_frames else ""
        )
        steps = ", ".join(f"{s:.3f} s" for s in self.step_seconds)
        return [
            f"{self.adapter}: {self.transformer} ({self.parameters / 1e6:.1f}M parameters, fingerprint {self.fingerprint})",
            f"on {self.device} in {self.dtype} at {size}: {self.transformer_calls_per_step} transformer call(s) per step",
            f"per step: {steps}",
            f"peak {self.memory_kind} memory: {self.peak_memory_bytes / 2**30:.2f} GiB",
        ]


def _peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "GPU"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss * (1 if sys.platform == "darwin" else 1024), "process (RSS)"


def check_model(spec: ModelSpec, size: Size | None = None, steps: int = CHECK_STEPS) -> ModelCheck:
    """Load `spec`'s model, run `steps` uncached steps on one prompt, and measure each step."""
    adapter = load_adapter(spec)
    if size is None:
        default = adapter.tiny_size if spec.weights == TINY_WEIGHTS else _SMALL_SIZES.get(spec.adapter, Size(256, 256))
        size = spec.size(default)
    device = adapter.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sigmas = adapter.default_sigmas(steps, size)
    solver = adapter.solver(sigmas)
    timings: list[float] = []
    try:
        with torch.inference_mode():
            conditioning, noise = adapter.prepare(["a photograph of a lighthouse at dusk"], [0], size)
            denoiser = BoundDenoiser(adapter, conditioning)
            x, state = noise.to(adapter.latent_dtype), solver.initial_state()
            for i in range(steps):
                started = time.perf_counter()
                x, state = solver.step(i, x, denoiser.velocity(x, solver.timestep(i)), state)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                timings.append(time.perf_counter() - started)
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        if not isinstance(exc, torch.OutOfMemoryError) and "memory" not in str(exc):
            raise
        raise ModelSpecError(
            f"out of memory at {size.height}x{size.width} on {device}: set model.offload to model (or sequential), "
            "use model.dtype bfloat16, or a smaller model.height/width"
        ) from exc
    if not torch.isfinite(x).all():
        raise ModelSpecError("the model's output holds NaN or inf after two steps: check the weights and the dtype")
    peak, kind = _peak_memory(device)
    transformer = adapter.transformer
    return ModelCheck(
        adapter=spec.adapter,
        transformer=type(transformer).__name__,
        fingerprint=model_fingerprint(transformer),
        parameters=sum(p.numel() for p in transformer.parameters()),
        device=str(device),
        dtype=str(adapter.dtype).removeprefix("torch."),
        size=size,
        transformer_calls_per_step=adapter.calls_per_step,
        step_seconds=timings,
        peak_memory_bytes=int(peak),
        memory_kind=kind,
    )


def spec_from_arguments(arguments: Any) -> ModelSpec:
    """The spec `budcache check-model` flags describe."""
    return ModelSpec(
        adapter=arguments.adapter,
        weights=arguments.weights,
        dtype=arguments.dtype,
        device=arguments.device,
        offload=arguments.offload,
        height=arguments.height,
        width=arguments.width,
        num_frames=arguments.num_frames,
    )
