"""Running a cache method over a rollout set, with its work counted the same way for every method.

A forward pre-hook on a submodule inside each block fires only when that block's body
really runs, so the last block's probe counts full block-stack computations and all
probes together count block evaluations. Threshold caches decide per sample only when a
batch holds one sample: diffusers' FirstBlockCache and MagCache share one decision across
a batch, so they run image by image; our TeaCache keeps per-sample decisions inside a batch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from budcache_pipeline.baselines import BaselineError, CacheMethod
from budcache_pipeline.caching.budcache import get_runtime, transformer_blocks
from budcache_pipeline.sampling import rollout
from budcache_pipeline.solvers import EulerSolver



@dataclass
class RolloutSet:
    """A batch of (prompt, seed) rollouts: conditioning, noise, schedule and, when known, the uncached finals."""

    denoiser: Any
    noise: torch.Tensor
    sigmas: torch.Tensor
    reference: torch.Tensor | None = None
    solver: Any = None
    calls_per_step: int = 1

    def __post_init__(self) -> None:
        self.sigmas = torch.as_tensor(self.sigmas, dtype=torch.float32)
        if self.solver is None:
            self.solver = EulerSolver(self.sigmas)
        if self.reference is not None and self.reference.shape != self.noise.shape:
            raise ValueError(
                f"reference finals have shape {tuple(self.reference.shape)} but the noise {tuple(self.noise.shape)}"
            )

    def __len__(self) -> int:
        return self.noise.shape[0]

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1

    @property
    def transformer(self) -> torch.nn.Module:
        return self.denoiser.transformer

    def subset(self, index: slice) -> RolloutSet:
        reference = self.reference[index] if self.reference is not None else None
        return RolloutSet(
            self.denoiser.subset(index), self.noise[index], self.sigmas, reference, self.solver, self.calls_per_step
        )

    @classmethod
    def from_reference(cls, adapter: Any, reference: Any) -> RolloutSet:
        """The reference set's stored conditioning, noise, schedule and finals, ready for other rollouts."""
        noise = torch.as_tensor(reference.noise).to(adapter.device, adapter.latent_dtype)
        return cls(
            reference.denoiser(adapter),
            noise,
            torch.as_tensor(reference.sigmas),
            torch.as_tensor(reference.final),
            adapter.solver(reference.sigmas),
            adapter.calls_per_step,
        )


def probe_module(block: torch.nn.Module) -> torch.nn.Module:
    """A submodule that runs exactly when the block's body runs: its attention's query projection."""
    for name, module in block.named_modules():
        if name.endswith("to_q"):
            return module
    raise TypeError(f"{type(block).__name__} has no attention `to_q` to count its evaluations by")


class ComputeCounter:
    """Counts block evaluations and full block-stack computations by probes inside every block."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        self.probes = [probe_module(block) for _, block in transformer_blocks(transformer)]
        self.blocks = 0
        self.full_stack = 0
        self._handles: list[Any] = []

    @property
    def num_blocks(self) -> int:
        return len(self.probes)

    def _on_block(self, *_: Any) -> None:
        self.blocks += 1

    def _on_last(self, *_: Any) -> None:
        self.full_stack += 1

    def reset(self) -> None:
        self.blocks = self.full_stack = 0

    def __enter__(self) -> ComputeCounter:
        self._handles = [probe.register_forward_pre_hook(self._on_block) for probe in self.probes]
        self._handles.append(self.probes[-1].register_forward_pre_hook(self._on_last))
        return self

    def __exit__(self, *_: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


@dataclass(frozen=True)
class MethodRun:
    """Final latents and per-image costs of running one method over a rollout set."""

    final: torch.Tensor
    compute_steps: np.ndarray
    block_stack_runs: np.ndarray
    """Full block-stack runs per image: compute steps x transformer calls per step (2 for guided Wan)."""
    block_evaluations: np.ndarray
    seconds: float
    per_image: bool
    cpu_seconds: float = math.nan

    def latent_mse(self, reference: torch.Tensor) -> np.ndarray:
        return (self.final.float() - reference.float()).pow(2).flatten(1).mean(dim=1).numpy()


def _on_sigmas(solver: Any, sigmas: Sequence[float]) -> Any:
    """`solver` over a method's own sigmas: Euler takes any schedule, a multistep scheduler only its own."""
    target = torch.tensor(list(sigmas), dtype=torch.float32)
    if isinstance(solver, EulerSolver):
        return solver.with_sigmas(target.to(solver.sigmas.device))
    own = solver.sigmas.detach().cpu().float()
    if own.shape == target.shape and torch.allclose(own, target, atol=1e-6):
        return solver
    raise BaselineError(
        f"{type(solver).__name__} runs only its scheduler's own sigmas: this method carries another schedule"
    )


class EnabledMethod:
    """A method applied to a transformer for the duration of a `with` block; runs rollouts under it."""

    def __init__(self, method: CacheMethod, transformer: torch.nn.Module, solver: Any) -> None:
        self.method, self.transformer = method, transformer
        self.solver = solver if method.sigmas is None else _on_sigmas(solver, method.sigmas)

    def __enter__(self) -> EnabledMethod:
        self.method.enable(self.transformer, self.solver.sigmas)
        return self

    def __exit__(self, *_: Any) -> None:
        self.method.disable(self.transformer)

    def run(self, data: RolloutSet) -> tuple[torch.Tensor, np.ndarray | None]:
        """Final latents, and per-sample compute counts when the method keeps them itself."""
        self.method.reset(self.transformer)
        final = rollout(data.denoiser, get_runtime(self.transformer), data.noise, self.solver).final
        return final, self.method.compute_counts(self.transformer)


def run_method(method: CacheMethod, data: RolloutSet, per_image: bool | None = None) -> MethodRun:
    """Run `method` over every rollout of `data`; batch-1 runs when the method shares decisions across a batch."""
    per_image = method.per_image if per_image is None else per_image
    transformer = data.transformer
    pieces = [data.subset(slice(i, i + 1)) for i in range(len(data))] if per_image else [data]
    finals, stacks, blocks, seconds, cpu_seconds = [], [], [], 0.0, 0.0
    with torch.inference_mode(), ComputeCounter(transformer) as counter:
        with EnabledMethod(method, transformer, data.solver) as enabled:
            for piece in pieces:
                counter.reset()
                start, cpu_start = time.perf_counter(), time.process_time()
                final, own_counts = enabled.run(piece)
                seconds += time.perf_counter() - start
                cpu_seconds += time.process_time() - cpu_start
                if own_counts is not None:
                    stacks.append(own_counts * data.calls_per_step)
                    blocks.append(own_counts * data.calls_per_step * counter.num_blocks)
                else:
                    stacks.append(np.full(len(piece), counter.full_stack))
                    blocks.append(np.full(len(piece), counter.blocks))
                finals.append(final)
    runs = np.concatenate(stacks)
    steps = runs // data.calls_per_step if (runs % data.calls_per_step == 0).all() else runs / data.calls_per_step
    return MethodRun(torch.cat(finals), steps, runs, np.concatenate(blocks), seconds, per_image, cpu_seconds)

