"""Initial masks for the search, and the mask rules every move must keep.

The search's result depends on where it starts, so the engine starts from several
places and reports the spread. The strongest start is LeMiCa's: caching as a path
in a DAG over steps, where edge i->j (compute at i and j, reuse in between) is
weighted by the final-output error that this one segment causes on its own, and
the best path with exactly B edges is a small dynamic programme. Under a linear
forecast a cached step extrapolates from the last two computes, so the `dp_linear`
start weights edge h->i->j by the segment after i with the slope from h, and the
programme's state is the path's last edge.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from budcache_pipeline.sampling import RolloutState, rollout
from budcache_pipeline.search.candidate_batch import stack_caches
from budcache_pipeline.search.objective import (
    MaskObjective,
    budcache_session,
    euler_step_plain,
    latent_mse_per_sample,
)
from budcache_pipeline.solvers import EulerSolver, split_state, stack_states

BUILTIN_STARTS = ("dp", "dp_linear", "uniform", "front_loaded", "back_loaded", "random")
_SUFFIX_ROWS_PER_FORWARD = 1024


class SearchSetupError(ValueError):
    """Search inputs that cannot give a valid policy (budget, forced positions, start masks)."""


def normalise_forced(forced: Iterable[int], steps: int, budget: int) -> tuple[int, ...]:
    """Forced compute positions, sorted, always with step 0 (it has nothing to reuse)."""
    if not 1 <= budget <= steps:
        raise SearchSetupError(f"budget must be between 1 and steps={steps}, got {budget}")
    positions = {0}
    for p in forced:
        if isinstance(p, bool) or not isinstance(p, (int, np.integer)) or not 0 <= p < steps:
            raise SearchSetupError(f"forced position {p!r} is not a step index in [0, {steps})")
        positions.add(int(p))
    if len(positions) > budget:
        raise SearchSetupError(
            f"{len(positions)} forced compute positions {sorted(positions)} do not fit in budget {budget}: "
            "raise the budget or force fewer steps"
        )
    return tuple(sorted(positions))


def starts_for_budget(
    budget: int,
    steps: int,
    starts: Sequence[str],
    tight_starts: Sequence[str] | None = None,
    tight_budget_fraction: float | None = None,
) -> list[str]:
    """`tight_starts` when budget / steps is at most `tight_budget_fraction`, else `starts` (always, when it is None).

    Starts pay off differently by budget (`budcache bench ablation`): the DP start makes the
    loose budgets good, while at tight ones annealing from the uniform start reaches the
    same masks for a fraction of the DP start's rollouts.
    """
    if tight_budget_fraction is None:
        return list(starts)
    if isinstance(tight_budget_fraction, bool) or not isinstance(tight_budget_fraction, (int, float)) or not (
        0 < tight_budget_fraction < 1
    ):
        raise SearchSetupError(f"tight_budget_fraction must be a number in (0, 1), got {tight_budget_fraction!r}")
    if isinstance(tight_starts, str) or not tight_starts:
        raise SearchSetupError(f"tight_starts must be a non-empty list of start names, got {tight_starts!r}")
    return list(tight_starts) if budget / steps <= tight_budget_fraction else list(starts)


def check_mask(mask: Sequence[bool], steps: int, budget: int, forced: Sequence[int], name: str = "mask") -> list[bool]:
    """A copy of `mask` as booleans, or a SearchSetupError saying what is wrong with it."""
    mask = [bool(m) for m in mask]
    if len(mask) != steps:
        raise SearchSetupError(f"{name} has {len(mask)} entries, expected {steps}")
    if sum(mask) != budget:
        raise SearchSetupError(f"{name} computes {sum(mask)} steps, the budget is {budget}")
    missing = [p for p in forced if not mask[p]]
    if missing:
        raise SearchSetupError(f"{name} caches forced compute position(s) {missing}")
    return mask


def _place(steps: int, budget: int, forced: Sequence[int], targets: Iterable[float]) -> list[bool]:
    """Budget compute positions near `targets`, forced ones included, exactly `budget` of them."""
    chosen = set(forced)
    for target in targets:
        if len(chosen) >= budget:
            break
        if any(abs(c - target) < 0.5 for c in chosen):
            continue
        free = [p for p in range(steps) if p not in chosen]
        chosen.add(min(free, key=lambda p: (abs(p - target), p)))
    while len(chosen) < budget:
        free = [p for p in range(steps) if p not in chosen]
        chosen.add(max(free, key=lambda p: (min(abs(p - c) for c in chosen), -p)))
    return [p in chosen for p in range(steps)]


def uniform_start(steps: int, budget: int, forced: Sequence[int]) -> list[bool]:
    """Evenly spaced compute steps (the paper's start)."""
    return _place(steps, budget, forced, (i * steps / budget for i in range(budget)))


def front_loaded_start(steps: int, budget: int, forced: Sequence[int]) -> list[bool]:
    """Compute steps dense at the start (quadratic spacing): where the trajectory moves most."""
    return _place(steps, budget, forced, (steps * (i / budget) ** 2 for i in range(budget)))


def back_loaded_start(steps: int, budget: int, forced: Sequence[int]) -> list[bool]:
    """Compute steps dense at the end (quadratic spacing), step 0 kept: where fine detail forms."""
    return _place(steps, budget, forced, (steps * (1 - (1 - i / budget) ** 2) for i in range(budget)))


def random_start(steps: int, budget: int, forced: Sequence[int], rng: random.Random) -> list[bool]:
    """Forced positions plus a seeded random choice of the rest."""
    free = [p for p in range(steps) if p not in forced]
    chosen = set(forced) | set(rng.sample(free, budget - len(forced)))
    return [p in chosen for p in range(steps)]


# -- LeMiCa DAG start ---------------------------------------------------------------------------


def _uncached_suffixes(sub: MaskObjective, jobs: list[RolloutState]) -> tuple[list[torch.Tensor], int]:
    """Run each state uncached to the end, all jobs in shared forwards.

    Under Euler, rows carry their own timestep, so suffixes that start at different
    steps share a forward; jobs are ordered by start step so the rows still running are
    a prefix. A multistep solver's state is per step, so there each job runs on its own.
    Returns the finals in job order and the number of per-sample block-stack runs.
    """
    if not jobs:
        return [], 0
    samples = sub.local_rows
    if not isinstance(sub.solver, EulerSolver):
        return [_uncached_from(sub, job) for job in jobs], sum(sub.steps - job.step for job in jobs) * samples
    jobs = [(job.step, job.latents) for job in jobs]
    order = sorted(range(len(jobs)), key=lambda k: jobs[k][0])
    starts = torch.tensor([jobs[k][0] for k in order], device=sub.sigmas.device).repeat_interleave(samples)
    x = torch.cat([jobs[k][1] for k in order])
    denoiser = sub.denoiser.tile(len(jobs))
    offset, runs = 0, 0
    while True:
        active = int((starts + offset < sub.steps).sum())
        if active == 0:
            break
        for begin in range(0, active, _SUFFIX_ROWS_PER_FORWARD):
            rows = slice(begin, min(active, begin + _SUFFIX_ROWS_PER_FORWARD))
            index = starts[rows] + offset
            x[rows] = euler_step_plain(denoiser.subset(rows), x[rows], sub.sigmas[index], sub.sigmas[index + 1])
        runs += active
        offset += 1
    finals = x.split(samples)
    result: list[torch.Tensor] = [torch.empty(0)] * len(jobs)
    for position, k in enumerate(order):
        result[k] = finals[position]
    return result, runs


def _uncached_from(sub: MaskObjective, state: RolloutState) -> torch.Tensor:
    """The uncached rest of a rollout from a captured state, stepping the objective's own solver."""
    x, solver_state = state.latents, state.solver
    for i in range(state.step, sub.steps):
        x, solver_state = sub.solver.step(i, x, sub.denoiser.velocity(x, sub.solver.timestep(i)), solver_state)
    return x


Edge = tuple[int, ...]
"""A segment: (i, j) under plain reuse; (h, i, j) under a linear forecast, h the compute before i (-1: none)."""


@dataclass
class _Segments:
    """Per-row values of every segment, the states to run uncached suffixes from, and what they cost.

    `values[edge]` is the per-row deviation from the teacher at j (or, for j = steps, the final
    loss); `resume` holds the states at j of the edges whose uncached suffix runs.
    """

    values: dict[Edge, torch.Tensor] = field(default_factory=dict)
    resume: dict[Edge, RolloutState] = field(default_factory=dict)
    runs: int = 0
    naive_runs: int = 0

    def record(self, teacher: list[torch.Tensor], edge: Edge, state: RolloutState, exact: bool) -> None:
        """Keep the segment's deviation at its end, and its state where its suffix will run."""
        j = edge[-1]
        self.values[edge] = latent_mse_per_sample(state.latents, teacher[j])
        if exact or _is_probe(edge):
            self.resume[edge] = RolloutState(j, state.latents, {}, state.solver)


def _is_probe(edge: Edge) -> bool:
    """The shortest segment ending at its j, whose suffix measures how j's deviation grows to the end."""
    *previous, i, j = edge
    return i == j - 2 and (not previous or previous[0] == (i - 1 if i > 0 else -1))


def _computed_through(i: int, steps: int) -> list[bool]:
    """The mask that computes steps 0..i and caches the rest: every segment starting at i."""
    return [True] * (i + 1) + [False] * (steps - i - 1)


def _index(edge: Edge) -> Edge:
    """The edge's position in the error array (a linear forecast's h shifted by one: -1 means none)."""
    return edge if len(edge) == 2 else (edge[0] + 1, edge[1], edge[2])


def edge_errors(
    objective: MaskObjective, samples: int = 4, exact: bool = False, forecast: str = "reuse"
) -> np.ndarray:
    """Final-loss errors of single cached segments, from the teacher, under `forecast`.

    "reuse": an (steps + 1)² matrix, errors[i, j] = final loss when only steps i+1..j-1 are
    cached and reuse step i's residual. "linear" (the objective's forecast must be linear too)
    extrapolates from the last two computes, so a segment's error also depends on the compute h
    before i: an (steps + 1)³ array, errors[h + 1, i, j] (h = -1: step 0 has none), for segments
    whose residuals (and slope) are the teacher's at h and i.
    Segment rollouts start from the teacher and share a prefix per i. The uncached suffix after j
    dominates the cost (O(N³) step runs for all edges), so by default each j's suffix runs once,
    for the shortest segment ending at j, and the other edges ending at j scale that error by
    their deviation at j (a linearised error gain); `exact=True` runs every edge's suffix.
    Computed on `samples` pairs, once per objective; the cost is added to
    `objective.stats["start_block_stack_calls"]`, and what the same rollouts cost run from the
    noise without shared prefixes to `objective.stats["start_block_stack_calls_naive"]`. Sharded,
    each rank rolls out its rows and the per-row errors are summed over the ranks in one collective.
    """
    if forecast not in ("reuse", "linear"):
        raise SearchSetupError(f"the DP start's segments are measured under 'reuse' or 'linear', got {forecast!r}")
    if forecast == "linear" and objective.forecast != "linear":
        raise SearchSetupError(
            f"linear-forecast segments model a linear objective, this one forecasts {objective.forecast!r}: "
            "use the 'dp' start"
        )
    key = ("dp_edges", samples, exact, forecast)
    if key in objective.cache:
        return objective.cache[key]
    started = time.perf_counter()
    sub = objective.subset(samples)
    with torch.inference_mode():
        segments = _linear_segments(sub, exact) if forecast == "linear" else _reuse_segments(sub, exact)
        errors, suffix_runs, suffix_naive_runs = _segment_errors(sub, segments)
    objective.cache[key] = errors
    stats = objective.stats
    for name, value in (("start_block_stack_calls", segments.runs + suffix_runs),
                        ("start_block_stack_calls_naive", segments.naive_runs + suffix_naive_runs)):
        stats[name] = stats.get(name, 0.0) + value / len(objective)
    stats["start_wall_seconds"] = stats.get("start_wall_seconds", 0.0) + time.perf_counter() - started
    return errors


def _reuse_segments(sub: MaskObjective, exact: bool) -> _Segments:
    """Per i, one rollout computing steps 0..i then caching to the end, captured at every later j.

    Runs are per-sample block-stack runs, shared and naive, the teacher's included.
    """
    steps, count = sub.steps, len(sub)
    teacher = sub.teacher_latents()
    segments = _Segments(runs=steps * count, naive_runs=steps * count)
    with budcache_session(sub.adapter.transformer, sub.schedule) as runtime:
        for i in range(steps - 1):
            result = rollout(
                sub.denoiser, runtime, sub.noise, sub.solver, mask=_computed_through(i, steps),
                start=sub.teacher_state(i),
                capture=range(i + 2, steps),
            )
            for j, state in result.states.items():
                segments.record(teacher, (i, j), state, exact)
            segments.values[(i, steps)] = sub.loss(result.final, sub.target)
            segments.runs += count
            segments.naive_runs += (i + 1) * count
    return segments


def _linear_segments(sub: MaskObjective, exact: bool) -> _Segments:
    """Per (h, i), the teacher's state after step i with the slope from the teacher's residuals at h and i,
    cached to the end and captured at every later j.

    One uncached rollout through the hooks captures every step's residual; the segments then run
    only cached steps (no block-stack run), the h's of one i stacked into shared forwards.
    """
    steps, count, rows = sub.steps, len(sub), sub.local_rows
    segments = _Segments(runs=steps * count, naive_runs=steps * count)
    with budcache_session(sub.adapter.transformer, sub.schedule, "linear") as runtime:
        teacher_run = rollout(sub.denoiser, runtime, sub.noise, sub.solver, mask=[True] * steps,
                              capture=range(1, steps))
        computed = teacher_run.states
        teacher = [sub.noise] + [computed[j].latents for j in range(1, steps)] + [teacher_run.final]
        per_forward = max(1, sub.max_rows_per_forward // rows)
        for i in range(steps - 1):
            previous = [-1] if i == 0 else list(range(i))
            for begin in range(0, len(previous), per_forward):
                chunk = previous[begin:begin + per_forward]
                result = rollout(
                    sub.denoiser.tile(len(chunk)), runtime, sub.noise, sub.solver, mask=_computed_through(i, steps),
                    start=_slope_state(computed, chunk, i, sub.schedule, rows), capture=range(i + 2, steps),
                )
                for j, state in result.states.items():
                    solvers = split_state(state.solver, len(chunk), rows)
                    for h, latents, solver in zip(chunk, state.latents.chunk(len(chunk)), solvers):
                        segments.record(teacher, (h, i, j), RolloutState(j, latents, {}, solver), exact)
                for h, final in zip(chunk, result.final.chunk(len(chunk))):
                    segments.values[(h, i, steps)] = sub.loss(final, sub.target)
                segments.naive_runs += (i + 1) * count * len(chunk)
    return segments


def _slope_state(
    computed: dict[int, RolloutState], previous: Sequence[int], i: int, sigmas: Sequence[float], rows: int
) -> RolloutState:
    """The teacher's state after step i, once per h in `previous`, its slope taken from the residuals at h and i."""
    after = computed[i + 1]
    caches = []
    for h in previous:
        cache = {}
        for name, snap in after.cache.items():
            if h < 0:
                cache[name] = replace(snap, slope_hidden=None, slope_encoder=None)
                continue
            older, moved = computed[h + 1].cache[name], sigmas[i] - sigmas[h]
            encoder = None
            if snap.residual_encoder is not None and older.residual_encoder is not None:
                encoder = (snap.residual_encoder - older.residual_encoder) / moved
            cache[name] = replace(
                snap, slope_hidden=(snap.residual_hidden - older.residual_hidden) / moved, slope_encoder=encoder
            )
        caches.append(cache)
    copies = len(previous)
    latents = after.latents.repeat(copies, *([1] * (after.latents.dim() - 1)))
    return RolloutState(i + 1, latents, stack_caches(caches, i + 1, True, rows),
                        stack_states([after.solver] * copies, rows))


def _segment_errors(sub: MaskObjective, segments: _Segments) -> tuple[np.ndarray, int, int]:
    """The error array from the segments, with the suffixes' block-stack runs (shared and naive)."""
    steps, count = sub.steps, len(sub)
    suffixed = list(segments.resume)
    finals, suffix_runs = _uncached_suffixes(sub, [segments.resume[edge] for edge in suffixed])
    runs = suffix_runs * count // sub.local_rows
    naive_runs = sum(steps - (edge[-1] - edge[-2] - 1) for edge in suffixed) * count
    edges = list(segments.values)
    means = sub.mean_over_rows([segments.values[edge] for edge in edges] + [sub.loss(f, sub.target) for f in finals])
    value = dict(zip(edges, means))
    suffix_error = dict(zip(suffixed, means[len(edges):]))
    gain = {edge[-1]: suffix_error[edge] / value[edge] if value[edge] > 0 else 0.0
            for edge in suffixed if _is_probe(edge)}
    errors = np.zeros((steps + 1,) * len(edges[0]))
    for edge, deviation in value.items():
        j = edge[-1]
        if j == steps:
            errors[_index(edge)] = deviation
        else:
            errors[_index(edge)] = suffix_error[edge] if edge in suffix_error else gain[j] * deviation
    return errors, runs, naive_runs


def dp_path(errors: np.ndarray, budget: int, forced: Sequence[int]) -> list[int]:
    """Compute positions of the cheapest path 0 -> steps with exactly `budget` edges through all forced nodes.

    `errors` is `edge_errors`' array: errors[i, j], or errors[h + 1, i, j] when a segment's error
    depends on the compute before it. The DP's state is the path's last edge (h, i), so both are
    solved exactly by the same programme.
    """
    steps = errors.shape[-1] - 1
    lifted = errors if errors.ndim == 3 else np.broadcast_to(errors, (steps + 1,) * 3)
    allowed = np.zeros((steps + 1, steps + 1), dtype=bool)
    for i in range(steps):
        for j in range(i + 1, steps + 1):
            allowed[i, j] = not any(i < f < j for f in forced)
    weights = np.where(allowed[None], lifted, math.inf)
    cost = np.full((steps + 1, steps + 1), math.inf)  # cost[h + 1, i]: best path whose last edge is h -> i
    cost[0, 0] = 0.0
    parents = []
    for _ in range(budget):
        total = cost[:, :, None] + weights
        best = total.argmin(axis=0)
        parents.append(best)
        cost = np.full_like(cost, math.inf)
        cost[1:, :] = np.take_along_axis(total, best[None], axis=0)[0][:steps]
    last = int(cost[:, steps].argmin())
    if not math.isfinite(cost[last, steps]):
        raise SearchSetupError(
            f"no path with {budget} compute steps passes through forced positions {sorted(set(forced))}"
        )
    nodes, j = [], steps
    for best in reversed(parents):
        i = last - 1
        nodes.append(i)
        last, j = int(best[i, j]), i
    return sorted(nodes)


def dp_start(
    objective: MaskObjective,
    budget: int,
    forced: Sequence[int],
    samples: int = 4,
    exact: bool = False,
    forecast: str = "reuse",
) -> list[bool]:
    """LeMiCa's start: the best B-edge path through the DAG of single-segment errors (`edge_errors`)."""
    nodes = set(dp_path(edge_errors(objective, samples, exact, forecast), budget, forced))
    return [p in nodes for p in range(objective.steps)]


def start_mask(
    name: str, objective: MaskObjective, budget: int, forced: Sequence[int], seed: int, dp_samples: int = 4
) -> list[bool]:
    """The initial mask of a built-in start."""
    steps = objective.steps
    if name == "dp":
        return dp_start(objective, budget, forced, dp_samples)
    if name == "dp_linear":
        return dp_start(objective, budget, forced, dp_samples, forecast="linear")
    if name == "uniform":
        return uniform_start(steps, budget, forced)
    if name == "front_loaded":
        return front_loaded_start(steps, budget, forced)
    if name == "back_loaded":
        return back_loaded_start(steps, budget, forced)
    if name == "random":
        return random_start(steps, budget, forced, random.Random(f"{seed}:random-start"))
    raise SearchSetupError(f"unknown start {name!r}: use one of {BUILTIN_STARTS} or pass it in extra_starts")
