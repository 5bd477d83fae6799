"""How a rollout advances the latents from one step to the next: the pipeline's own scheduler, resumably.

A searched mask is only the deployed mask if the search steps the latents exactly as the
deployed pipeline's scheduler does. FLUX and SD3 ship `FlowMatchEulerDiscreteScheduler`,
whose step is closed-form and stateless (`EulerSolver`, which also lets schedule alignment
backpropagate into the sigmas). Wan2.1 ships `UniPCMultistepScheduler`, a multistep solver
that keeps earlier model outputs; `SchedulerSolver` drives a private copy of any such
scheduler through its own `step` and captures its state, so a prefix state can resume it.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, Protocol

import torch

SolverState = dict[str, Any] | None


class Solver(Protocol):
    """Steps of a sampler over a fixed schedule; `state` is what must be carried between steps."""

    sigmas: torch.Tensor
    differentiable: bool

    @property
    def steps(self) -> int: ...

    def initial_state(self) -> SolverState: ...

    def timestep(self, index: int) -> torch.Tensor: ...

    def step(
        self, index: int, latents: torch.Tensor, velocity: torch.Tensor, state: SolverState
    ) -> tuple[torch.Tensor, SolverState]: ...


def euler_step(latents: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """One Euler step, upcast to fp32 as FlowMatchEulerDiscreteScheduler.step does."""
    return (latents.to(torch.float32) + (sigma_next - sigma) * velocity).to(velocity.dtype)


class EulerSolver:
    """The flow-matching Euler step in closed form: stateless, and differentiable in the sigmas."""

    differentiable = True

    def __init__(self, sigmas: torch.Tensor | Sequence[float], num_train_timesteps: int = 1000) -> None:
        self.sigmas = sigmas if torch.is_tensor(sigmas) else torch.tensor(list(sigmas), dtype=torch.float32)
        self.num_train_timesteps = num_train_timesteps

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1

    def initial_state(self) -> SolverState:
        return None

    def timestep(self, index: int) -> torch.Tensor:
        """What FlowMatchEulerDiscreteScheduler lists as the step's timestep (sigma x 1000)."""
        return self.sigmas[index] * self.num_train_timesteps

    def step(
        self, index: int, latents: torch.Tensor, velocity: torch.Tensor, state: SolverState
    ) -> tuple[torch.Tensor, SolverState]:
        return euler_step(latents, velocity, self.sigmas[index], self.sigmas[index + 1]), None

    def with_sigmas(self, sigmas: torch.Tensor) -> EulerSolver:
        """The same solver over another schedule (alignment learns the sigmas)."""
        return EulerSolver(sigmas, self.num_train_timesteps)


class SchedulerSolver:
    """A private copy of a diffusers scheduler, stepped by its own `step`, with its state captured per step.

    The state is the scheduler's attribute dict (lists copied, tensors shared: schedulers
    replace tensors instead of writing into them), so capturing it costs no tensor copy.
    """

    differentiable = False

    def __init__(self, scheduler: Any, steps: int, device: torch.device | str = "cpu", **set_timesteps: Any) -> None:
        self.scheduler = copy.deepcopy(scheduler)
        self.scheduler.set_timesteps(steps, device=device, **set_timesteps)
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(0)
        self.sigmas = torch.as_tensor(self.scheduler.sigmas, dtype=torch.float32).to(device)
        self.timesteps = self.scheduler.timesteps
        if len(self.timesteps) != steps:
            raise ValueError(
                f"{type(scheduler).__name__} makes {len(self.timesteps)} timesteps for {steps} steps: "
                "only one model call per step is supported (no Heun or DPM2 second orders)"
            )
        self._initial = _capture(self.scheduler)

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    def initial_state(self) -> SolverState:
        return dict(self._initial)

    def timestep(self, index: int) -> torch.Tensor:
        return self.timesteps[index]

    def step(
        self, index: int, latents: torch.Tensor, velocity: torch.Tensor, state: SolverState
    ) -> tuple[torch.Tensor, SolverState]:
        if state is None:
            raise ValueError(f"{type(self.scheduler).__name__} needs its state from the previous step")
        self.scheduler.__dict__.update(_copy_lists(state))
        latents = self.scheduler.step(velocity, self.timesteps[index], latents, return_dict=False)[0]
        return latents, _capture(self.scheduler)


def _copy_lists(state: dict[str, Any]) -> dict[str, Any]:
    return {key: list(value) if isinstance(value, list) else value for key, value in state.items()}


def _capture(scheduler: Any) -> dict[str, Any]:
    return _copy_lists(scheduler.__dict__)


def make_solver(scheduler: Any, sigmas: Sequence[float] | torch.Tensor, device: torch.device | str = "cpu") -> Solver:
    """The solver that steps exactly as `scheduler` does over `sigmas` (steps + 1 values ending at 0).

    Euler flow-matching schedulers get the closed form; any other scheduler is driven through its
    own `step` and must reproduce `sigmas` from its default `set_timesteps` (it is the schedule the
    pipeline will run).
    """
    sigma_tensor = torch.as_tensor(sigmas, dtype=torch.float32).to(device)
    if _is_plain_euler(scheduler):
        return EulerSolver(sigma_tensor, int(scheduler.config.get("num_train_timesteps", 1000)))
    solver = SchedulerSolver(scheduler, len(sigma_tensor) - 1, device=device)
    if solver.sigmas.shape != sigma_tensor.shape or not torch.allclose(solver.sigmas, sigma_tensor, atol=1e-6):
        raise ValueError(
            f"{type(scheduler).__name__} runs its own schedule for {solver.steps} steps, not these sigmas: "
            "schedules other than its default (e.g. aligned ones) need a flow-matching Euler scheduler"
        )
    return solver


def _is_plain_euler(scheduler: Any) -> bool:
    if type(scheduler).__name__ != "FlowMatchEulerDiscreteScheduler":
        return False
    config = scheduler.config
    return not config.get("stochastic_sampling", False) and not config.get("invert_sigmas", False)


def stack_states(states: Sequence[SolverState], rows: int) -> SolverState:
    """One state for candidates stacked row-wise: per-row tensors (leading dim `rows`) are concatenated.

    Everything else (step counters, timestep lists) depends only on the step, so candidates at the
    same step agree on it and the first one's is kept.
    """
    if states[0] is None or len(states) == 1:
        return states[0]
    first = states[0]
    return {key: _stack_value([s[key] for s in states], rows) for key in first}


def _is_row_tensor(value: Any, rows: int) -> bool:
    return torch.is_tensor(value) and value.dim() > 1 and value.shape[0] == rows


def _stack_value(values: list[Any], rows: int) -> Any:
    head = values[0]
    if _is_row_tensor(head, rows):
        return torch.cat(values)
    if isinstance(head, list) and any(_is_row_tensor(v, rows) for v in head):
        return [torch.cat(items) if items[0] is not None else None for items in zip(*values)]
    return head


def split_state(state: SolverState, parts: int, rows: int) -> list[SolverState]:
    """The inverse of `stack_states` for `parts` candidates of `rows` rows each."""
    if state is None or parts == 1:
        return [state] * parts
    total = parts * rows
    pieces: dict[str, list[Any]] = {}
    for key, value in state.items():
        if _is_row_tensor(value, total):
            pieces[key] = [t.clone() for t in value.chunk(parts)]
        elif isinstance(value, list) and any(_is_row_tensor(v, total) for v in value):
            columns = [[None] * parts if v is None else [t.clone() for t in v.chunk(parts)] for v in value]
            pieces[key] = [[column[k] for column in columns] for k in range(parts)]
        else:
            pieces[key] = [value] * parts
    return [{key: pieces[key][k] for key in state} for k in range(parts)]
