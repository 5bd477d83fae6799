"""The state of an enabled BudCache policy: its mask, the schedule it matches calls against, and what
each cache context (cond / uncond) carries from step to step.

`caching.budcache` installs the hooks that read and write it; the search (`search.objective`)
snapshots and restores it to resume rollouts from a prefix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers.hooks.hooks import BaseState, StateManager

from budcache_pipeline.forecast_gains import ForecastGains, check_steps
from budcache_pipeline.policy import check_forecast

_MATCH_RELATIVE_TOLERANCE = 8e-3


class BudCacheError(RuntimeError):
    """The pipeline's call does not fit the enabled policy (schedule, steps or call order)."""


@dataclass(frozen=True)
class ContextSnapshot:
    """What a cache context carries from one step to the next: the step and its stored residuals.

    Under a linear forecast it also carries the residuals' slopes in sigma and, per batch
    row, the sigma of the step that computed them.
    """

    step: int
    residual_hidden: torch.Tensor | None
    residual_encoder: torch.Tensor | None
    computed: int
    slope_hidden: torch.Tensor | None = None
    slope_encoder: torch.Tensor | None = None
    residual_sigma: torch.Tensor | None = None


class ContextState(BaseState):
    """Per cache-context (cond / uncond) state shared by the root and block hooks."""

    def __init__(self) -> None:
        self.reset()

    def reset(self, *args: Any, **kwargs: Any) -> None:
        self.step = -1
        self.sigma = 0.0
        self.compute = True
        self.residual_hidden: torch.Tensor | None = None
        self.residual_encoder: torch.Tensor | None = None
        self.slope_hidden: torch.Tensor | None = None
        self.slope_encoder: torch.Tensor | None = None
        self.residual_sigma: torch.Tensor | None = None
        self.head_hidden: torch.Tensor | None = None
        self.head_encoder: torch.Tensor | None = None


class BudCacheRuntime:
    """Handle on an enabled policy: its mask, the schedule it matches, counters and snapshots."""

    def __init__(
        self,
        transformer: torch.nn.Module,
        mask: list[bool],
        sigmas: list[float] | None,
        scheduler: Any | None,
        forecast: str = "reuse",
        gains: ForecastGains | None = None,
    ) -> None:
        self.forecast = check_forecast(forecast)
        self.transformer = transformer
        self.scheduler = scheduler
        self.state_manager = StateManager(ContextState)
        self._mask: tuple[bool, ...] = ()
        self._schedule: torch.Tensor | None = None
        self._schedule_values: list[float] | None = None
        self._checked_live: tuple[Any, list[float]] | None = None
        self.counts: dict[str, int] = {}
        self.mask = mask
        self.schedule = sigmas
        check_steps(gains, self.steps)
        device = next(transformer.parameters(), torch.empty(0)).device
        self.gains: tuple[torch.Tensor, torch.Tensor] | None = gains.tensors(device) if gains is not None else None

    @property
    def mask(self) -> tuple[bool, ...]:
        return self._mask

    @mask.setter
    def mask(self, mask: list[bool] | tuple[bool, ...]) -> None:
        mask = tuple(bool(m) for m in mask)
        if not mask or not mask[0]:
            raise BudCacheError("the mask must compute step 0: there is nothing cached before it")
        self._mask = mask

    @property
    def steps(self) -> int:
        return len(self._mask)

    @property
    def schedule(self) -> torch.Tensor | None:
        """The sigmas (steps + 1, ending at 0) that calls are matched against."""
        return self._schedule

    @schedule.setter
    def schedule(self, sigmas: list[float] | torch.Tensor | None) -> None:
        if sigmas is None:
            self._schedule = self._schedule_values = None
            return
        sigmas = torch.as_tensor(sigmas, dtype=torch.float64).detach().cpu().flatten()
        if len(sigmas) != self.steps + 1:
            raise BudCacheError(
                f"schedule has {len(sigmas)} sigmas but the mask has {self.steps} steps: pass steps + 1 sigmas"
            )
        self._schedule = sigmas
        self._schedule_values = sigmas.tolist()
        self._checked_live = None

    def gains_at(self, step: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Step `step`'s residual and slope gains per channel group, or None when the policy has none.

        `gains` may be set to tensors that require grad: alignment learns them through the rollout.
        """
        if self.gains is None:
            return None
        residual, slope = self.gains
        return residual[step], slope[step]

    def compute_counts(self) -> dict[str, int]:
        """Block-stack computations per cache context since that context last started at step 0.

        Kept apart from the hook state, which pipelines reset when a generation ends.
        """
        return dict(self.counts)

    def snapshot(self) -> dict[str, ContextSnapshot]:
        """Everything a later call needs to continue this rollout, per cache context."""
        return {
            name: ContextSnapshot(
                state.step,
                state.residual_hidden,
                state.residual_encoder,
                self.counts.get(name, 0),
                state.slope_hidden,
                state.slope_encoder,
                state.residual_sigma,
            )
            for name, state in self.state_manager._state_cache.items()
        }

    def restore(self, snapshot: dict[str, ContextSnapshot]) -> None:
        """Continue from a snapshot taken by `snapshot()` (possibly under a different mask)."""
        self.reset()
        for name, snap in snapshot.items():
            state = ContextState()
            state.step = snap.step
            state.residual_hidden = snap.residual_hidden
            state.residual_encoder = snap.residual_encoder
            state.slope_hidden, state.slope_encoder = snap.slope_hidden, snap.slope_encoder
            state.residual_sigma = snap.residual_sigma
            self.counts[name] = snap.computed
            self.state_manager._state_cache[name] = state

    def reset(self) -> None:
        self.state_manager._state_cache.clear()
        self.counts.clear()

    def _current_schedule(self) -> list[float]:
        """The sigmas calls are matched against, as floats; the live scheduler's are checked once per tensor.

        Schedulers build a new sigma tensor on every `set_timesteps`, so a tensor already checked
        is not checked again: the check would otherwise cost more than a cached step.
        """
        if self.scheduler is None:
            if self._schedule_values is None:
                raise BudCacheError(
                    "no schedule to match timesteps against: give the policy sigmas or enable on a pipeline"
                )
            return self._schedule_values
        live = self.scheduler.sigmas
        if self._checked_live is not None and self._checked_live[0] is live:
            return self._checked_live[1]
        if live is None or len(live) - 1 != self.steps:
            found = "no schedule" if live is None else f"{len(live) - 1} steps"
            raise BudCacheError(
                f"the pipeline runs {found} but the policy was built for {self.steps}: "
                f"call it with num_inference_steps={self.steps} and the policy's sigmas"
            )
        values = live.detach().to("cpu", torch.float64)
        if self._schedule is not None and not torch.allclose(values, self._schedule, rtol=1e-4, atol=1e-6):
            raise BudCacheError(
                "the pipeline's sigmas differ from the policy's schedule: call the pipeline with "
                "`**adapter.schedule_kwargs(policy.sigmas, size)` (for FLUX and SD3: `sigmas=` from "
                "budcache_pipeline.schedules.scheduler_input_sigmas)"
            )
        self._checked_live = (live, values.tolist())
        return self._checked_live[1]

    def resolve_step(self, timestep: torch.Tensor | float, previous_step: int) -> int:
        """The index of `timestep` in the schedule (sigma units, or 1000x sigma for models that take t)."""
        value = float(torch.as_tensor(timestep).detach().float().max())
        sigmas = self._current_schedule()[:-1]
        thousands = value > 1.0 + 1e-6
        sigma = value / 1000.0 if thousands else value
        # Schedulers with integer timesteps (UniPC, as Wan2.1 ships it) truncate 1000 x sigma.
        slack = 1e-3 if thousands else 1e-6
        distance = [abs(s - sigma) for s in sigmas]
        tolerance = [_MATCH_RELATIVE_TOLERANCE * abs(s) + slack for s in sigmas]
        candidates = [i for i, (d, t) in enumerate(zip(distance, tolerance)) if d <= t]
        if not candidates:
            raise BudCacheError(
                f"timestep {value:.6g} is not in the policy's schedule "
                f"(sigmas {sigmas[0]:.4g} … {sigmas[-1]:.4g}, {self.steps} steps): "
                "run the pipeline with the policy's number of steps and sigmas"
            )
        if previous_step + 1 in candidates:
            return previous_step + 1
        return min(candidates, key=distance.__getitem__)
