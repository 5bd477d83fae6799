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

from budcache_pipeline.baselines import (
    MATCHES,
    UNIFORM,
    BaselineError,
    CacheMethod,
    FixedPolicy,
    TeaCache,
    ThresholdBaseline,
    baseline_class,
)
from budcache_pipeline.caching.budcache import transformer_blocks
from budcache_pipeline.caching.teacache import fit_teacache_coefficients, trace_stack_changes
from budcache_pipeline.evaluation.rollouts import EnabledMethod, RolloutSet, run_method


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
class CalibrationPoint:
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

    def info(self) -> dict[str, Any]:
        """What the held-out table's settings column shows of the calibration (evaluate node and bench alike)."""
        return {"match": self.match, "calibration_loss": self.loss, "calibration_steps": self.mean_compute_steps}

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
        self._sweeps: dict[tuple[Any, ...], dict[float, CalibrationPoint]] = {}
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

    def evaluate(self, method: CacheMethod) -> CalibrationPoint:
        run = run_method(method, self.data)
        return CalibrationPoint(
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

    def calibrate(self, name: str, budget: int, match: str = "compute") -> Calibration:
        """The member of baseline `name`'s family whose mean cost over the calibration set is closest to the budget.

        `name` is `uniform` (a BudCache policy, evaluated as it is) or a name in `baselines.BASELINES`.
        """
        self.target(budget, match)
        if (name, budget, match) in self._done:
            return replace(self._done[(name, budget, match)], evaluations=0)
        if name == UNIFORM:
            point = self.evaluate(FixedPolicy.uniform(self.data.steps, budget))
            found = self.record(name, point, budget, match, 1, [point])
        else:
            found = baseline_class(name).calibrate(self, budget, match)
        self._done[(name, budget, match)] = found
        return found

    def record(
        self, name: str, point: CalibrationPoint, budget: int, match: str, evaluations: int,
        trace: Iterable[CalibrationPoint],
    ) -> Calibration:
        """The calibration that chose `point` for `budget`, with every point tried (for the report)."""
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
            target=self.target(budget, match),
            mean_compute_steps=point.mean_compute_steps,
            std_compute_steps=point.std_compute_steps,
            mean_block_evaluations=point.mean_block_evaluations,
            loss=point.loss,
            evaluations=evaluations,
            trace=rows,
        )

    def bisect(
        self,
        name: str,
        make: Callable[[float], ThresholdBaseline],
        key: tuple[Any, ...],
        budget: int,
        match: str,
        start: float,
        floor: int | None = None,
    ) -> Calibration:
        """The threshold whose mean cost is closest to the budget, by regula falsi on a bracket.

        Thresholds evaluated for other budgets of the same family (`key`) are reused. `start`
        is where the bracket's upper end starts; `floor` is the family's fewest computations,
        when it has one, so an unreachable budget is refused without a sweep.
        """
        sweep = _Sweep(self, name, make, self._sweeps.setdefault(key, {}), budget, match)
        if floor is not None and sweep.scaled(floor) > sweep.target:
            raise sweep.unreachable(sweep.scaled(floor), sweep.scaled(self.data.steps))
        low, high = sweep.bracket(start)
        sweep.narrow(low, high, self.max_evaluations)
        return self.record(name, sweep.best(), budget, match, len(sweep.new), sweep.trace())


class _Sweep:
    """One bisection of a threshold family towards one budget's target, over shared evaluated points."""

    def __init__(
        self,
        calibrator: BaselineCalibrator,
        name: str,
        make: Callable[[float], ThresholdBaseline],
        points: dict[float, CalibrationPoint],
        budget: int,
        match: str,
    ) -> None:
        self.calibrator, self.name, self.make, self.points = calibrator, name, make, points
        self.budget, self.match = budget, match
        self.target = calibrator.target(budget, match)
        self.new: list[CalibrationPoint] = []

    def scaled(self, compute_steps: int) -> float:
        """A number of compute steps in the unit this sweep matches."""
        return compute_steps if self.match == "compute" else compute_steps * self.calibrator.num_blocks

    def at(self, threshold: float) -> float:
        """The cost at `threshold`, evaluated once and reported."""
        threshold = float(threshold)
        if threshold not in self.points:
            p = self.points[threshold] = self.calibrator.evaluate(self.make(threshold))
            self.new.append(p)
            self.calibrator.progress(
                f"{self.name} B={self.budget} ({self.match}): threshold {threshold:.4g} -> "
                f"{p.mean_compute_steps:.2f} steps, {p.mean_block_evaluations:.1f} block evals, loss {p.loss:.3g}"
            )
        return self.points[threshold].value(self.match)

    def unreachable(self, lowest: float, highest: float) -> BaselineError:
        unit = "compute steps" if self.match == "compute" else "block evaluations"
        return BaselineError(
            f"{self.name} reaches a mean of {lowest:.2f} to {highest:.2f} {unit} per image on this set; "
            f"the target {self.target:g} (budget {self.budget}) is outside that range"
        )

    def bracket(self, start: float) -> tuple[float, float]:
        """Thresholds whose costs lie on both sides of the target: grow the upper end from `start` if needed."""
        below = sorted(t for t, p in self.points.items() if p.value(self.match) <= self.target)
        if below:
            high = below[0]
        else:
            high, seen = start, []
            while self.at(high) > self.target:
                seen.append(self.points[high].value(self.match))
                if len(seen) >= 12 or (len(seen) >= 4 and seen[-1] >= seen[-4]):
                    raise self.unreachable(min(seen), self.at(0.0))
                high *= 4
        above = [t for t, p in self.points.items() if t < high and p.value(self.match) >= self.target]
        if not above and self.at(0.0) < self.target:
            raise self.unreachable(self.at(high), self.at(0.0))
        return (max(above) if above else 0.0), high

    def narrow(self, low: float, high: float, max_evaluations: int) -> None:
        """Shrink the bracket until a point hits the target, the bracket closes or the evaluations run out."""
        while len(self.new) < max_evaluations and not any(
            p.value(self.match) == self.target for p in self.points.values()
        ):
            if high - low <= 1e-6 * high:
                break
            low_value = self.points[low].value(self.match) if low in self.points else None
            middle = _next_threshold(low, high, low_value, self.points[high].value(self.match), self.target)
            value = self.at(middle)
            if value > self.target:
                low = middle
            elif value < self.target:
                high = middle

    def best(self) -> CalibrationPoint:
        """The point closest to the target (ties: below it rather than above, then the lower loss)."""
        match, target = self.match, self.target
        return min(self.points.values(), key=lambda p: (abs(p.value(match) - target), p.value(match) > target, p.loss))

    def trace(self) -> list[CalibrationPoint]:
        return sorted(self.points.values(), key=lambda p: p.method.parameter)


def teacache_mask(method: CacheMethod, data: RolloutSet, budget: int) -> list[bool]:
    """A fixed mask from TeaCache's per-sample decisions: the `budget` steps it computes most often (step 0 first).

    Gives the search a start that encodes where the model's input changes fastest.
    """
    if not isinstance(method, TeaCache):
        raise BaselineError(f"teacache_mask needs a TeaCache method, got {method.kind!r}")
    if not 1 <= budget <= data.steps:
        raise BaselineError(f"budget must be between 1 and {data.steps} steps, got {budget}")
    with torch.inference_mode(), EnabledMethod(method, data.transformer, data.solver) as enabled:
        enabled.run(data)
        frequency = method.step_decisions(data.transformer).float().mean(dim=1).tolist()
    frequency[0] = math.inf
    order = sorted(range(data.steps), key=lambda i: (-frequency[i], i))
    chosen = set(order[:budget])
    return [i in chosen for i in range(data.steps)]


def parse_entry(entry: str) -> tuple[str, str]:
    """A baseline entry `name` (matched in compute steps) or `name@blocks` (in block evaluations)."""
    name, _, match = str(entry).partition("@")
    return name, match or "compute"


def calibrate_baselines(
    calibrator: BaselineCalibrator,
    entries: Sequence[str],
    budgets: Sequence[int],
    progress: Callable[[str], None] | None = None,
    warn: Callable[[str], None] | None = None,
) -> tuple[list[Calibration], list[dict[str, Any]]]:
    """Every baseline entry tuned at every budget (largest first), and the ones left out with the reason.

    `progress` gets a line per calibration, `warn` (default: `progress`) one per baseline left out.

    The order is fixed because a family's evaluations are shared across budgets: the Kedro
    evaluate node and the quality bench call this with the same entries and get the same thresholds.
    """
    say = progress or (lambda _: None)
    left_out = warn or say
    calibrations, skipped = [], []
    for budget in sorted(budgets, reverse=True):
        for entry in entries:
            name, match = parse_entry(entry)
            try:
                found = calibrator.calibrate(name, budget, match)
            except BaselineError as exc:
                left_out(f"{entry} is left out at budget {budget}: {exc}")
                skipped.append({"method": str(entry), "budget": budget, "reason": str(exc)})
                continue
            calibrations.append(found)
            say(
                f"{found.name} B={budget}: parameter {found.method.parameter}, "
                f"{found.mean_compute_steps:.2f}±{found.std_compute_steps:.2f} steps, "
                f"{found.mean_block_evaluations:.1f} block evals, calibration loss {found.loss:.4g}"
            )
    return calibrations, skipped
