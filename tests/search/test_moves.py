"""Moves, annealing and hill climbing on a synthetic objective: budget kept, forced steps fixed, exact replay."""

from __future__ import annotations

import random

import pytest

from budcache_pipeline.search.annealing import AnnealState, anneal, propose, temperature
from budcache_pipeline.search.hill_climbing import ClimbState, climb_round, neighbours
from budcache_pipeline.search.objective import mask_key

STEPS, FORCED = 20, (0, 7)
TARGET = {0, 3, 7, 12, 16, 18, 19}


class Synthetic:
    """Loss = squared distance of compute positions to a target set; counts batched calls."""

    def __init__(self):
        self.calls, self.batches = 0, 0

    def __call__(self, mask):
        return self.evaluate_many([mask])[0]

    def evaluate_many(self, masks):
        self.batches += 1
        self.calls += len(masks)
        return [1e-3 + sum(min((p - t) ** 2 for t in TARGET) for p, m in enumerate(mask) if m) for mask in masks]


def start_mask():
    return [i in {0, 1, 2, 7, 8, 9, 10} for i in range(STEPS)]


def test_proposals_keep_the_budget_and_forced_positions():
    rng = random.Random(0)
    mask = start_mask()
    distances = []
    for _ in range(500):
        candidate = propose(mask, FORCED, rng)
        assert sum(candidate) == sum(mask) and all(candidate[p] for p in FORCED)
        moved = [i for i in range(STEPS) if candidate[i] != mask[i]]
        assert len(moved) in (0, 2, 4)
        if len(moved) == 2:
            distances.append(moved[1] - moved[0])
        mask = candidate
    assert sum(d <= 3 for d in distances) > 0.6 * len(distances) and max(distances) > 3


def test_temperature_is_geometric_from_start_to_end():
    assert temperature(0, 200, 5e-2, 1e-5) == pytest.approx(5e-2)
    assert temperature(199, 200, 5e-2, 1e-5) == pytest.approx(1e-5)
    assert temperature(100, 201, 5e-2, 1e-5) == pytest.approx((5e-2 * 1e-5) ** 0.5)


def run(speculate, stops):
    objective, rows = Synthetic(), []
    mask = start_mask()
    state = AnnealState.begin(mask, objective(mask), random.Random("s"))
    for stop in stops:
        state = AnnealState.from_dict(state.to_dict())
        state = anneal(objective, state, FORCED, 120, 5e-2, 1e-5, stop, rows.append, speculate=speculate)
    return state, rows, objective


def test_speculative_batches_and_resumes_replay_the_sequential_chain_exactly():
    sequential, rows, single = run(1, [120])
    batched, batched_rows, many = run(8, [120])
    resumed, resumed_rows, _ = run(8, [25, 50, 77, 120])
    assert batched == sequential and resumed == sequential
    assert rows == batched_rows == resumed_rows
    assert many.batches < single.batches
    assert sequential.best_loss < Synthetic()(start_mask())


def test_hill_climbing_descends_to_a_local_optimum_with_or_without_screening():
    objective = Synthetic()
    state = ClimbState.begin(start_mask(), objective(start_mask()), random.Random(0))
    losses = [state.current_loss]
    while not state.done:
        state = climb_round(objective, state, FORCED)
        losses.append(state.current_loss)
    assert losses == sorted(losses, reverse=True) and losses[-1] < losses[0]
    final = [int(c) for c in state.current]
    assert sum(final) == 7 and final[0] and final[7]
    for candidate in neighbours([c == "1" for c in state.current], FORCED, random.Random(1), far_jumps=0):
        assert objective(candidate) >= state.current_loss
    screened = ClimbState.begin(start_mask(), objective(start_mask()), random.Random(0))
    screened = climb_round(objective, screened, FORCED, screen=Synthetic(), confirm=2)
    assert screened.current_loss < losses[0]
    assert mask_key(start_mask()) != screened.current
