"""Euler flow-matching rollouts under a cache mask, with states that can be captured and resumed.

The search evaluates thousands of masks that share prefixes; the state after step k
(latent plus the residuals each cache context stores) depends only on the first k
mask entries, so a rollout can resume from a captured state instead of step 0.
The rollout drives the transformer through the same hooks a deployed pipeline uses.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from budcache_pipeline.caching.budcache import BudCacheRuntime, ContextSnapshot


class Denoiser(Protocol):
    """A transformer bound to its conditioning: maps (latents, sigma) to the flow velocity."""

    transformer: torch.nn.Module

    def velocity(self, latents: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class RolloutState:
    """The rollout after `step` steps: the next step to run is `step`."""

    step: int
    latents: torch.Tensor
    cache: dict[str, ContextSnapshot]


@dataclass(frozen=True)
class Rollout:
    final: torch.Tensor
    states: dict[int, RolloutState]
    computed_steps: int


def euler_step(latents: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """One Euler step, upcast to fp32 as FlowMatchEulerDiscreteScheduler.step does."""
    return (latents.to(torch.float32) + (sigma_next - sigma) * velocity).to(velocity.dtype)


def _plain_rollout(denoiser: Denoiser, latents: torch.Tensor, sigmas: torch.Tensor) -> Rollout:
    x = latents
    for i in range(len(sigmas) - 1):
        x = euler_step(x, denoiser.velocity(x, sigmas[i]), sigmas[i], sigmas[i + 1])
    return Rollout(final=x, states={}, computed_steps=len(sigmas) - 1)


def rollout(
    denoiser: Denoiser,
    runtime: BudCacheRuntime | None,
    latents: torch.Tensor,
    sigmas: torch.Tensor | Sequence[float],
    mask: Sequence[bool] | None = None,
    start: RolloutState | None = None,
    capture: Iterable[int] = (),
) -> Rollout:
    """Run steps `start.step` (or 0) to the end under `mask`, capturing the states after the steps in `capture`.

    With `runtime=None` the transformer runs as it is (uncached, or under another
    cache such as diffusers' own hooks). `sigmas` may require grad: schedule
    alignment backpropagates through the rollout.
    """
    sigmas = torch.as_tensor(sigmas, dtype=torch.float32) if not torch.is_tensor(sigmas) else sigmas
    steps = len(sigmas) - 1
    if runtime is None:
        if mask is not None or start is not None:
            raise ValueError("a mask or a resume state needs a BudCache runtime")
        return _plain_rollout(denoiser, latents, sigmas)
    if mask is not None:
        runtime.mask = mask
    if runtime.steps != steps:
        raise ValueError(f"mask has {runtime.steps} steps but sigmas describe {steps}")
    runtime.schedule = sigmas.detach()
    if start is None:
        runtime.reset()
        x, begin = latents, 0
    else:
        if not 0 < start.step <= steps:
            raise ValueError(f"cannot resume at step {start.step} of {steps}")
        runtime.restore(start.cache)
        x, begin = start.latents, start.step
    wanted = set(capture)
    states: dict[int, RolloutState] = {}
    for i in range(begin, steps):
        velocity = denoiser.velocity(x, sigmas[i])
        x = euler_step(x, velocity, sigmas[i], sigmas[i + 1])
        if i + 1 in wanted:
            states[i + 1] = RolloutState(i + 1, x, runtime.snapshot())
    computed = max(runtime.compute_counts().values(), default=0)
    return Rollout(final=x, states=states, computed_steps=computed)
