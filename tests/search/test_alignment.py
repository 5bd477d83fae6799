"""Learned schedules stay valid, lower the loss, and deploy exactly through the runtime's hooks."""

from __future__ import annotations

import pytest
import torch

from budcache_pipeline import CachePolicy, disable_budcache, enable_budcache
from budcache_pipeline.policy import uniform_mask
from budcache_pipeline.sampling import rollout
from budcache_pipeline.search import (
    AlignmentResult,
    MaskObjective,
    accept_alignment,
    align_schedule,
    aligned_policy,
    holdout_losses,
)
from budcache_pipeline.search.alignment import anchors, sigmas_from_logits
from budcache_pipeline.search.tolerance import LOSS_RELATIVE_TOLERANCE
from budcache_pipeline.models.adapter import BoundDenoiser, Size
from tests.search.conftest import PROMPTS, SEEDS, SIZE, STEPS

MASK = [True, False, False, False, True, False, False, False, True, False, True, False]


def deployed_latents(adapter, policy: CachePolicy, conditioning, noise) -> torch.Tensor:
    """The stock pipeline's final latents under `policy`, on its own sigmas, with its compute steps checked."""
    size = Size(SIZE, SIZE)
    runtime = enable_budcache(adapter.pipe, policy)
    try:
        deployed = adapter.pipe(
            **adapter.pipeline_inputs(conditioning, noise, size),
            **adapter.schedule_kwargs(list(policy.sigmas), size),
            output_type="latent",
        ).images
        assert runtime.compute_counts() == {"cond": policy.budget}
    finally:
        disable_budcache(adapter.pipe)
    return deployed


def test_parameterisation_starts_at_the_reference_and_stays_monotone(reference):
    base = torch.tensor(reference.sigmas, dtype=torch.float64)
    logits = torch.log(base[:-1] - base[1:])
    for variant in ("full", "segment"):
        fixed = anchors(MASK, variant)
        assert torch.allclose(sigmas_from_logits(base, logits, fixed), base, atol=1e-12)
        noise = torch.randn(STEPS, generator=torch.Generator().manual_seed(0)) * 3
        moved = sigmas_from_logits(base, logits + noise, fixed)
        assert (moved[1:] < moved[:-1]).all() and moved[0] == base[0] and moved[-1] == 0
        assert torch.equal(moved[fixed], base[fixed])
    assert anchors(MASK, "segment") == [0, 4, 8, 10, STEPS]
    with pytest.raises(ValueError, match="variant"):
        anchors(MASK, "middle")


def test_alignment_lowers_the_loss_and_the_segment_variant_keeps_compute_sigmas(adapter, reference):
    full = align_schedule(adapter, reference, MASK, variant="full", iterations=4, lr=0.01, progress=False)
    segment = align_schedule(adapter, reference, MASK, variant="segment", iterations=4, lr=0.01, progress=False)
    for result in (full, segment):
        assert result.loss_after < result.loss_before and len(result.history) == 5
        assert result.sigmas[0] == reference.sigmas[0] and result.sigmas[-1] == 0
        assert all(b < a for a, b in zip(result.sigmas, result.sigmas[1:]))
        objective = MaskObjective(adapter, reference, sigmas=result.sigmas)
        assert objective(MASK) == pytest.approx(result.loss_after, rel=LOSS_RELATIVE_TOLERANCE)
    for i in anchors(MASK, "segment"):
        assert segment.sigmas[i] == pytest.approx(reference.sigmas[i], rel=1e-8)
    assert segment.sigmas != reference.sigmas and full.sigmas != reference.sigmas


def test_a_policy_with_aligned_sigmas_reproduces_the_sampler_on_the_stock_pipeline(adapter, reference):
    result = align_schedule(adapter, reference, MASK, iterations=2, lr=0.01, progress=False)
    assert result.improved
    policy = aligned_policy(CachePolicy(mask=MASK, model_name="tiny", model_fingerprint="x"), result)
    policy = CachePolicy.from_json(policy.to_json())
    assert list(policy.sigmas) == result.sigmas and policy.provenance["alignment"]["variant"] == "full"
    size = Size(SIZE, SIZE)
    conditioning, noise = adapter.prepare(PROMPTS[:2], SEEDS[:2], size)
    runtime = enable_budcache(adapter.transformer, policy)
    try:
        with torch.no_grad():
            ours = rollout(BoundDenoiser(adapter, conditioning), runtime, noise, torch.tensor(policy.sigmas)).final
    finally:
        disable_budcache(adapter.transformer)
    assert (deployed_latents(adapter, policy, conditioning, noise) - ours).abs().max().item() <= 1e-5


def test_alignment_is_kept_only_when_it_wins_on_held_out_pairs(adapter, reference):
    result = AlignmentResult(list(reference.sigmas), 2.0, 1.0, "full")
    assert accept_alignment(result, 1.0, 0.9)
    assert not accept_alignment(result, 1.0, 1.0)
    assert not accept_alignment(result, 1.0, 0.99, min_relative_gain=0.05)
    assert not accept_alignment(AlignmentResult(list(reference.sigmas), 1.0, 1.0, "full"), 1.0, 0.5)
    holdout = reference.subset([1, 3])
    before, after = holdout_losses(adapter, holdout, uniform_mask(STEPS, 4), reference.sigmas)
    assert before == after


def test_aligned_sigmas_deploy_exactly_on_the_default_pipeline():
    from budcache_pipeline.models.spec import load_adapter
    from budcache_pipeline.search import compute_reference

    default = load_adapter({"adapter": "digits"})
    size = Size(16, 16)
    prompts, seeds, steps = ["a handwritten seven", "the digit 2"], [11, 12], 10
    reference = compute_reference(default, prompts, seeds, steps, size, progress=False)
    mask = [True, False, False, True, False, False, False, True, False, True]
    result = align_schedule(default, reference, mask, iterations=2, lr=0.001, progress=False)
    assert result.improved and result.sigmas != reference.sigmas
    policy = aligned_policy(CachePolicy(mask=mask, model_name="digits", model_fingerprint="x"), result)
    objective = MaskObjective(default, reference, sigmas=list(policy.sigmas))
    sampled = objective.final_latents(mask)
    runtime = enable_budcache(default.pipe, policy)
    try:
        deployed = default.pipe(
            prompts,
            height=16,
            width=16,
            generator=[torch.Generator().manual_seed(s) for s in seeds],
            output_type="latent",
            **default.schedule_kwargs(list(policy.sigmas), size),
        ).images
        assert runtime.compute_counts() == {"cond": sum(mask)}
    finally:
        disable_budcache(default.pipe)
    assert (deployed - sampled).abs().max().item() <= 1e-5


def test_learned_forecast_gains_lower_the_loss_further_and_deploy_exactly(adapter, reference):
    sigmas_only = align_schedule(adapter, reference, MASK, iterations=4, lr=0.01, progress=False, forecast="linear")
    gained = align_schedule(adapter, reference, MASK, iterations=4, lr=0.01, progress=False, forecast="linear",
                            gain_channels=64)
    assert sigmas_only.gains is None
    assert gained.cost["forward_rollouts"] == 7 and gained.cost["backward_rollouts"] == 4
    assert gained.cost["calibration_rollouts"] == pytest.approx(sum(MASK) * (7 + 2 * 4) / STEPS)
    assert gained.cost["calibration_pairs"] == len(PROMPTS) and gained.cost["wall_seconds"] > 0
    assert gained.gains is not None and gained.gains.channels == 32, "gcd(64, the tiny model's width 32)"
    assert gained.gains.steps == STEPS and gained.loss_after < sigmas_only.loss_after < gained.loss_before
    objective = MaskObjective(adapter, reference, sigmas=gained.sigmas, forecast="linear", gains=gained.gains)
    assert objective(MASK) == pytest.approx(gained.loss_after, rel=LOSS_RELATIVE_TOLERANCE)
    before, after = holdout_losses(adapter, reference, MASK, gained.sigmas, "linear", gained.gains)
    assert before == pytest.approx(gained.loss_before, rel=LOSS_RELATIVE_TOLERANCE)
    assert after == pytest.approx(gained.loss_after, rel=LOSS_RELATIVE_TOLERANCE)
    policy = aligned_policy(CachePolicy(mask=MASK, model_name="tiny", model_fingerprint="x", forecast="linear"), gained)
    policy = CachePolicy.from_json(policy.to_json())
    assert policy.schema_version == 3 and policy.forecast_gains == gained.gains
    assert policy.provenance["alignment"]["gain_channels"] == 32
    conditioning, noise = adapter.prepare(PROMPTS, SEEDS, Size(SIZE, SIZE))
    deployed = deployed_latents(adapter, policy, conditioning, noise)
    assert (deployed - objective.final_latents(MASK)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("channels", [-1, 2.5, True, "64"])
def test_gain_channels_must_be_a_whole_number(adapter, reference, channels):
    with pytest.raises(ValueError, match="gain_channels must be an integer >= 0"):
        align_schedule(adapter, reference, MASK, iterations=1, progress=False, gain_channels=channels)
