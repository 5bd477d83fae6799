"""Heuristic caches a searched policy must beat: what each method is and the mathematics of its schedule.

A `CacheMethod` names a way of running the sampler (no cache, a fixed mask, or a heuristic
with its parameters); `evaluation.rollouts` runs it and counts its work, and
`evaluation.calibration` tunes its threshold (or TaylorSeer's schedule) to a budget.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from budcache_pipeline.caching.teacache import FLUX_TEACACHE_COEFFICIENTS
from budcache_pipeline.policy import CachePolicy, uniform_mask

METHODS = ("uniform", "teacache", "first_block_cache", "mag_cache", "taylorseer")
TEACACHE_PUBLISHED = "teacache_flux"  # TeaCache with FLUX.1's published polynomial instead of a fitted one
KINDS = ("none", "policy", *METHODS)
MATCHES = ("compute", "blocks")
THRESHOLD_METHODS = ("teacache", "first_block_cache", "mag_cache")
_PER_IMAGE_KINDS = ("first_block_cache", "mag_cache")


class BaselineError(ValueError):
    """A baseline that cannot be built or calibrated as asked; the message gives what is reachable."""


@dataclass(frozen=True)
class CacheMethod:
    """One way of running the sampler: no cache, a fixed mask, or a heuristic with its parameters."""

    kind: str
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise BaselineError(f"unknown cache method {self.kind!r}: choose one of {list(KINDS)}")
        object.__setattr__(self, "params", MappingProxyType(dict(self.params)))

    @classmethod
    def none(cls) -> CacheMethod:
        return cls("none")

    @classmethod
    def fixed(
        cls, mask: Sequence[bool], sigmas: Sequence[float] | None = None, forecast: str = "reuse"
    ) -> CacheMethod:
        """A fixed mask run by BudCache's runtime, on its own (e.g. aligned) sigmas when given."""
        return cls("policy", {"mask": tuple(bool(m) for m in mask),
                              "sigmas": tuple(float(s) for s in sigmas) if sigmas is not None else None,
                              "forecast": forecast})

    @classmethod
    def policy(cls, policy: CachePolicy) -> CacheMethod:
        """A registered policy's mask and forecast (and its own sigmas, when it carries aligned ones)."""
        return cls.fixed(policy.mask, policy.sigmas, policy.forecast)

    @classmethod
    def uniform(cls, steps: int, budget: int) -> CacheMethod:
        return cls("uniform", {"mask": tuple(uniform_mask(steps, budget))})

    @classmethod
    def teacache(cls, threshold: float, coefficients: Sequence[float] = FLUX_TEACACHE_COEFFICIENTS) -> CacheMethod:
        return cls("teacache", {"threshold": float(threshold), "coefficients": tuple(float(c) for c in coefficients)})

    @classmethod
    def first_block_cache(cls, threshold: float) -> CacheMethod:
        return cls("first_block_cache", {"threshold": float(threshold)})

    @classmethod
    def mag_cache(
        cls, threshold: float, mag_ratios: Sequence[float], retention_ratio: float, max_skip_steps: int
    ) -> CacheMethod:
        return cls(
            "mag_cache",
            {
                "threshold": float(threshold),
                "mag_ratios": tuple(float(r) for r in mag_ratios),
                "retention_ratio": float(retention_ratio),
                "max_skip_steps": int(max_skip_steps),
            },
        )

    @classmethod
    def taylorseer(cls, cache_interval: int, disable_cache_before_step: int, max_order: int = 1) -> CacheMethod:
        """TaylorSeer's lite mode: the whole stack is skipped and the output projection is extrapolated."""
        return cls(
            "taylorseer",
            {
                "cache_interval": int(cache_interval),
                "disable_cache_before_step": int(disable_cache_before_step),
                "max_order": int(max_order),
            },
        )

    @property
    def per_image(self) -> bool:
        """True when a batch shares one decision, so that per-image behaviour needs batch-1 runs."""
        return self.kind in _PER_IMAGE_KINDS

    @property
    def parameter(self) -> float | None:
        """The value calibration tunes (threshold or interval), for tables."""
        if self.kind in THRESHOLD_METHODS:
            return float(self.params["threshold"])
        if self.kind == "taylorseer":
            return float(self.params["cache_interval"])
        return None

    def settings(self) -> dict[str, Any]:
        """Parameters as plain JSON values (masks as 0/1 strings, long ratio lists left out)."""
        out: dict[str, Any] = {}
        for key, value in self.params.items():
            if key == "mask":
                out[key] = "".join("1" if m else "0" for m in value)
            elif key in ("mag_ratios", "sigmas") or value is None:
                continue
            elif key == "coefficients":
                out[key] = [float(f"{c:.6g}") for c in value]
            else:
                out[key] = value
        return out



def mag_cache_schedule(steps: int, budget: int) -> tuple[int, int]:
    """(retention steps, max consecutive skips) that let MagCache reach `budget` with room for its threshold.

    diffusers' defaults (retention 0.2, 3 skips) cannot go below about 12 of 28 steps;
    tighter budgets shorten the retention to half the budget and allow longer skips.
    """
    retention = max(1, min(round(0.2 * steps), budget // 2))
    for max_skip in range(3, steps + 1):
        if mag_cache_min_steps(steps, retention, max_skip) <= budget - 1:
            return retention, max_skip
    return retention, steps


def mag_cache_min_steps(steps: int, retention: int, max_skip: int) -> int:
    """The fewest computations MagCache can make: the retained steps, then one after every `max_skip` skips."""
    return retention + (steps - retention) // (max_skip + 1)


def taylorseer_compute_steps(steps: int, cache_interval: int, disable_cache_before_step: int) -> list[int]:
    """The steps on which diffusers' TaylorSeer hook runs the full computation."""
    before = disable_cache_before_step
    return [s for s in range(steps) if s < before or (s - before - 1) % cache_interval == 0]

