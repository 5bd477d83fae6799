"""Teacher trajectories: batched, saved per batch, resumable, and refused when they do not fit."""

from __future__ import annotations

import json

import pytest
import torch

import budcache_pipeline.search.reference as reference_module
from budcache_pipeline import CachePolicy, disable_budcache, enable_budcache
from budcache_pipeline.search import MaskObjective, ReferenceSetError, ReferenceSet, compute_reference, load_reference
from tests.fakes import square, uncached_finals
from tests.search.conftest import PROMPTS, SEEDS, SIZE, STEPS, make_adapter


def test_reference_holds_the_uncached_rollout_of_every_pair(adapter, reference):
    conditioning, noise, sigmas, final = uncached_finals(adapter, PROMPTS, SEEDS, square(SIZE), STEPS)
    assert reference.sigmas == sigmas and len(reference) == len(PROMPTS)
    assert torch.equal(reference.noise, noise)
    assert all(torch.equal(reference.conditioning.rows[k], v) for k, v in conditioning.rows.items())
    assert torch.allclose(reference.final, final, rtol=1e-5, atol=1e-6)
    manifest = reference.manifest
    assert manifest["steps"] == STEPS and manifest["height"] == SIZE and manifest["count"] == len(PROMPTS)
    assert len(manifest["prompts_seeds_sha256"]) == 64


def test_saved_reference_loads_back_and_an_interrupted_run_resumes(adapter, reference, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = reference_module.rollout

    def failing_second_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(reference_module, "rollout", failing_second_batch)
    with pytest.raises(KeyboardInterrupt):
        compute_reference(adapter, PROMPTS, SEEDS, STEPS, square(SIZE), out_dir=tmp_path, batch_size=4, progress=False)
    with pytest.raises(ReferenceSetError, match="incomplete"):
        load_reference(tmp_path)
    calls["n"] = 10
    resumed = compute_reference(adapter, PROMPTS, SEEDS, STEPS, square(SIZE), out_dir=tmp_path, batch_size=4, progress=False)
    assert calls["n"] == 11, "only the missing batch is recomputed"
    loaded = load_reference(tmp_path)
    for got in (resumed, loaded):
        assert got.prompts == PROMPTS and got.seeds == SEEDS and got.sigmas == reference.sigmas
        assert torch.allclose(got.final, reference.final, rtol=1e-5, atol=1e-6)
        assert torch.equal(got.noise, reference.noise)
        assert torch.equal(got.conditioning.rows["prompt_embeds"], reference.conditioning.rows["prompt_embeds"])


def test_a_manifest_for_other_settings_is_refused(adapter, tmp_path):
    compute_reference(adapter, PROMPTS[:2], SEEDS[:2], STEPS, square(SIZE), out_dir=tmp_path, progress=False)
    with pytest.raises(ReferenceSetError, match="steps"):
        compute_reference(adapter, PROMPTS[:2], SEEDS[:2], STEPS + 1, square(SIZE), out_dir=tmp_path, progress=False)
    with pytest.raises(ReferenceSetError, match="prompts_seeds_sha256"):
        compute_reference(adapter, PROMPTS[:2], [7, 8], STEPS, square(SIZE), out_dir=tmp_path, progress=False)
    assert json.loads((tmp_path / "manifest.json").read_text())["seeds"] == SEEDS[:2]


def test_bad_inputs_are_refused(adapter, reference, tmp_path):
    with pytest.raises(ReferenceSetError, match="no prompts"):
        compute_reference(adapter, [], [], STEPS, square(SIZE), progress=False)
    with pytest.raises(ReferenceSetError, match="one seed per prompt"):
        compute_reference(adapter, ["a"], [0, 1], STEPS, square(SIZE), progress=False)
    with pytest.raises(ReferenceSetError, match="no reference"):
        load_reference(tmp_path)
    with pytest.raises(ReferenceSetError, match="empty"):
        ReferenceSet([], [], reference.sigmas, reference.noise[:0], reference.final[:0], reference.manifest)
    runtime_policy = CachePolicy.uniform(STEPS, STEPS, sigmas=reference.sigmas)
    enable_budcache(adapter.transformer, runtime_policy)
    try:
        with pytest.raises(ReferenceSetError, match="disable_budcache"):
            compute_reference(adapter, PROMPTS[:1], SEEDS[:1], STEPS, square(SIZE), progress=False)
    finally:
        disable_budcache(adapter.transformer)


def test_a_reference_of_another_model_is_refused(reference):
    other = make_adapter()
    other.transformer.norm_out.linear = torch.nn.Linear(64, 64)
    with pytest.raises(ReferenceSetError, match="fingerprint"):
        MaskObjective(other, reference)


def test_same_architecture_with_other_weights_is_caught_by_the_teacher_check(reference):
    retrained = make_adapter(seed=1)
    with pytest.raises(ReferenceSetError, match="other weights"):
        MaskObjective(retrained, reference).teacher_latents()


def test_a_model_that_outputs_nan_stops_the_run_naming_the_step_and_the_prompt(adapter, tmp_path, monkeypatch):
    real = adapter.velocity
    calls = {"n": 0}

    def nan_at_the_fifth_step_of_the_second_batch(conditioning, latents, timestep):
        calls["n"] += 1
        out = real(conditioning, latents, timestep)
        if calls["n"] == STEPS + 5:
            out = out.clone()
            out[1] = float("nan")
        return out

    monkeypatch.setattr(adapter, "velocity", nan_at_the_fifth_step_of_the_second_batch)
    with pytest.raises(ReferenceSetError, match=rf"NaN or inf at sampling step 5 of {STEPS} for \(prompt, seed\) "
                       rf"\[\('a nine', 3\)\]: check the weights, the dtype"):
        compute_reference(adapter, PROMPTS, SEEDS, STEPS, square(SIZE), out_dir=tmp_path, batch_size=2, progress=False)
    assert (tmp_path / "batch_00000.safetensors").is_file(), "the batch written before is kept"
    assert not (tmp_path / "batch_00001.safetensors").exists()
