"""Initial masks for the search, and the mask rules every move must keep.

The search's result depends on where it starts, so the engine starts from several
places and reports the spread. The strongest start is LeMiCa's: caching as a path
in a DAG over steps, where edge i->j (compute at i and j, reuse in between) is
weighted by the final-output error that this one segment causes on its own, and
the best path with exactly B edges is a small dynamic programme.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from budcache_pipeline.sampling import RolloutState, rollout
from budcache_pipeline.search.objective import MaskObjective, budcache_session, euler_step_plain
from budcache_pipeline.solvers import EulerSolver

BUILTIN_STARTS = ("dp", "uniform", "front_loaded", "back_loaded", "random")
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


def edge_errors(objective: MaskObjective, samples: int = 4, exact: bool = False) -> np.ndarray:
    """(steps + 1)² matrix: errors[i, j] = final loss when only steps i+1..j-1 are cached.

    Segment rollouts start from the teacher at i and share a prefix per i. The
    uncached suffix after j dominates the cost (O(N³) step runs for all edges), so by
    default each j's suffix runs once, for the shortest segment ending at j, and the
    other edges ending at j scale that error by their deviation at j (a linearised
    error gain); `exact=True` runs every edge's suffix. Computed on `samples` pairs,
    once per objective; the cost is added to `objective.stats["start_block_stack_calls"]`,
    and what the same rollouts cost run from the noise without shared prefixes to
    `objective.stats["start_block_stack_calls_naive"]`. Sharded, each rank rolls out its
    rows and the per-row errors are summed over the ranks in one collective.
    """
    key = ("dp_edges", samples, exact)
    if key in objective.cache:
        return objective.cache[key]
    started = time.perf_counter()
    sub = objective.subset(samples)
    teacher = sub.teacher_latents()
    with torch.inference_mode():
        at, resume, runs, naive_runs = _segment_prefixes(sub)
        errors, suffix_runs, suffix_naive_runs = _segment_errors(sub, teacher, at, resume, exact)
    objective.cache[key] = errors
    stats = objective.stats
    for name, value in (("start_block_stack_calls", runs + suffix_runs),
                        ("start_block_stack_calls_naive", naive_runs + suffix_naive_runs)):
        stats[name] = stats.get(name, 0.0) + value / len(objective)
    stats["start_wall_seconds"] = stats.get("start_wall_seconds", 0.0) + time.perf_counter() - started
    return errors


def _segment_prefixes(
    sub: MaskObjective,
) -> tuple[dict[tuple[int, int], torch.Tensor], dict[tuple[int, int], RolloutState], int, int]:
    """Per i, one rollout computing steps 0..i then caching to the end, captured at every later j.

    Returns the latents at (i, j) (j = steps: the final), the states to resume from at (i, j),
    and the per-sample block-stack runs, shared and naive, the teacher's included.
    """
    steps, count = sub.steps, len(sub)
    runs = naive_runs = steps * count
    at: dict[tuple[int, int], torch.Tensor] = {}
    resume: dict[tuple[int, int], RolloutState] = {}
    with budcache_session(sub.adapter.transformer, sub.schedule) as runtime:
        for i in range(steps - 1):
            mask = [True] * (i + 1) + [False] * (steps - i - 1)
            result = rollout(
                sub.denoiser, runtime, sub.noise, sub.solver, mask=mask, start=sub.teacher_state(i),
                capture=range(i + 2, steps),
            )
            at.update({(i, j): state.latents for j, state in result.states.items()})
            resume.update({(i, j): state for j, state in result.states.items()})
            at[(i, steps)] = result.final
            runs += count
            naive_runs += (i + 1) * count
    return at, resume, runs, naive_runs


def _segment_errors(
    sub: MaskObjective,
    teacher: list[torch.Tensor],
    at: dict[tuple[int, int], torch.Tensor],
    resume: dict[tuple[int, int], RolloutState],
    exact: bool,
) -> tuple[np.ndarray, int, int]:
    """The error matrix from the prefixes, with the suffixes' block-stack runs (shared and naive)."""
    steps, count = sub.steps, len(sub)
    errors = np.zeros((steps + 1, steps + 1))
    if exact:
        pairs = [(i, j) for j in range(2, steps) for i in range(j - 1)]
    else:
        pairs = [(j - 2, j) for j in range(2, steps)]
    finals, suffix_runs = _uncached_suffixes(sub, [resume[pair] for pair in pairs])
    runs = suffix_runs * count // sub.local_rows
    naive_runs = sum(steps - (j - i - 1) for i, j in pairs) * count
    ends = [(i, steps) for i in range(steps - 1)]
    per_row = [sub.loss(at[edge], sub.target) for edge in ends] + [sub.loss(f, sub.target) for f in finals]
    deviations = [] if exact else [(i, j) for j in range(3, steps) for i in range(j - 1)]
    per_row += [(at[(i, j)].float() - teacher[j].float()).pow(2).flatten(1).mean(dim=1) for i, j in deviations]
    means = sub.mean_over_rows(per_row)
    for (i, j), value in zip(ends + pairs, means):
        errors[i, j] = value
    deviation = dict(zip(deviations, means[len(ends) + len(pairs):]))
    for j in range(3, steps) if not exact else ():
        probe = deviation[(j - 2, j)]
        gain = errors[j - 2, j] / probe if probe > 0 else 0.0
        for i in range(j - 2):
            errors[i, j] = gain * deviation[(i, j)]
    return errors, runs, naive_runs


def dp_path(errors: np.ndarray, budget: int, forced: Sequence[int]) -> list[int]:
    """Compute positions of the cheapest path 0 -> steps with exactly `budget` edges through all forced nodes."""
    steps = errors.shape[0] - 1
    forced_set = set(forced)
    cost = np.full((budget + 1, steps + 1), math.inf)
    parent = np.full((budget + 1, steps + 1), -1, dtype=int)
    cost[0, 0] = 0.0
    for k in range(1, budget + 1):
        for j in range(1, steps + 1):
            for i in range(j - 1, -1, -1):
                if i + 1 < j and (i + 1) in forced_set:
                    break
                value = cost[k - 1, i] + errors[i, j]
                if value < cost[k, j]:
                    cost[k, j], parent[k, j] = value, i
    if not math.isfinite(cost[budget, steps]):
        raise SearchSetupError(
            f"no path with {budget} compute steps passes through forced positions {sorted(forced_set)}"
        )
    nodes, j = [], steps
    for k in range(budget, 0, -1):
        j = int(parent[k, j])
        nodes.append(j)
    return sorted(nodes)


def dp_start(
    objective: MaskObjective, budget: int, forced: Sequence[int], samples: int = 4, exact: bool = False
) -> list[bool]:
    """LeMiCa's start: the best B-edge path through the DAG of single-segment errors."""
    nodes = set(dp_path(edge_errors(objective, samples, exact), budget, forced))
    return [p in nodes for p in range(objective.steps)]


def start_mask(
    name: str, objective: MaskObjective, budget: int, forced: Sequence[int], seed: int, dp_samples: int = 4
) -> list[bool]:
    """The initial mask of a built-in start."""
    steps = objective.steps
    if name == "dp":
        return dp_start(objective, budget, forced, dp_samples)
    if name == "uniform":
        return uniform_start(steps, budget, forced)
    if name == "front_loaded":
        return front_loaded_start(steps, budget, forced)
    if name == "back_loaded":
        return back_loaded_start(steps, budget, forced)
    if name == "random":
        return random_start(steps, budget, forced, random.Random(f"{seed}:random-start"))
    raise SearchSetupError(f"unknown start {name!r}: use one of {BUILTIN_STARTS} or pass it in extra_starts")
