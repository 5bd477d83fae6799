"""Rollouts under a cache mask with the pipeline's solver, with states that can be captured and resumed.

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

from budcache_pipeline.caching.runtime import BudCacheRuntime, ContextSnapshot
from budcache_pipeline.solvers import EulerSolver, Solver, SolverState, euler_step


class Denoiser(Protocol):
    """A transformer bound to its conditioning: maps (latents, timestep) to the model output."""

    transformer: torch.nn.Module

    def velocity(self, latents: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class RolloutState:
    """The rollout after `step` steps: the next step to run is `step`.

    `solver` is the scheduler's state for multistep solvers (None for Euler).
    """

    step: int
    latents: torch.Tensor
    cache: dict[str, ContextSnapshot]
    solver: SolverState = None


@dataclass(frozen=True)
class Rollout:
    final: torch.Tensor
    states: dict[int, RolloutState]
    computed_steps: int


def as_solver(schedule: Solver | torch.Tensor | Sequence[float]) -> Solver:
    """A solver as given, or the Euler solver over a list or tensor of sigmas."""
    if hasattr(schedule, "step") and hasattr(schedule, "initial_state"):
        return schedule
    sigmas = schedule if torch.is_tensor(schedule) else torch.as_tensor(list(schedule), dtype=torch.float32)
    return EulerSolver(sigmas)


def rollout(
    denoiser: Denoiser,
    runtime: BudCacheRuntime | None,
    latents: torch.Tensor,
    schedule: Solver | torch.Tensor | Sequence[float],
    mask: Sequence[bool] | None = None,
    start: RolloutState | None = None,
    capture: Iterable[int] = (),
    check_finite: bool = False,
) -> Rollout:
    """Run steps `start.step` (or 0) to the end under `mask`, capturing the states after the steps in `capture`.

    `schedule` is the pipeline's solver (`adapter.solver(sigmas)`) or plain sigmas for
    flow-matching Euler. With `runtime=None` the transformer runs as it is (uncached, or
    under another cache such as diffusers' own hooks). Euler sigmas may require grad:
    schedule alignment backpropagates through the rollout. `check_finite` stops at the first
    step whose latents hold NaN or inf (`NonFiniteLatents` names the step and the rows).
    """
    solver = as_solver(schedule)
    steps = solver.steps
    if runtime is None and (mask is not None or start is not None):
        raise ValueError("a mask or a resume state needs a BudCache runtime")
    if runtime is not None:
        if mask is not None:
            runtime.mask = mask
        if runtime.steps != steps:
            raise ValueError(f"mask has {runtime.steps} steps but sigmas describe {steps}")
        runtime.schedule = solver.sigmas.detach()
    if start is None:
        if runtime is not None:
            runtime.reset()
        x, begin, state = latents, 0, solver.initial_state()
    else:
        if not 0 < start.step <= steps:
            raise ValueError(f"cannot resume at step {start.step} of {steps}")
        runtime.restore(start.cache)
        x, begin, state = start.latents, start.step, start.solver
    wanted = set(capture)
    states: dict[int, RolloutState] = {}
    for i in range(begin, steps):
        x, state = solver.step(i, x, denoiser.velocity(x, solver.timestep(i)), state)
        if check_finite:
            _check_finite(x, i)
        if runtime is not None and i + 1 in wanted:
            states[i + 1] = RolloutState(i + 1, x, runtime.snapshot(), state)
    computed = steps if runtime is None else max(runtime.compute_counts().values(), default=0)
    return Rollout(final=x, states=states, computed_steps=computed)


class NonFiniteLatents(FloatingPointError):
    """The model produced NaN or inf: `step` is the first such step, `rows` the samples affected."""

    def __init__(self, step: int, rows: list[int]) -> None:
        super().__init__(f"latents hold NaN or inf after step {step} in batch row(s) {rows}")
        self.step, self.rows = step, rows


def _check_finite(latents: torch.Tensor, step: int) -> None:
    finite = torch.isfinite(latents.detach()).flatten(1).all(dim=1)
    if not bool(finite.all()):
        raise NonFiniteLatents(step, (~finite).nonzero().flatten().tolist())


__all__ = ["Denoiser", "NonFiniteLatents", "Rollout", "RolloutState", "as_solver", "euler_step", "rollout"]
