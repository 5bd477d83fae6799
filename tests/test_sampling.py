"""Captured states must let the search resume a rollout without changing its result."""

from __future__ import annotations

import pytest
import torch

from budcache_pipeline import CachePolicy, enable_budcache
from budcache_pipeline.models.adapter import BoundDenoiser
from budcache_pipeline.policy import uniform_mask
from budcache_pipeline.sampling import rollout
from tests.fakes import flux_adapter, square

STEPS, SIZE = 28, 64


@pytest.fixture
def adapter(flux_pipe):
    return flux_adapter(flux_pipe)


@pytest.fixture
def batch(adapter):
    conditioning, noise = adapter.prepare(["a seven", "a three", "a one"], [0, 1, 2], square(SIZE))
    return BoundDenoiser(adapter, conditioning), noise


@pytest.fixture
def sigmas(adapter):
    return torch.tensor(adapter.default_sigmas(STEPS, square(SIZE)))


def test_resume_from_any_captured_step_equals_the_full_rollout(adapter, batch, sigmas):
    denoiser, noise = batch
    runtime = enable_budcache(adapter.transformer, CachePolicy.uniform(STEPS, 7, sigmas=sigmas.tolist()))
    full = rollout(denoiser, runtime, noise, sigmas, capture=range(1, STEPS))
    for k in (1, 5, 13, 27):
        resumed = rollout(denoiser, runtime, noise, sigmas, start=full.states[k])
        assert torch.equal(resumed.final, full.final)
        assert resumed.computed_steps == 7


def test_a_prefix_state_serves_every_mask_that_shares_the_prefix(adapter, batch, sigmas):
    denoiser, noise = batch
    first = uniform_mask(STEPS, 7)
    second = first[:10] + [False] * 8 + [True] * 4 + [False] * 6
    policy = CachePolicy(mask=first, model_name="t", model_fingerprint="t", sigmas=sigmas.tolist())
    runtime = enable_budcache(adapter.transformer, policy)
    shared = rollout(denoiser, runtime, noise, sigmas, capture=[10]).states[10]
    direct = rollout(denoiser, runtime, noise, sigmas, mask=second)
    resumed = rollout(denoiser, runtime, noise, sigmas, mask=second, start=shared)
    assert torch.equal(direct.final, resumed.final)
    assert resumed.computed_steps == sum(second)


def test_rollout_is_differentiable_in_the_sigmas(adapter, batch, sigmas):
    denoiser, noise = batch
    sigmas = sigmas.clone().requires_grad_(True)
    runtime = enable_budcache(adapter.transformer, CachePolicy.uniform(STEPS, 5, sigmas=sigmas.tolist()))
    loss = rollout(denoiser, runtime, noise, sigmas).final.pow(2).mean()
    loss.backward()
    assert torch.isfinite(sigmas.grad).all() and sigmas.grad.abs().sum() > 0


def test_bad_resume_points_and_batches_are_rejected(adapter, batch, sigmas):
    denoiser, noise = batch
    runtime = enable_budcache(adapter.transformer, CachePolicy.uniform(STEPS, 7, sigmas=sigmas.tolist()))
    with pytest.raises(ValueError, match="mask has 28 steps but sigmas describe 10"):
        rollout(denoiser, runtime, noise, sigmas[-11:])
    with pytest.raises(ValueError, match="one seed per prompt"):
        adapter.prepare(["a", "b"], [0], square(SIZE))


def test_plain_rollout_equals_a_full_budget_policy(adapter, batch, sigmas):
    denoiser, noise = batch
    plain = rollout(denoiser, None, noise, sigmas)
    runtime = enable_budcache(adapter.transformer, CachePolicy.uniform(STEPS, STEPS, sigmas=sigmas.tolist()))
    assert torch.equal(rollout(denoiser, runtime, noise, sigmas).final, plain.final)
    with pytest.raises(ValueError, match="needs a BudCache runtime"):
        rollout(denoiser, None, noise, sigmas, mask=[True] * STEPS)
