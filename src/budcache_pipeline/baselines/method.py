"""What the evaluation harness runs over a rollout set: no cache, a fixed BudCache policy, or a baseline.

Every method is a frozen set of parameters that applies itself to a transformer
(`enable` / `disable`), forgets its state between rollouts (`reset`) and, when it decides
per sample, counts its own work (`compute_counts`); the harness in `evaluation.rollouts`
runs all of them the same way. Uniform and other fixed masks are BudCache policies run
by BudCache's own runtime, not baselines of their own.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from budcache_pipeline.caching.budcache import disable_budcache, enable_budcache
from budcache_pipeline.forecast_gains import ForecastGains
from budcache_pipeline.policy import CachePolicy, uniform_mask
from budcache_pipeline.search.objective import mask_key


class BaselineError(ValueError):
    """A method that cannot be built, run or calibrated as asked; the message gives what is reachable."""


class CacheMethod(ABC):
    """One way of running the sampler, applied to a transformer for the length of a set of rollouts."""

    kind: ClassVar[str]
    """The method's name in job files and tables (`to_json` / `method_from_json`)."""
    per_image: ClassVar[bool] = False
    """True when a batch shares one decision, so that per-image behaviour needs batch-1 runs."""

    @property
    def sigmas(self) -> tuple[float, ...] | None:
        """The method's own schedule, when it carries one (an aligned policy); None runs the sampler's."""
        return None

    @abstractmethod
    def enable(self, transformer: torch.nn.Module, sigmas: torch.Tensor) -> None:
        """Apply the method to `transformer` for a sampler that runs `sigmas` (steps + 1 values)."""

    @abstractmethod
    def disable(self, transformer: torch.nn.Module) -> None:
        """Leave `transformer` as it was before `enable`."""

    def reset(self, transformer: torch.nn.Module) -> None:
        """Forget what the previous rollout left behind, before the next one starts."""

    def compute_counts(self, transformer: torch.nn.Module) -> np.ndarray | None:
        """Block-stack computations per sample of the latest rollout, when the method counts them itself."""
        return None

    @property
    def parameter(self) -> float | None:
        """The value calibration tunes (a threshold or an interval), for tables."""
        return None

    def params(self) -> dict[str, Any]:
        """The parameters as plain JSON values (sequences as lists), for job files and digests."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    def settings(self) -> dict[str, Any]:
        """The parameters a report shows (long lists such as magnitude ratios left out)."""
        return {k: v for k, v in self.params().items() if v is not None}

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "params": self.params()}


def _plain(value: Any) -> Any:
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


@dataclass(frozen=True)
class Uncached(CacheMethod):
    """The transformer as it is: the reference every method is compared with."""

    kind: ClassVar[str] = "none"

    def enable(self, transformer: torch.nn.Module, sigmas: torch.Tensor) -> None:
        return None

    def disable(self, transformer: torch.nn.Module) -> None:
        return None


@dataclass(frozen=True)
class FixedPolicy(CacheMethod):
    """A fixed mask run by BudCache's runtime, on its own (e.g. aligned) sigmas and forecast gains when it
    carries them."""

    mask: tuple[bool, ...]
    sigmas: tuple[float, ...] | None = None  # type: ignore[assignment]
    forecast: str = "reuse"
    gains: ForecastGains | None = None
    kind: ClassVar[str] = "policy"

    def __post_init__(self) -> None:
        object.__setattr__(self, "mask", tuple(bool(m) for m in self.mask))
        if self.sigmas is not None:
            object.__setattr__(self, "sigmas", tuple(float(s) for s in self.sigmas))
        if isinstance(self.gains, dict):
            object.__setattr__(self, "gains", ForecastGains.from_dict(self.gains))

    @classmethod
    def of(cls, policy: CachePolicy) -> FixedPolicy:
        """A registered policy's mask and forecast (and its own sigmas and gains, when alignment learned them)."""
        return cls(policy.mask, policy.sigmas, policy.forecast, policy.forecast_gains)

    @classmethod
    def uniform(cls, steps: int, budget: int) -> FixedPolicy:
        """`budget` compute steps evenly spaced: the simplest policy at a budget."""
        return cls(uniform_mask(steps, budget))

    def enable(self, transformer: torch.nn.Module, sigmas: torch.Tensor) -> None:
        steps = len(sigmas) - 1
        if len(self.mask) != steps:
            raise BaselineError(f"the mask has {len(self.mask)} steps, the sampler's schedule {steps}")
        policy = CachePolicy(
            self.mask, "baseline", "baseline", sigmas=sigmas.tolist(), forecast=self.forecast,
            forecast_gains=self.gains,
        )
        enable_budcache(transformer, policy)

    def disable(self, transformer: torch.nn.Module) -> None:
        disable_budcache(transformer)

    def params(self) -> dict[str, Any]:
        """As for every method, with the gains as their JSON object (a job file's `gains`)."""
        return {**super().params(), "gains": self.gains.to_dict() if self.gains is not None else None}

    def settings(self) -> dict[str, Any]:
        return {
            "mask": mask_key(self.mask),
            "forecast": self.forecast,
            **({"gain_channels": self.gains.channels} if self.gains is not None else {}),
        }


def check_length(name: str, values: Sequence[Any], steps: int) -> None:
    """Refuse per-step parameters measured for another number of steps."""
    if len(values) != steps:
        raise BaselineError(f"{name} have {len(values)} entries, the sampler {steps} steps")
