"""Steepest-descent hill climbing over fixed-budget masks (the paper's second phase).

Annealing ends near a good mask but rarely exactly at a local optimum; one pass of
steepest descent over every single move within a window, plus a few far jumps,
settles it. When a cheaper screening objective is given, every neighbour is ranked
on it and only the best few are evaluated on the full objective, which keeps each
round affordable while the decision itself is always made on the full objective.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from budcache_pipeline.search.annealing import WINDOW, evaluate_many, rng_from_state, rng_state
from budcache_pipeline.search.objective import key_mask, mask_key

FAR_JUMPS = 6
CONFIRM = 4


def neighbours(
    mask: Sequence[bool], forced: Sequence[int], rng: random.Random, window: int = WINDOW, far_jumps: int = FAR_JUMPS
) -> list[list[bool]]:
    """Every single move within `window`, then `far_jumps` seeded moves beyond it, in a fixed order."""
    forced_set = set(forced)
    sources = [p for p, m in enumerate(mask) if m and p not in forced_set]
    targets = [q for q, m in enumerate(mask) if not m]
    near = [(p, q) for p in sources for q in targets if abs(q - p) <= window]
    far = [(p, q) for p in sources for q in targets if abs(q - p) > window]
    moves = near + rng.sample(far, min(far_jumps, len(far)))
    result = []
    for p, q in moves:
        candidate = list(mask)
        candidate[p], candidate[q] = False, True
        result.append(candidate)
    return result


@dataclass
class ClimbState:
    """The climber between rounds (JSON-serialisable)."""

    round: int
    current: str
    current_loss: float
    done: bool
    rng: list[Any]

    @classmethod
    def begin(cls, mask: Sequence[bool], loss: float, rng: random.Random) -> ClimbState:
        return cls(0, mask_key(mask), loss, False, rng_state(rng))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClimbState:
        return cls(**data)


def climb_round(
    objective: Callable[[Sequence[bool]], float],
    state: ClimbState,
    forced: Sequence[int],
    screen: Callable[[Sequence[bool]], float] | None = None,
    confirm: int = CONFIRM,
    window: int = WINDOW,
    far_jumps: int = FAR_JUMPS,
) -> ClimbState:
    """One steepest-descent round; the returned state is `done` when no neighbour improves."""
    if state.done:
        return state
    rng = rng_from_state(state.rng)
    current = key_mask(state.current)
    for target in (objective, screen):
        if hasattr(target, "pin"):
            target.pin([current])
    candidates = neighbours(current, forced, rng, window, far_jumps)
    if screen is not None and candidates:
        scores = evaluate_many(screen, candidates)
        ranked = sorted(range(len(candidates)), key=lambda k: (scores[k], k))
        candidates = [candidates[k] for k in ranked[:confirm]]
    best, best_loss = None, state.current_loss
    for candidate, loss in zip(candidates, evaluate_many(objective, candidates)):
        if loss < best_loss:
            best, best_loss = candidate, loss
    if best is None:
        return ClimbState(state.round + 1, state.current, state.current_loss, True, rng_state(rng))
    return ClimbState(state.round + 1, mask_key(best), best_loss, False, rng_state(rng))
