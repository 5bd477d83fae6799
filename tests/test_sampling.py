"""Captured states must let the search resume a rollout without changing its result."""

from __future__ import annotations

import pytest
import torch

from budcache_pipeline import CachePolicy, enable_budcache
from budcache_pipeline.models.flux import flux_default_sigmas, prepare_batch
from budcache_pipeline.policy import uniform_mask
from budcache_pipeline.sampling import rollout

STEPS, SIZE = 28, 64


class TinyPromptEncoder:
    """Stands in for FluxPipeline's text encoders: deterministic embeddings per prompt."""

    def __init__(self, pipe):
        self.pipe = pipe

    def __call__(self, prompt, device=None):
        rows = [torch.Generator().manual_seed(sum(map(ord, p))) for p in prompt]
        embeds = torch.stack([torch.randn(8, 32, generator=g) for g in rows])
        pooled = torch.stack([torch.randn(32, generator=g) for g in rows])
        return embeds, pooled, torch.zeros(8, 3)


@pytest.fixture
def batch(flux_pipe):
    flux_pipe.encode_prompt = TinyPromptEncoder(flux_pipe)
    return prepare_batch(flux_pipe, ["a seven", "a three", "a one"], [0, 1, 2], SIZE, SIZE)


def test_resume_from_any_captured_step_equals_the_full_rollout(flux_pipe, batch):
    sigmas = torch.tensor(flux_default_sigmas(flux_pipe, STEPS, SIZE, SIZE))
    runtime = enable_budcache(flux_pipe.transformer, CachePolicy.uniform(STEPS, 7, sigmas=sigmas.tolist()))
    full = rollout(batch.denoiser, runtime, batch.noise, sigmas, capture=range(1, STEPS))
    for k in (1, 5, 13, 27):
        resumed = rollout(batch.denoiser, runtime, batch.noise, sigmas, start=full.states[k])
        assert torch.equal(resumed.final, full.final)
        assert resumed.computed_steps == 7


def test_a_prefix_state_serves_every_mask_that_shares_the_prefix(flux_pipe, batch):
    sigmas = torch.tensor(flux_default_sigmas(flux_pipe, STEPS, SIZE, SIZE))
    first = uniform_mask(STEPS, 7)
    second = first[:10] + [False] * 8 + [True] * 4 + [False] * 6
    runtime = enable_budcache(flux_pipe.transformer, CachePolicy(mask=first, model_name="t", model_fingerprint="t", sigmas=sigmas.tolist()))
    shared = rollout(batch.denoiser, runtime, batch.noise, sigmas, capture=[10]).states[10]
    direct = rollout(batch.denoiser, runtime, batch.noise, sigmas, mask=second)
    resumed = rollout(batch.denoiser, runtime, batch.noise, sigmas, mask=second, start=shared)
    assert torch.equal(direct.final, resumed.final)
    assert resumed.computed_steps == sum(second)


def test_rollout_is_differentiable_in_the_sigmas(flux_pipe, batch):
    sigmas = torch.tensor(flux_default_sigmas(flux_pipe, STEPS, SIZE, SIZE), requires_grad=True)
    runtime = enable_budcache(flux_pipe.transformer, CachePolicy.uniform(STEPS, 5, sigmas=sigmas.tolist()))
    loss = rollout(batch.denoiser, runtime, batch.noise, sigmas).final.pow(2).mean()
    loss.backward()
    assert torch.isfinite(sigmas.grad).all() and sigmas.grad.abs().sum() > 0


def test_bad_resume_points_and_batches_are_rejected(flux_pipe, batch):
    sigmas = torch.tensor(flux_default_sigmas(flux_pipe, STEPS, SIZE, SIZE))
    runtime = enable_budcache(flux_pipe.transformer, CachePolicy.uniform(STEPS, 7, sigmas=sigmas.tolist()))
    with pytest.raises(ValueError, match="mask has 28 steps but sigmas describe 10"):
        rollout(batch.denoiser, runtime, batch.noise, sigmas[-11:])
    with pytest.raises(ValueError, match="one seed per prompt"):
        prepare_batch(flux_pipe, ["a", "b"], [0], SIZE, SIZE)


def test_plain_rollout_equals_a_full_budget_policy(flux_pipe, batch):
    sigmas = torch.tensor(flux_default_sigmas(flux_pipe, STEPS, SIZE, SIZE))
    plain = rollout(batch.denoiser, None, batch.noise, sigmas)
    runtime = enable_budcache(flux_pipe.transformer, CachePolicy.uniform(STEPS, STEPS, sigmas=sigmas.tolist()))
    assert torch.equal(rollout(batch.denoiser, runtime, batch.noise, sigmas).final, plain.final)
    with pytest.raises(ValueError, match="needs a BudCache runtime"):
        rollout(batch.denoiser, None, batch.noise, sigmas, mask=[True] * STEPS)
