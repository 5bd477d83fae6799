"""Heuristic caches at a matched mean budget: the baselines a searched policy must beat.

Every method is run through the same rollout as BudCache and its cost is counted
the same way: a forward pre-hook on a submodule inside each block fires only when
that block's body really runs, so the last block's probe counts full block-stack
computations and all probes together count block evaluations. A threshold (or
TaylorSeer's schedule) is chosen so that the mean number of full-stack
computations per image over the calibration set equals the budget, or, for
methods that run part of the stack on every step to decide, so that the mean
number of block evaluations matches a B-step policy's.

Threshold caches decide per sample only when a batch holds one sample: diffusers'
FirstBlockCache and MagCache share one decision across a batch, so they run image
by image; our TeaCache keeps per-sample decisions inside a batch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

import numpy as np
import torch

from budcache_pipeline.caching.budcache import disable_budcache, enable_budcache, transformer_blocks
from budcache_pipeline.caching.teacache import (
    FLUX_TEACACHE_COEFFICIENTS,
    TeaCacheConfig,
    disable_teacache,
    enable_teacache,
    fit_teacache_coefficients,
    trace_stack_changes,
)
from budcache_pipeline.policy import CachePolicy, uniform_mask
from budcache_pipeline.sampling import rollout
from budcache_pipeline.solvers import EulerSolver

METHODS = ("uniform", "teacache", "first_block_cache", "mag_cache", "taylorseer")
TEACACHE_PUBLISHED = "teacache_flux"  # TeaCache with FLUX.1's published polynomial instead of a fitted one
KINDS = ("none", "policy", *METHODS)
MATCHES = ("compute", "blocks")
THRESHOLD_METHODS = ("teacache", "first_block_cache", "mag_cache")
_START_THRESHOLD = {"teacache": 0.3, "first_block_cache": 0.05, "mag_cache": 0.06}
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


def _diffusers_config(method: CacheMethod, steps: int) -> Any:
    from diffusers.hooks import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig

    p = method.params
    if method.kind == "first_block_cache":
        return FirstBlockCacheConfig(threshold=p["threshold"])
    if method.kind == "mag_cache":
        if len(p["mag_ratios"]) != steps:
            raise BaselineError(f"MagCache ratios have {len(p['mag_ratios'])} entries, the sampler {steps} steps")
        return MagCacheConfig(
            threshold=p["threshold"],
            max_skip_steps=p["max_skip_steps"],
            retention_ratio=p["retention_ratio"],
            num_inference_steps=steps,
            mag_ratios=torch.tensor(p["mag_ratios"]),
        )
    return TaylorSeerCacheConfig(
        cache_interval=p["cache_interval"],
        disable_cache_before_step=p["disable_cache_before_step"],
        max_order=p["max_order"],
        taylor_factors_dtype=torch.float32,
        use_lite_mode=True,
    )


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


class _Enabled:
    """A method applied to a transformer for the duration of a `with` block; runs rollouts under it."""

    def __init__(self, method: CacheMethod, transformer: torch.nn.Module, solver: Any) -> None:
        own = method.params.get("sigmas")
        self.method, self.transformer = method, transformer
        self.solver = solver if own is None else _on_sigmas(solver, own)
        self.sigmas = self.solver.sigmas
        self.steps = solver.steps
        self.runtime: Any = None

    def __enter__(self) -> _Enabled:
        kind, p = self.method.kind, self.method.params
        if kind in ("policy", "uniform"):
            if len(p["mask"]) != self.steps:
                raise BaselineError(f"the mask has {len(p['mask'])} steps, the sampler {self.steps}")
            if len(self.sigmas) != self.steps + 1:
                raise BaselineError(f"the method's sigmas describe {len(self.sigmas) - 1} steps, the mask {self.steps}")
            policy = CachePolicy(
                p["mask"], "baseline", "baseline", sigmas=self.sigmas.tolist(), forecast=p.get("forecast", "reuse")
            )
            self.runtime = enable_budcache(self.transformer, policy)
        elif kind == "teacache":
            config = TeaCacheConfig(p["threshold"], self.steps, p["coefficients"])
            self.runtime = enable_teacache(self.transformer, config)
        elif kind != "none":
            if not hasattr(self.transformer, "enable_cache"):
                raise BaselineError(
                    f"{type(self.transformer).__name__} has no `enable_cache`: diffusers' {kind} does not run on it"
                )
            self.transformer.enable_cache(_diffusers_config(self.method, self.steps))
        return self

    def __exit__(self, *_: Any) -> None:
        kind = self.method.kind
        if kind in ("policy", "uniform"):
            disable_budcache(self.transformer)
        elif kind == "teacache":
            disable_teacache(self.transformer)
        elif kind != "none":
            self.transformer.disable_cache()

    def run(self, data: RolloutSet) -> tuple[torch.Tensor, np.ndarray | None]:
        """Final latents, and per-sample compute counts when the method keeps them itself."""
        kind = self.method.kind
        if kind in ("policy", "uniform"):
            return rollout(data.denoiser, self.runtime, data.noise, self.solver).final, None
        if kind == "teacache":
            self.runtime.reset()
            final = rollout(data.denoiser, None, data.noise, self.solver).final
            counts = torch.stack(list(self.runtime.compute_counts().values())).amax(dim=0)
            return final, counts.numpy()
        if kind != "none":
            self.transformer._reset_stateful_cache()
        return rollout(data.denoiser, None, data.noise, self.solver).final, None


def run_method(method: CacheMethod, data: RolloutSet, per_image: bool | None = None) -> MethodRun:
    """Run `method` over every rollout of `data`; batch-1 runs when the method shares decisions across a batch."""
    per_image = method.per_image if per_image is None else per_image
    transformer = data.transformer
    pieces = [data.subset(slice(i, i + 1)) for i in range(len(data))] if per_image else [data]
    finals, stacks, blocks, seconds, cpu_seconds = [], [], [], 0.0, 0.0
    with torch.inference_mode(), ComputeCounter(transformer) as counter:
        with _Enabled(method, transformer, data.solver) as enabled:
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
    with torch.inference_mode(), _Enabled(method, data.transformer, data.solver) as enabled:
        enabled.run(data)
        frequency = enabled.runtime.step_decisions().float().mean(dim=1).tolist()
    frequency[0] = math.inf
    order = sorted(range(data.steps), key=lambda i: (-frequency[i], i))
    chosen = set(order[:budget])
    return [i in chosen for i in range(data.steps)]
