"""The multi-start search: exact budgets, reproducible policies, resumable checkpoints, honest cost."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import pandas as pd
import pytest
import torch

from budcache_pipeline.policy import uniform_mask
from budcache_pipeline.search import (
    MaskObjective,
    ProgressBar,
    SearchConfig,
    SearchProgress,
    SearchSetupError,
    latent_mse_per_sample,
    result_to_policy,
    search_policy,
)
from budcache_pipeline.search.phases import RACE_FROM, SA_CHUNK
from budcache_pipeline.search.tolerance import LOSS_RELATIVE_TOLERANCE
from tests.search.conftest import STEPS, assert_same_up_to_loss_tolerance, close

FAST = SearchConfig(sa_iterations=30, hc_rounds=3, dp_samples=3, race_margin=None)
LOSS_COLUMNS = ["current_loss", "best_loss"]


class Stop(Exception):
    pass


def fast(**changes) -> SearchConfig:
    return replace(FAST, **changes)


def to_policy(result, created_at="2026-01-01T00:00:00+00:00"):
    return result_to_policy(
        result,
        model_name="tiny",
        model_fingerprint="abc",
        sigmas=None,
        settings={"budget": result.budget, "seed": 0},
        scores={"calibration_mse": result.loss},
        created_at=created_at,
    )


def assert_same_search(got, expected):
    """The promise across batch compositions, thread counts and machines: every mask and
    decision the same, every loss within LOSS_RELATIVE_TOLERANCE."""
    assert got.mask == expected.mask and got.loss == close(expected.loss)
    assert_same_up_to_loss_tolerance(got.starts, expected.starts, "starts")
    pd.testing.assert_frame_equal(got.history.drop(columns=LOSS_COLUMNS), expected.history.drop(columns=LOSS_COLUMNS))
    for column in LOSS_COLUMNS:
        assert got.history[column].tolist() == pytest.approx(
            expected.history[column].tolist(), rel=LOSS_RELATIVE_TOLERANCE
        ), column
    got_policy, expected_policy = (json.loads(to_policy(r).to_json()) for r in (got, expected))
    for policy in (got_policy, expected_policy):
        policy["provenance"]["cost"] = None  # a resumed search or another batch shape runs other forwards
    # The spread of close final losses is a small difference of losses: its error is the losses' error.
    got_std, expected_std = (p["provenance"]["start_spread"].pop("std") for p in (got_policy, expected_policy))
    scale = LOSS_RELATIVE_TOLERANCE * expected_policy["provenance"]["start_spread"]["max"]
    assert got_std == pytest.approx(expected_std, rel=LOSS_RELATIVE_TOLERANCE, abs=scale)
    assert_same_up_to_loss_tolerance(got_policy, expected_policy, "policy")


def jittered_mse(seed: int, relative: float):
    """The latent MSE with a pseudo-random relative error below `relative` on every evaluation:
    what another batch composition or machine does to the last bits of a loss, but larger."""
    rng = random.Random(seed)

    def loss(output, target):
        return latent_mse_per_sample(output, target) * (1 + relative * (2 * rng.random() - 1))

    return loss


def test_search_keeps_the_budget_and_beats_every_start(objective):
    result = search_policy(objective, 4, fast(forced=(0, 6)))
    assert sum(result.mask) == 4 and result.mask[0] and result.mask[6]
    assert result.loss == objective(result.mask)
    assert result.loss <= min(s["initial_loss"] for s in result.starts)
    assert result.loss <= objective(uniform_mask(STEPS, 4))
    assert [s["start"] for s in result.starts] == ["dp", "uniform", "front_loaded", "random"]
    for start in result.starts:
        assert sum(start["mask"]) == 4 and start["mask"][6] and start["final_loss"] <= start["initial_loss"]
    spread = result.spread
    assert spread["min"] == result.loss and spread["max"] >= spread["min"] and spread["std"] >= 0
    history = result.history
    columns = ["iteration", "phase", "start", "objective", "temperature", "current_loss", "best_loss"]
    assert list(history.columns[:7]) == columns
    sa = history[history.phase == "sa"]
    assert len(sa) == 4 * 30
    assert sa.temperature.iloc[0] == pytest.approx(5e-2) and sa.temperature.iloc[29] == pytest.approx(1e-5)
    # Best-so-far never rises within one objective (SA scores on the screening subset, HC on the full set).
    assert (history.groupby(["start", "objective"]).best_loss.apply(lambda s: s.is_monotonic_decreasing)).all()
    cost = result.cost
    assert 0 < cost["block_stack_calls"] < cost["block_stack_calls_naive"]
    assert cost["saved_fraction"] == pytest.approx(1 - cost["block_stack_calls"] / cost["block_stack_calls_naive"])
    assert cost["calibration_rollouts"] == pytest.approx(cost["block_stack_calls"] / STEPS)
    assert cost["evaluations"] > 0 and cost["memo_hits"] > 0 and cost["wall_seconds"] > 0
    assert 0 < cost["start_block_stack_calls"] < cost["start_block_stack_calls_naive"] < cost["block_stack_calls_naive"]


def test_same_inputs_and_seed_give_a_byte_identical_policy(adapter, reference):
    first = to_policy(search_policy(MaskObjective(adapter, reference), 3, fast(seed=3))).to_json()
    second = to_policy(search_policy(MaskObjective(adapter, reference), 3, fast(seed=3))).to_json()
    assert first == second
    policy = json.loads(first)
    assert policy["provenance"]["cost"]["block_stack_calls"] > 0 and "wall_seconds" not in policy["provenance"]["cost"]
    assert [s["start"] for s in policy["provenance"]["starts"]] == ["dp", "uniform", "front_loaded", "random"]


def test_a_killed_search_resumes_from_its_checkpoint_and_ends_with_the_same_policy(adapter, reference, tmp_path):
    config = fast(starts=("uniform", "random"), seed=1, screen_samples=3)
    uninterrupted = search_policy(MaskObjective(adapter, reference), 4, config)
    checkpoint = tmp_path / "search.json"

    def kill_at(phase, iteration):
        def progress(where: SearchProgress):
            if where.phase == phase and where.iteration >= iteration:
                raise Stop

        return progress

    with pytest.raises(Stop):
        search_policy(MaskObjective(adapter, reference), 4, config, checkpoint=checkpoint, progress=kill_at("sa", 25))
    with pytest.raises(Stop):
        search_policy(MaskObjective(adapter, reference), 4, config, checkpoint=checkpoint, progress=kill_at("hc", 1))
    resumed_objective = MaskObjective(adapter, reference)
    resumed = search_policy(resumed_objective, 4, config, checkpoint=checkpoint)
    # The resumed search reads the killed runs' losses from the checkpoint and computes the
    # rest from the noise, in other batch compositions than the uninterrupted search did.
    assert_same_search(resumed, uninterrupted)
    again = search_policy(resumed_objective, 4, config, checkpoint=checkpoint)
    assert json.dumps(again.to_dict()) == json.dumps(resumed.to_dict()), "a finished checkpoint returns its result"
    with pytest.raises(SearchSetupError, match="seed"):
        search_policy(resumed_objective, 4, replace(config, seed=2), checkpoint=checkpoint)


def test_batch_shapes_and_thread_counts_change_no_mask(adapter, reference):
    config = fast(starts=("uniform", "random"), seed=2)
    batched = search_policy(MaskObjective(adapter, reference), 4, config)
    one_candidate_per_forward = MaskObjective(adapter, reference, max_rows_per_forward=len(reference))
    assert_same_search(search_policy(one_candidate_per_forward, 4, config), batched)
    threads = torch.get_num_threads()
    torch.set_num_threads(2 if threads == 1 else 1)
    try:
        other_threads = search_policy(MaskObjective(adapter, reference), 4, config)
    finally:
        torch.set_num_threads(threads)
    assert_same_search(other_threads, batched)


def test_losses_that_differ_within_the_tolerance_choose_the_same_masks(adapter, reference):
    """Each evaluation's own error below half the tolerance: two such losses of a mask are within it."""
    exact = search_policy(MaskObjective(adapter, reference), 4, fast(seed=4))
    for seed in (0, 1):
        loss = jittered_mse(seed, LOSS_RELATIVE_TOLERANCE / 2)
        jittered = search_policy(MaskObjective(adapter, reference, loss=loss), 4, fast(seed=4))
        assert jittered.loss != exact.loss, "the jitter reaches the losses the search compares"
        assert_same_search(jittered, exact)


def test_progress_is_reported_after_every_checkpoint_up_to_the_whole_search(objective, capsys):
    seen: list[SearchProgress] = []
    result = search_policy(objective, 4, fast(starts=("uniform", "random")), progress=seen.append)
    phases = [w.phase for w in seen]
    assert phases[:5] == ["start", "sa", "sa", "sa", "hc"] and set(phases[5:-1]) <= {"hc"} and phases[-1] == "done"
    assert all(w.budget == 4 and w.total == 2 * (30 + 3) for w in seen)
    assert [w.done for w in seen] == sorted(w.done for w in seen) and seen[-1].done == seen[-1].total
    assert seen[-1].best == result.loss and {w.start for w in seen if w.phase == "hc"} >= {"uniform", "random"}
    search_policy(objective, 4, fast(starts=("uniform",)), progress=ProgressBar())
    assert "search B=4: 100%" in capsys.readouterr().err


def test_racing_retires_starts_that_fall_behind(objective):
    raced = search_policy(objective, 4, fast(sa_iterations=60, race_margin=0.0))
    retired = [s for s in raced.starts if s["retired_at"] is not None]
    checks = range(SA_CHUNK, 60, SA_CHUNK)
    assert retired and all(s["retired_at"] in checks and s["retired_at"] >= 60 * RACE_FROM for s in retired)
    assert all(s["hc_rounds"] == 0 for s in retired)
    assert raced.loss == min(s["final_loss"] for s in raced.starts)
    survivors = {s["start"] for s in raced.starts if s["retired_at"] is None}
    assert set(raced.history[raced.history.phase == "hc"].start) <= survivors


def test_extra_starts_and_trivial_budgets(objective):
    teacache_like = [True, True, False, False, False, False, False, False, False, True, False, False]
    result = search_policy(objective, 3, fast(starts=("uniform",)), extra_starts={"teacache": teacache_like})
    assert [s["start"] for s in result.starts] == ["uniform", "teacache"]
    assert result.starts[1]["initial_mask"] == teacache_like
    full = search_policy(objective, STEPS, FAST)
    assert full.mask == [True] * STEPS and full.loss == pytest.approx(0.0, abs=1e-10)
    only_forced = search_policy(objective, 2, fast(forced=(0, 5), starts=("dp", "random")))
    assert [i for i, m in enumerate(only_forced.mask) if m] == [0, 5]


def test_bad_search_inputs_are_refused(objective):
    with pytest.raises(SearchSetupError, match="exceeds"):
        search_policy(objective, STEPS + 1, FAST)
    with pytest.raises(SearchSetupError, match="do not fit"):
        search_policy(objective, 2, fast(forced=(0, 3, 5)))
    with pytest.raises(SearchSetupError, match="unknown start"):
        search_policy(objective, 3, fast(starts=("best",)))
    with pytest.raises(SearchSetupError, match="computes 4 steps"):
        search_policy(objective, 3, FAST, extra_starts={"x": uniform_mask(STEPS, 4)})
    with pytest.raises(SearchSetupError, match="forced"):
        search_policy(objective, 3, fast(forced=(0, 1)), extra_starts={"x": uniform_mask(STEPS, 3)})
