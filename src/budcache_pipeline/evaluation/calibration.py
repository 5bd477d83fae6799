"""Baselines tuned to a budget on the calibration set: a threshold (or TaylorSeer's schedule) per budget.

The threshold is chosen so that the mean number of full-stack computations per image
over the calibration set equals the budget, or, for methods that run part of the stack
on every step to decide, so that the mean number of block evaluations matches a B-step policy's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from budcache_pipeline.caching.baselines import (
    MATCHES,
    METHODS,
    TEACACHE_PUBLISHED,
    THRESHOLD_METHODS,
    BaselineError,
    CacheMethod,
    mag_cache_min_steps,
    mag_cache_schedule,
    taylorseer_compute_steps,
)
from budcache_pipeline.caching.budcache import transformer_blocks
from budcache_pipeline.caching.teacache import FLUX_TEACACHE_COEFFICIENTS, fit_teacache_coefficients, trace_stack_changes
from budcache_pipeline.evaluation.rollouts import EnabledMethod, RolloutSet, run_method

# Where each threshold's bracket starts (it doubles from there until the cost falls below the budget).
_START_THRESHOLD = {"teacache": 0.3, "first_block_cache": 0.05, "mag_cache": 0.06}



def _next_threshold(low: float, high: float, low_value: float | None, high_value: float, target: float) -> float:
    """Regula falsi in log-threshold between a bracket's ends, kept inside its middle 70% so it always shrinks.

    Cost falls roughly log-linearly with the threshold, so interpolating there needs
    far fewer calibration runs than halving; a bracket starting at 0 is halved geometrically.
    """
    if low <= 0 or low_value is None or low_value == high_value:
        floor = max(low, high * 1e-3)
        return math.sqrt(floor * high) if high > 2 * floor else (low + high) / 2
    fraction = min(max((low_value - target) / (low_value - high_value), 0.15), 0.85)
    return math.exp(math.log(low) + fraction * (math.log(high) - math.log(low)))


@dataclass(frozen=True)
class _Point:
    method: CacheMethod
    mean_compute_steps: float
    std_compute_steps: float
    mean_block_evaluations: float
    loss: float

    def value(self, match: str) -> float:
        return self.mean_compute_steps if match == "compute" else self.mean_block_evaluations


@dataclass(frozen=True)
class Calibration:
    """A baseline tuned on the calibration set to a budget, and what it achieved there."""

    name: str
    method: CacheMethod
    budget: int
    match: str
    target: float
    mean_compute_steps: float
    std_compute_steps: float
    mean_block_evaluations: float
    loss: float
    evaluations: int
    trace: tuple[dict[str, float], ...] = ()

    def summary(self) -> dict[str, Any]:
        return {
            "method": self.name,
            "budget": self.budget,
            "match": self.match,
            "target": self.target,
            "parameter": self.method.parameter,
            "settings": self.method.settings(),
            "calibration_mean_compute_steps": self.mean_compute_steps,
            "calibration_std_compute_steps": self.std_compute_steps,
            "calibration_mean_block_evaluations": self.mean_block_evaluations,
            "calibration_loss": self.loss,
            "evaluations": self.evaluations,
        }


def _calibration(
    name: str, point: _Point, budget: int, match: str, target: float, evaluations: int, trace: Iterable[_Point]
) -> Calibration:
    rows = tuple(
        {
            "parameter": p.method.parameter,
            "mean_compute_steps": p.mean_compute_steps,
            "mean_block_evaluations": p.mean_block_evaluations,
            "loss": p.loss,
        }
        for p in trace
    )
    return Calibration(
        name=name if match == "compute" else f"{name}@blocks",
        method=point.method,
        budget=budget,
        match=match,
        target=target,
        mean_compute_steps=point.mean_compute_steps,
        std_compute_steps=point.std_compute_steps,
        mean_block_evaluations=point.mean_block_evaluations,
        loss=point.loss,
        evaluations=evaluations,
        trace=rows,
    )


class BaselineCalibrator:
    """Tunes each baseline on a calibration set so that its mean cost matches a budget.

    TeaCache's polynomial and MagCache's magnitude ratios are measured once from the
    set's uncached rollouts (unless given); threshold evaluations are kept per method,
    so calibrating a ladder of budgets reuses every rollout already run.
    """

    def __init__(
        self,
        data: RolloutSet,
        *,
        teacache_coefficients: Sequence[float] | None = None,
        mag_ratios: Sequence[float] | None = None,
        max_evaluations: int = 14,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        if data.reference is None:
            raise BaselineError("calibration needs the uncached finals: build the RolloutSet from a reference set")
        self.data = data
        self.max_evaluations = max_evaluations
        self.progress = progress or (lambda _: None)
        self.num_blocks = len(transformer_blocks(data.transformer))
        self._coefficients = tuple(teacache_coefficients) if teacache_coefficients is not None else None
        self._mag_ratios = tuple(mag_ratios) if mag_ratios is not None else None
        self.teacache_fit: Any = None
        self._sweeps: dict[tuple[Any, ...], dict[float, _Point]] = {}
        self._done: dict[tuple[str, int, str], Calibration] = {}

    def _measure(self) -> None:
        with torch.inference_mode():
            changes = trace_stack_changes(self.data.denoiser, self.data.noise, self.data.solver)
        if self._coefficients is None:
            self.teacache_fit = fit_teacache_coefficients(changes)
            self._coefficients = self.teacache_fit.coefficients
        if self._mag_ratios is None:
            self._mag_ratios = (1.0, *(float(r) for r in changes.magnitude_ratio))

    @property
    def teacache_coefficients(self) -> tuple[float, ...]:
        if self._coefficients is None:
            self._measure()
        return self._coefficients

    @property
    def mag_ratios(self) -> tuple[float, ...]:
        if self._mag_ratios is None:
            self._measure()
        return self._mag_ratios

    def evaluate(self, method: CacheMethod) -> _Point:
        run = run_method(method, self.data)
        return _Point(
            method,
            float(run.compute_steps.mean()),
            float(run.compute_steps.std()),
            float(run.block_evaluations.mean()),
            float(run.latent_mse(self.data.reference).mean()),
        )

    def target(self, budget: int, match: str) -> float:
        if match not in MATCHES:
            raise BaselineError(f"unknown match {match!r}: choose one of {list(MATCHES)}")
        steps = self.data.steps
        if not 1 <= budget <= steps:
            raise BaselineError(f"budget must be between 1 and {steps} steps, got {budget}")
        return float(budget if match == "compute" else budget * self.num_blocks)

    def calibrate(self, method: str, budget: int, match: str = "compute") -> Calibration:
        """The method's parameter whose mean cost over the calibration set is closest to the budget.

        `method` is one of METHODS, or TEACACHE_PUBLISHED for TeaCache with FLUX.1's polynomial.
        """
        target = self.target(budget, match)
        if (method, budget, match) in self._done:
            return replace(self._done[(method, budget, match)], evaluations=0)
        self._done[(method, budget, match)] = self._calibrate(method, budget, match, target)
        return self._done[(method, budget, match)]

    def _calibrate(self, method: str, budget: int, match: str, target: float) -> Calibration:
        if method == "uniform":
            point = self.evaluate(CacheMethod.uniform(self.data.steps, budget))
            return _calibration(method, point, budget, match, target, 1, [point])
        if method == "taylorseer":
            return self._calibrate_taylorseer(budget, match, target)
        if method not in (*THRESHOLD_METHODS, TEACACHE_PUBLISHED):
            raise BaselineError(f"unknown baseline {method!r}: choose one of {[*METHODS, TEACACHE_PUBLISHED]}")
        make, key = self._threshold_family(method, budget)
        points = self._sweeps.setdefault(key, {})
        return self._bisect(method, make, points, budget, match, target)

    def _threshold_family(self, method: str, budget: int) -> tuple[Callable[[float], CacheMethod], tuple[Any, ...]]:
        if method in ("teacache", TEACACHE_PUBLISHED):
            coefficients = self.teacache_coefficients if method == "teacache" else FLUX_TEACACHE_COEFFICIENTS
            return (lambda t: CacheMethod.teacache(t, coefficients)), (method, coefficients)
        if method == "first_block_cache":
            return CacheMethod.first_block_cache, (method,)
        steps = self.data.steps
        retention, max_skip = mag_cache_schedule(steps, budget)
        ratios = self.mag_ratios
        return (
            lambda t: CacheMethod.mag_cache(t, ratios, retention / steps, max_skip)
        ), (method, retention, max_skip)

    def _bisect(
        self,
        method: str,
        make: Callable[[float], CacheMethod],
        points: dict[float, _Point],
        budget: int,
        match: str,
        target: float,
    ) -> Calibration:
        new: list[_Point] = []

        def at(threshold: float) -> float:
            threshold = float(threshold)
            if threshold not in points:
                points[threshold] = self.evaluate(make(threshold))
                new.append(points[threshold])
                p = points[threshold]
                self.progress(
                    f"{method} B={budget} ({match}): threshold {threshold:.4g} -> "
                    f"{p.mean_compute_steps:.2f} steps, {p.mean_block_evaluations:.1f} block evals, loss {p.loss:.3g}"
                )
            return points[threshold].value(match)

        def unreachable(lowest: float, highest: float) -> BaselineError:
            unit = "compute steps" if match == "compute" else "block evaluations"
            return BaselineError(
                f"{method} reaches a mean of {lowest:.2f} to {highest:.2f} {unit} per image on this set; "
                f"the target {target:g} (budget {budget}) is outside that range"
            )

        if method == "mag_cache":
            family = make(0.0).params
            floor = mag_cache_min_steps(self.data.steps, round(family["retention_ratio"] * self.data.steps),
                                        family["max_skip_steps"])
            floor_value = floor if match == "compute" else floor * self.num_blocks
            if floor_value > target:
                raise unreachable(floor_value, self.data.steps * (1 if match == "compute" else self.num_blocks))
        below = sorted(t for t, p in points.items() if p.value(match) <= target)
        if below:
            high = below[0]
        else:
            high, seen = _START_THRESHOLD[make(0.0).kind], []
            while at(high) > target:
                seen.append(points[high].value(match))
                if len(seen) >= 12 or (len(seen) >= 4 and seen[-1] >= seen[-4]):
                    raise unreachable(min(seen), at(0.0))
                high *= 4
        above = [t for t, p in points.items() if t < high and p.value(match) >= target]
        low = max(above) if above else 0.0
        if not above and at(0.0) < target:
            raise unreachable(at(high), at(0.0))
        while len(new) < self.max_evaluations and not any(p.value(match) == target for p in points.values()):
            if high - low <= 1e-6 * high:
                break
            low_value = points[low].value(match) if low in points else None
            middle = _next_threshold(low, high, low_value, points[high].value(match), target)
            value = at(middle)
            if value > target:
                low = middle
            elif value < target:
                high = middle
        best = min(
            points.values(),
            key=lambda p: (abs(p.value(match) - target), p.value(match) > target, p.loss),
        )
        trace = sorted(points.values(), key=lambda p: p.method.parameter)
        return _calibration(method, best, budget, match, target, len(new), trace)

    def _calibrate_taylorseer(self, budget: int, match: str, target: float) -> Calibration:
        """Every (warm-up, interval, order) whose schedule computes exactly `budget` steps; the best on the set wins."""
        steps = self.data.steps
        schedules: dict[tuple[int, ...], tuple[int, int]] = {}
        for before in range(1, min(budget, 6) + 1):
            for interval in range(1, steps + 1):
                schedule = tuple(taylorseer_compute_steps(steps, interval, before))
                if len(schedule) == budget:
                    schedules.setdefault(schedule, (interval, before))
        candidates = [
            CacheMethod.taylorseer(interval, before, order)
            for order in (1, 2)
            for interval, before in schedules.values()
        ]
        if not candidates:
            counts = sorted(
                {len(taylorseer_compute_steps(steps, i, b)) for i in range(1, steps + 1) for b in range(1, 7)}
            )
            raise BaselineError(
                f"no TaylorSeer schedule computes exactly {budget} of {steps} steps (possible counts: {counts})"
            )
        points = []
        for method in candidates:
            point = self.evaluate(method)
            expected = len(taylorseer_compute_steps(steps, method.params["cache_interval"],
                                                    method.params["disable_cache_before_step"]))
            if point.mean_compute_steps != expected:
                raise RuntimeError(
                    f"TaylorSeer computed {point.mean_compute_steps} steps where its schedule says {expected}: "
                    "diffusers' hook changed its step rule"
                )
            points.append(point)
            self.progress(f"taylorseer B={budget}: {method.settings()} -> loss {point.loss:.3g}")
        best = min(points, key=lambda p: p.loss)
        return _calibration("taylorseer", best, budget, match, target, len(points), points)


def teacache_mask(method: CacheMethod, data: RolloutSet, budget: int) -> list[bool]:
    """A fixed mask from TeaCache's per-sample decisions: the `budget` steps it computes most often (step 0 first).

    Gives the search a start that encodes where the model's input changes fastest.
    """
    if method.kind != "teacache":
        raise BaselineError(f"teacache_mask needs a TeaCache method, got {method.kind!r}")
    if not 1 <= budget <= data.steps:
        raise BaselineError(f"budget must be between 1 and {data.steps} steps, got {budget}")
    with torch.inference_mode(), EnabledMethod(method, data.transformer, data.solver) as enabled:
        enabled.run(data)
        frequency = enabled.runtime.step_decisions().float().mean(dim=1).tolist()
    frequency[0] = math.inf
    order = sorted(range(data.steps), key=lambda i: (-frequency[i], i))
    chosen = set(order[:budget])
    return [i in chosen for i in range(data.steps)]
