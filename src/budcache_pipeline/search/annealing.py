"""Simulated annealing over fixed-budget masks (the paper's first phase).

Every move keeps the budget exact: one compute step moves to a cached position,
usually nearby (the loss landscape is smooth in position), sometimes anywhere (to
leave a basin), sometimes twice at once. Metropolis acceptance works on the
relative change of the loss, so one temperature schedule fits every model and
budget. The state is plain data so the engine can checkpoint and resume it exactly.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from budcache_pipeline.search.objective import key_mask, mask_key

WINDOW = 3
FAR_PROBABILITY = 0.2
DOUBLE_PROBABILITY = 0.2
SPECULATE = 8


def rng_state(rng: random.Random) -> list[Any]:
    """JSON form of a Random's state."""
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def rng_from_state(state: Sequence[Any]) -> random.Random:
    rng = random.Random()
    rng.setstate((state[0], tuple(state[1]), state[2]))
    return rng


def temperature(iteration: int, iterations: int, t_start: float, t_end: float) -> float:
    """Geometric cooling from t_start (first iteration) to t_end (last)."""
    if iterations <= 1:
        return t_end
    return t_start * (t_end / t_start) ** (iteration / (iterations - 1))


def move(mask: list[bool], forced: Sequence[int], rng: random.Random, window: int = WINDOW, far: bool = False) -> bool:
    """Move one non-forced compute step to a cached position in place; False when no move exists.

    A local move picks a compute step that has a cached position within `window` and
    moves it there; a far move (or a mask with no local move) picks any compute step
    and any cached position. Choosing only among steps that can move locally keeps
    local moves local where compute steps are dense (masks tend to compute densely
    at the end), instead of turning them into jumps across the trajectory.
    """
    forced_set = set(forced)
    sources = [p for p, m in enumerate(mask) if m and p not in forced_set]
    targets = [q for q, m in enumerate(mask) if not m]
    if not sources or not targets:
        return False
    local = {p: [q for q in targets if abs(q - p) <= window] for p in sources}
    movable = [p for p in sources if local[p]]
    if far or not movable:
        p, q = rng.choice(sources), rng.choice(targets)
    else:
        p = rng.choice(movable)
        q = rng.choice(local[p])
    mask[p], mask[q] = False, True
    return True


def propose(
    mask: Sequence[bool],
    forced: Sequence[int],
    rng: random.Random,
    window: int = WINDOW,
    far_probability: float = FAR_PROBABILITY,
    double_probability: float = DOUBLE_PROBABILITY,
) -> list[bool]:
    """A neighbour of `mask` with the same budget and the same forced positions."""
    candidate = list(mask)
    moves = 2 if rng.random() < double_probability else 1
    for _ in range(moves):
        move(candidate, forced, rng, window, far=rng.random() < far_probability)
    return candidate


@dataclass
class AnnealState:
    """Everything the annealer carries between iterations (JSON-serialisable)."""

    iteration: int
    current: str
    current_loss: float
    best: str
    best_loss: float
    rng: list[Any]
    rejections: int = 0

    @classmethod
    def begin(cls, mask: Sequence[bool], loss: float, rng: random.Random) -> AnnealState:
        key = mask_key(mask)
        return cls(0, key, loss, key, loss, rng_state(rng))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AnnealState:
        return cls(**data)


def evaluate_many(objective: Callable[[Sequence[bool]], float], masks: list[list[bool]]) -> list[float]:
    """Losses of several masks, batched when the objective can batch them."""
    many = getattr(objective, "evaluate_many", None)
    return many(masks) if many is not None else [objective(m) for m in masks]


def anneal(
    objective: Callable[[Sequence[bool]], float],
    state: AnnealState,
    forced: Sequence[int],
    iterations: int,
    t_start: float,
    t_end: float,
    stop_at: int | None = None,
    on_iteration: Callable[[dict[str, Any]], None] | None = None,
    speculate: int = SPECULATE,
) -> AnnealState:
    """Advance one chain up to iteration `stop_at` (default: the end); returns the new state."""
    rows = None if on_iteration is None else (lambda _chain, row: on_iteration(row))
    return anneal_many(objective, [state], forced, iterations, t_start, t_end, stop_at, rows, speculate)[0]


def anneal_many(
    objective: Callable[[Sequence[bool]], float],
    states: Sequence[AnnealState],
    forced: Sequence[int],
    iterations: int,
    t_start: float,
    t_end: float,
    stop_at: int | None = None,
    on_iteration: Callable[[int, dict[str, Any]], None] | None = None,
    speculate: int = SPECULATE,
) -> list[AnnealState]:
    """Advance independent chains (one per start) up to iteration `stop_at`, sharing forwards.

    Each chain proposes speculatively: after r rejections in a row its next
    min(speculate, r + 1) proposals (and their acceptance draws) come from its current
    mask; all chains' proposals are evaluated together; at a chain's first acceptance
    the rest of its batch is dropped and its RNG rewound to just after that draw. So
    every chain is exactly the sequential chain its seed gives, while cold phases,
    where most proposals are rejected, and parallel starts share forwards.
    `objective` may expose `evaluate_many` and `pin(masks)` (keep the current and best
    masks' prefix states cached, which is what makes most proposals cheap).
    """
    if not 0 < t_end <= t_start:
        raise ValueError(f"temperatures must satisfy 0 < t_end <= t_start, got {t_start} and {t_end}")
    stop_at = iterations if stop_at is None else min(stop_at, iterations)
    chains = [_Chain(state) for state in states]
    pin = getattr(objective, "pin", None)
    while True:
        running = [c for c in chains if c.iteration < stop_at]
        if not running:
            break
        if pin is not None:
            pin([m for c in chains for m in (c.current, c.best)])
        for chain in running:
            chain.draw(min(speculate, chain.rejections + 1, stop_at - chain.iteration), forced)
        losses = evaluate_many(objective, [candidate for c in running for candidate, _, _ in c.drawn])
        offset = 0
        for chain in running:
            count = len(chain.drawn)
            index = chains.index(chain)
            chain.consume(losses[offset : offset + count], iterations, t_start, t_end, index, on_iteration)
            offset += count
    return [c.state(max(s.iteration, stop_at)) for c, s in zip(chains, states)]


class _Chain:
    """One annealing chain between batches."""

    def __init__(self, state: AnnealState) -> None:
        self.rng = rng_from_state(state.rng)
        self.iteration = state.iteration
        self.current, self.best = key_mask(state.current), key_mask(state.best)
        self.current_loss, self.best_loss = state.current_loss, state.best_loss
        self.rejections = state.rejections
        self.drawn: list[tuple[list[bool], float, Any]] = []

    def draw(self, count: int, forced: Sequence[int]) -> None:
        self.drawn = []
        for _ in range(count):
            candidate = propose(self.current, forced, self.rng)
            self.drawn.append((candidate, self.rng.random(), self.rng.getstate()))

    def consume(
        self,
        losses: list[float],
        iterations: int,
        t_start: float,
        t_end: float,
        index: int,
        on_iteration: Callable[[int, dict[str, Any]], None] | None,
    ) -> None:
        for (candidate, threshold, after), loss in zip(self.drawn, losses):
            t = temperature(self.iteration, iterations, t_start, t_end)
            delta = (loss - self.current_loss) / max(self.current_loss, 1e-30)
            accepted = delta <= 0 or threshold < math.exp(-delta / t)
            if loss < self.best_loss:
                self.best, self.best_loss = candidate, loss
            if accepted:
                self.current, self.current_loss, self.rejections = candidate, loss, 0
            else:
                self.rejections += 1
            if on_iteration is not None:
                on_iteration(
                    index,
                    {
                        "iteration": self.iteration,
                        "phase": "sa",
                        "temperature": t,
                        "candidate_loss": loss,
                        "accepted": accepted,
                        "current_loss": self.current_loss,
                        "best_loss": self.best_loss,
                    },
                )
            self.iteration += 1
            if accepted:
                self.rng.setstate(after)
                break
        self.drawn = []

    def state(self, iteration: int) -> AnnealState:
        return AnnealState(
            iteration, mask_key(self.current), self.current_loss, mask_key(self.best), self.best_loss,
            rng_state(self.rng), self.rejections,
        )
