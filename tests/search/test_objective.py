"""Prefix reuse and memoisation must not change a single loss; batching candidates only its last bits.

A mask computed in the same batch composition gives the same bits (prefix reuse resumes a
state computed in the same rows); stacked with other candidates in one forward, or on a
subset's fewer rows, it is the same loss within LOSS_RELATIVE_TOLERANCE (README, "Determinism").
"""

from __future__ import annotations

import pytest
import torch

from budcache_pipeline import CachePolicy, disable_budcache, enable_budcache
from budcache_pipeline.caching import get_runtime
from budcache_pipeline.policy import uniform_mask
from budcache_pipeline.sampling import rollout
from budcache_pipeline.search import MaskObjective, latent_mse_per_sample
from tests.search.conftest import STEPS, close, random_mask


@pytest.mark.parametrize("forecast", ["reuse", "linear"])
def test_prefix_reuse_gives_the_losses_of_full_rollouts(adapter, reference, forecast):
    reusing = MaskObjective(adapter, reference, max_cached_states=64, forecast=forecast)
    fresh = MaskObjective(adapter, reference, max_cached_states=0, forecast=forecast)
    generator = torch.Generator().manual_seed(0)
    base = uniform_mask(STEPS, 5)
    masks = [base]
    for _ in range(12):
        mask = list(masks[-1])
        on = [i for i in range(1, STEPS) if mask[i]]
        off = [i for i in range(STEPS) if not mask[i]]
        mask[on[int(torch.randint(len(on), (1,), generator=generator))]] = False
        mask[off[int(torch.randint(len(off), (1,), generator=generator))]] = True
        masks.append(mask)
    masks += [random_mask(STEPS, b, generator) for b in (3, 6, 9)]
    for mask in masks:
        assert reusing(mask) == fresh(mask)
        assert torch.equal(reusing.final_latents(mask), fresh.final_latents(mask))
    assert reusing.stats["block_stack_calls"] < 0.8 * reusing.stats["block_stack_calls_naive"]
    assert fresh.stats["block_stack_calls"] == fresh.stats["block_stack_calls_naive"]
    assert len(reusing.prefix_store) <= 64
    assert get_runtime(adapter.transformer) is None, "hooks are only on the transformer during an evaluation"


def test_prefix_reuse_runs_each_distinct_computed_prefix_exactly_once(adapter, reference):
    objective = MaskObjective(adapter, reference, max_cached_states=10_000, forecast="linear")
    generator = torch.Generator().manual_seed(2)
    masks = [random_mask(STEPS, b, generator) for b in (3, 4, 4, 5, 7, 9)]
    for mask in masks[:3]:
        objective(mask)
    objective.evaluate_many(masks[3:])
    keys = ["".join("1" if m else "0" for m in mask) for mask in masks]
    computed_prefixes = {key[: i + 1] for key in keys for i, bit in enumerate(key) if bit == "1"}
    assert objective.stats["block_stack_calls"] == len(computed_prefixes)
    assert objective.stats["block_stack_calls_naive"] == sum(key.count("1") for key in keys)


def test_a_screening_subset_keeps_as_many_rows_of_states(objective):
    sub = objective.subset(3)
    assert sub.max_cached_states * len(sub) == objective.max_cached_states * len(objective)


def test_losses_are_memoised_by_mask(objective):
    mask = uniform_mask(STEPS, 4)
    first = objective(mask)
    evaluations = objective.stats["evaluations"]
    assert objective(tuple(mask)) == first
    assert objective.stats["evaluations"] == evaluations and objective.stats["memo_hits"] == 1
    assert objective.known(mask) == first and objective.known(uniform_mask(STEPS, 5)) is None


def test_full_budget_has_zero_loss_against_its_own_reference(objective):
    assert objective([True] * STEPS) == pytest.approx(0.0, abs=1e-10)
    assert objective(uniform_mask(STEPS, 3)) > 0


def test_pluggable_loss_and_subsets(adapter, reference):
    l1 = MaskObjective(adapter, reference, loss=lambda a, b: (a - b).abs().flatten(1).mean(1))
    mse = MaskObjective(adapter, reference, loss=latent_mse_per_sample)
    mask = uniform_mask(STEPS, 4)
    assert l1(mask) != mse(mask)
    sub = mse.subset(3)
    assert len(sub) == 3 and sub.reference.prompts == reference.prompts[0::2]
    assert mse.subset(3) is sub and mse.subset(len(reference)) is mse
    per_sample = latent_mse_per_sample(mse.final_latents(mask), reference.final)
    assert sub(mask) == close(float(per_sample[0::2].double().mean()))


def test_bad_masks_are_refused(objective):
    with pytest.raises(ValueError, match="entries"):
        objective([True] * (STEPS - 1))
    with pytest.raises(ValueError, match="step 0"):
        objective([False] + [True] * (STEPS - 1))


@pytest.mark.parametrize("forecast", ["reuse", "linear"])
def test_batched_candidates_equal_one_sampler_rollout_each(adapter, reference, forecast):
    objective = MaskObjective(adapter, reference, max_rows_per_forward=2 * len(reference), forecast=forecast)
    generator = torch.Generator().manual_seed(1)
    masks = [random_mask(STEPS, b, generator) for b in (2, 4, 4, 7, 11)] + [uniform_mask(STEPS, 4)] * 2
    losses = objective.evaluate_many(masks)
    assert losses[-1] == losses[-2] and objective.stats["memo_hits"] == 1
    sigmas = torch.tensor(reference.sigmas)
    for mask, loss in zip(masks, losses):
        policy = CachePolicy(
            mask=mask, model_name="t", model_fingerprint="t", sigmas=reference.sigmas, forecast=forecast
        )
        runtime = enable_budcache(adapter.transformer, policy)
        try:
            with torch.no_grad():
                final = rollout(objective.denoiser, runtime, objective.noise, sigmas).final
        finally:
            disable_budcache(adapter.transformer)
        assert loss == close(float(latent_mse_per_sample(final, reference.final).double().mean()))


def test_linear_forecast_scores_masks_differently_and_unknown_forecasts_are_refused(adapter, reference):
    reuse = MaskObjective(adapter, reference)
    linear = MaskObjective(adapter, reference, forecast="linear")
    two_computes_then_cached = [True, True] + [False] * (STEPS - 2)
    one_compute = [True] + [False] * (STEPS - 1)
    assert linear(two_computes_then_cached) != reuse(two_computes_then_cached)
    assert linear(one_compute) == reuse(one_compute), "with one computed residual there is no slope to follow"
    with pytest.raises(ValueError, match="unknown forecast 'cubic'"):
        MaskObjective(adapter, reference, forecast="cubic")
