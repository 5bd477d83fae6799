"""The runtime must make a stock diffusers pipeline behave exactly as the policy says."""

from __future__ import annotations

import random

import pytest
import torch

from budcache_pipeline import CachePolicy, PolicyError, disable_budcache, enable_budcache
from budcache_pipeline.caching import BudCacheError, get_runtime
from budcache_pipeline.forecast_gains import ForecastGains, ForecastGainsError
from budcache_pipeline.models.adapter import BoundDenoiser, Conditioning, Size
from budcache_pipeline.models.flux import FluxAdapter
from budcache_pipeline.sampling import rollout
from tests.conftest import tiny_sd3_transformer

STEPS, SIZE = 28, 64


def flux_default_sigmas(pipe, steps, height, width):
    return FluxAdapter(pipe).default_sigmas(steps, Size(height, width))


def flux_denoiser(pipe, prompt_embeds, pooled, image_ids):
    """FLUX's transformer bound to these prompt tensors, called as FluxPipeline calls it."""
    conditioning = Conditioning(
        {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled},
        {"text_ids": torch.zeros(prompt_embeds.shape[1], 3), "latent_image_ids": image_ids},
    )
    return BoundDenoiser(FluxAdapter(pipe), conditioning)


def call_sigmas_for(pipe, sigmas):
    """The `sigmas=` FluxPipeline needs to run `sigmas` (the shift inverted)."""
    return FluxAdapter(pipe).schedule_kwargs(sigmas, Size(SIZE, SIZE))["sigmas"]


def random_mask(steps: int, budget: int, rng: random.Random) -> list[bool]:
    chosen = {0, *rng.sample(range(1, steps), budget - 1)}
    return [i in chosen for i in range(steps)]


def flux_inputs(batch: int = 2):
    torch.manual_seed(123)
    return torch.randn(batch, 8, 32), torch.randn(batch, 32)


def run_flux(pipe, sigmas=None, seeds=(0, 1), steps=STEPS):
    prompt_embeds, pooled = (t[list(seeds)] for t in flux_inputs())
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    return pipe(
        prompt_embeds=prompt_embeds,
        pooled_prompt_embeds=pooled,
        num_inference_steps=steps,
        sigmas=sigmas,
        height=SIZE,
        width=SIZE,
        generator=generators,
        output_type="latent",
    ).images


def run_wan(pipe, steps=10):
    torch.manual_seed(7)
    prompt_embeds, negative = torch.randn(2, 6, 32), torch.randn(2, 6, 32)
    return pipe(
        prompt_embeds=prompt_embeds,
        negative_prompt_embeds=negative,
        guidance_scale=4.0,
        num_inference_steps=steps,
        height=32,
        width=32,
        num_frames=5,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
    ).frames


def test_full_budget_equals_no_hook_on_flux(flux_pipe):
    reference = run_flux(flux_pipe)
    enable_budcache(flux_pipe, CachePolicy.uniform(STEPS, STEPS, sigmas=flux_default_sigmas(flux_pipe, STEPS, SIZE, SIZE)))
    assert torch.equal(run_flux(flux_pipe), reference)


def test_full_budget_equals_no_hook_on_wan_with_cfg(wan_pipe):
    reference = run_wan(wan_pipe)
    enable_budcache(wan_pipe, CachePolicy.uniform(10, 10))
    assert torch.equal(run_wan(wan_pipe), reference)


def test_wan_keeps_one_residual_per_cfg_context_and_counts_the_budget(wan_pipe):
    reference = run_wan(wan_pipe)
    runtime = enable_budcache(wan_pipe, CachePolicy.uniform(10, 4))
    cached = run_wan(wan_pipe)
    assert runtime.compute_counts() == {"cond": 4, "uncond": 4}
    assert not torch.equal(cached, reference)
    assert (cached - reference).abs().max() < reference.abs().max()


def sampler_rollout(pipe, policy, seeds=(0, 1)):
    """Our Euler rollout on the same inputs run_flux gives the pipeline."""
    prompt_embeds, pooled = (t[list(seeds)] for t in flux_inputs())
    latents = [pipe.prepare_latents(1, 4, SIZE, SIZE, torch.float32, "cpu", torch.Generator().manual_seed(s)) for s in seeds]
    noise, image_ids = torch.cat([lat for lat, _ in latents]), latents[0][1]
    denoiser = flux_denoiser(pipe, prompt_embeds, pooled, image_ids)
    runtime = enable_budcache(pipe.transformer, policy)
    try:
        return rollout(denoiser, runtime, noise, torch.tensor(policy.sigmas))
    finally:
        disable_budcache(pipe.transformer)


def test_stock_flux_pipeline_equals_our_sampler_for_random_masks(flux_pipe):
    sigmas = flux_default_sigmas(flux_pipe, STEPS, SIZE, SIZE)
    call_sigmas = call_sigmas_for(flux_pipe, sigmas)
    rng = random.Random(0)
    for _ in range(5):
        policy = CachePolicy(mask=random_mask(STEPS, 7, rng), model_name="tiny", model_fingerprint="x", sigmas=sigmas)
        runtime = enable_budcache(flux_pipe, policy)
        from_pipeline = run_flux(flux_pipe, sigmas=call_sigmas)
        assert runtime.compute_counts() == {"cond": 7}
        disable_budcache(flux_pipe)
        ours = sampler_rollout(flux_pipe, policy)
        assert ours.computed_steps == 7
        assert (ours.final - from_pipeline).abs().max().item() <= 1e-5


def test_linear_forecast_on_the_stock_pipeline_equals_our_sampler(flux_pipe):
    sigmas = flux_default_sigmas(flux_pipe, STEPS, SIZE, SIZE)
    call_sigmas = call_sigmas_for(flux_pipe, sigmas)
    rng = random.Random(1)
    for _ in range(3):
        mask = random_mask(STEPS, 7, rng)
        policy = CachePolicy(mask=mask, model_name="t", model_fingerprint="x", sigmas=sigmas, forecast="linear")
        runtime = enable_budcache(flux_pipe, policy)
        from_pipeline = run_flux(flux_pipe, sigmas=call_sigmas)
        assert runtime.compute_counts() == {"cond": 7}
        disable_budcache(flux_pipe)
        reuse = sampler_rollout(flux_pipe, CachePolicy(mask=mask, model_name="t", model_fingerprint="x", sigmas=sigmas))
        ours = sampler_rollout(flux_pipe, policy)
        assert (ours.final - from_pipeline).abs().max().item() <= 1e-5
        assert (ours.final - reuse.final).abs().max().item() > 1e-4, "the forecast must change cached steps"


def gains_changing(step: int, groups: int = 4) -> ForecastGains:
    """Identity gains except at `step`, where each channel group gets its own residual and slope gain."""
    residual = [[1.0] * groups for _ in range(STEPS)]
    slope = [[1.0] * groups for _ in range(STEPS)]
    residual[step] = [0.5 + 0.25 * g for g in range(groups)]
    slope[step] = [2.0 - 0.5 * g for g in range(groups)]
    return ForecastGains(residual, slope)


def test_forecast_gains_scale_a_cached_step_and_deploy_as_evaluated(flux_pipe):
    sigmas = flux_default_sigmas(flux_pipe, STEPS, SIZE, SIZE)
    mask = [i in (0, 3, 6, 14, 20) for i in range(STEPS)]
    plain = CachePolicy(mask=mask, model_name="t", model_fingerprint="x", sigmas=sigmas, forecast="linear")
    ones = CachePolicy(**{**plain.__dict__, "forecast_gains": ForecastGains.identity(STEPS, 4)})
    gained = CachePolicy(**{**plain.__dict__, "forecast_gains": gains_changing(9)})
    base = sampler_rollout(flux_pipe, plain)
    assert torch.equal(sampler_rollout(flux_pipe, ones).final, base.final), "gains of 1 change nothing"
    moved = sampler_rollout(flux_pipe, gained)
    assert (moved.final - base.final).abs().max().item() > 1e-4
    runtime = enable_budcache(flux_pipe, gained)
    from_pipeline = run_flux(flux_pipe, sigmas=call_sigmas_for(flux_pipe, sigmas))
    assert runtime.compute_counts() == {"cond": 5}
    disable_budcache(flux_pipe)
    assert (from_pipeline - moved.final).abs().max().item() <= 1e-5
    prompt_embeds, pooled = flux_inputs()
    latents, image_ids = flux_pipe.prepare_latents(2, 4, SIZE, SIZE, torch.float32, "cpu", torch.Generator().manual_seed(0))
    denoiser = flux_denoiser(flux_pipe, prompt_embeds, pooled, image_ids)
    captured = {}
    for name, policy in (("plain", plain), ("gained", gained)):
        runtime = enable_budcache(flux_pipe.transformer, policy)
        try:
            captured[name] = rollout(denoiser, runtime, latents, torch.tensor(sigmas), capture=(9, 10)).states
        finally:
            disable_budcache(flux_pipe.transformer)
    assert torch.equal(captured["plain"][9].latents, captured["gained"][9].latents), "steps before 9 are untouched"
    assert not torch.equal(captured["plain"][10].latents, captured["gained"][10].latents)


def test_gains_that_do_not_fit_the_model_are_refused(flux_pipe):
    sigmas = flux_default_sigmas(flux_pipe, STEPS, SIZE, SIZE)
    mask = [i in (0, 14) for i in range(STEPS)]
    with pytest.raises(PolicyError, match="'forecast_gains' has 27 rows but 'steps' is 28"):
        CachePolicy(mask=mask, model_name="t", model_fingerprint="x", sigmas=sigmas,
                    forecast_gains=ForecastGains.identity(27, 1))
    policy = CachePolicy(mask=mask, model_name="t", model_fingerprint="x", sigmas=sigmas,
                         forecast_gains=ForecastGains.identity(STEPS, 3))
    enable_budcache(flux_pipe, policy)
    try:
        with pytest.raises(ForecastGainsError, match="3 channel groups, which do not divide the block stack's width 32"):
            run_flux(flux_pipe, sigmas=call_sigmas_for(flux_pipe, sigmas))
    finally:
        disable_budcache(flux_pipe)


def test_linear_forecast_extrapolates_the_last_two_residuals_in_sigma(flux_pipe):
    sigmas = flux_default_sigmas(flux_pipe, STEPS, SIZE, SIZE)
    mask = [True, True, False] + [True] * (STEPS - 3)
    policy = CachePolicy(mask=mask, model_name="t", model_fingerprint="x", sigmas=sigmas, forecast="linear")
    prompt_embeds, pooled = flux_inputs()
    latents, image_ids = flux_pipe.prepare_latents(2, 4, SIZE, SIZE, torch.float32, "cpu", torch.Generator().manual_seed(0))
    denoiser = flux_denoiser(flux_pipe, prompt_embeds, pooled, image_ids)
    runtime = enable_budcache(flux_pipe.transformer, policy)
    try:
        states = rollout(denoiser, runtime, latents, torch.tensor(sigmas), capture=(1, 2, 3)).states
    finally:
        disable_budcache(flux_pipe.transformer)
    first, second, after_cached = (next(iter(states[k].cache.values())) for k in (1, 2, 3))
    assert first.slope_hidden is None, "one computed residual has no slope yet"
    expected = (second.residual_hidden - first.residual_hidden) / (sigmas[1] - sigmas[0])
    assert torch.allclose(second.slope_hidden, expected, rtol=1e-5, atol=1e-6)
    assert torch.allclose(second.residual_sigma, torch.full((2,), sigmas[1]))
    assert after_cached.residual_hidden is second.residual_hidden, "a cached step stores nothing new"


def test_cached_steps_run_no_block_but_still_run_norm_out_and_proj_out(flux_pipe, monkeypatch):
    transformer = flux_pipe.transformer
    calls = {"blocks": 0, "norm_out": 0, "proj_out": 0, "rotary": 0}
    rotary_forward = type(transformer.pos_embed).forward

    def counted_rotary(module, *args, **kwargs):
        calls["rotary"] += 1
        return rotary_forward(module, *args, **kwargs)

    monkeypatch.setattr(type(transformer.pos_embed), "forward", counted_rotary)

    def counter(key):
        def hook(*_):
            calls[key] += 1

        return hook

    for block in [*transformer.transformer_blocks, *transformer.single_transformer_blocks]:
        block.attn.register_forward_pre_hook(counter("blocks"))
    transformer.norm_out.register_forward_pre_hook(counter("norm_out"))
    transformer.proj_out.register_forward_pre_hook(counter("proj_out"))
    sigmas = flux_default_sigmas(flux_pipe, STEPS, SIZE, SIZE)
    enable_budcache(flux_pipe, CachePolicy.uniform(STEPS, 5, sigmas=sigmas))
    run_flux(flux_pipe, sigmas=call_sigmas_for(flux_pipe, sigmas))
    assert calls == {"blocks": 5 * 3, "norm_out": STEPS, "proj_out": STEPS, "rotary": 5}, (
        "only the blocks read the rotary tables, so cached steps skip them"
    )


def test_state_resets_between_generations_and_batches_are_independent(flux_pipe):
    sigmas = flux_default_sigmas(flux_pipe, STEPS, SIZE, SIZE)
    call_sigmas = call_sigmas_for(flux_pipe, sigmas)
    enable_budcache(flux_pipe, CachePolicy.uniform(STEPS, 7, sigmas=sigmas))
    first = run_flux(flux_pipe, sigmas=call_sigmas)
    second = run_flux(flux_pipe, sigmas=call_sigmas)
    alone = run_flux(flux_pipe, sigmas=call_sigmas, seeds=(1,))
    assert torch.equal(first, second)
    assert (first[1:] - alone).abs().max() <= 1e-5


def test_wrong_number_of_steps_is_a_clear_error(flux_pipe):
    enable_budcache(flux_pipe, CachePolicy.uniform(STEPS, 7))
    with pytest.raises(BudCacheError, match="runs 20 steps but the policy was built for 28"):
        run_flux(flux_pipe, steps=20)


def test_sigmas_that_differ_from_the_policy_are_a_clear_error(flux_pipe):
    sigmas = flux_default_sigmas(flux_pipe, STEPS, SIZE, SIZE)
    enable_budcache(flux_pipe, CachePolicy.uniform(STEPS, 7, sigmas=sigmas))
    with pytest.raises(BudCacheError, match="sigmas differ from the policy"):
        run_flux(flux_pipe, sigmas=sigmas[:-1])


def test_timestep_outside_the_schedule_is_a_clear_error(flux_pipe):
    sigmas = flux_default_sigmas(flux_pipe, STEPS, SIZE, SIZE)
    enable_budcache(flux_pipe.transformer, CachePolicy.uniform(STEPS, 7, sigmas=sigmas))
    prompt_embeds, pooled = flux_inputs(1)
    latents, image_ids = flux_pipe.prepare_latents(1, 4, SIZE, SIZE, torch.float32, "cpu", torch.Generator().manual_seed(0))
    with pytest.raises(BudCacheError, match="timestep 0.5 is not in the policy's schedule"):
        flux_pipe.transformer(
            hidden_states=latents,
            timestep=torch.tensor([0.5]),
            pooled_projections=pooled,
            encoder_hidden_states=prompt_embeds,
            txt_ids=torch.zeros(8, 3),
            img_ids=image_ids,
        )


def test_disable_restores_the_original_module(flux_pipe):
    reference = run_flux(flux_pipe)
    state = {k: v.clone() for k, v in flux_pipe.transformer.state_dict().items()}
    enable_budcache(flux_pipe, CachePolicy.uniform(STEPS, 5))
    assert not torch.equal(run_flux(flux_pipe), reference)
    disable_budcache(flux_pipe)
    assert get_runtime(flux_pipe) is None
    assert not any(hasattr(m, "_diffusers_hook") or "forward" in m.__dict__ for m in flux_pipe.transformer.modules())
    assert all(torch.equal(v, state[k]) for k, v in flux_pipe.transformer.state_dict().items())
    assert torch.equal(run_flux(flux_pipe), reference)


def test_enable_refuses_twice_and_bare_transformer_without_sigmas(flux_pipe):
    with pytest.raises(BudCacheError, match="no sigmas"):
        enable_budcache(flux_pipe.transformer, CachePolicy.uniform(STEPS, 7))
    enable_budcache(flux_pipe, CachePolicy.uniform(STEPS, 7))
    with pytest.raises(BudCacheError, match="already enabled"):
        enable_budcache(flux_pipe, CachePolicy.uniform(STEPS, 7))
    with pytest.raises(TypeError, match="expected a diffusers pipeline or transformer"):
        enable_budcache("not a model", CachePolicy.uniform(STEPS, 7))


def sd3_rollout(transformer, sigmas):
    torch.manual_seed(3)
    x = torch.randn(2, 4, 8, 8)
    prompt, pooled = torch.randn(2, 5, 16), torch.randn(2, 16)
    for i in range(len(sigmas) - 1):
        t = torch.full((2,), sigmas[i] * 1000)
        v = transformer(hidden_states=x, timestep=t, encoder_hidden_states=prompt, pooled_projections=pooled, return_dict=False)[0]
        x = x + (sigmas[i + 1] - sigmas[i]) * v
    return x


def test_sd3_transformer_full_budget_is_exact_and_cached_steps_count_the_budget():
    transformer = tiny_sd3_transformer()
    sigmas = [1.0 - i / 12 for i in range(12)] + [0.0]
    reference = sd3_rollout(transformer, sigmas)
    enable_budcache(transformer, CachePolicy.uniform(12, 12, sigmas=sigmas))
    assert torch.equal(sd3_rollout(transformer, sigmas), reference)
    disable_budcache(transformer)
    runtime = enable_budcache(transformer, CachePolicy.uniform(12, 4, sigmas=sigmas))
    cached = sd3_rollout(transformer, sigmas)
    assert runtime.compute_counts() == {"default": 4}
    assert torch.isfinite(cached).all() and not torch.equal(cached, reference)
