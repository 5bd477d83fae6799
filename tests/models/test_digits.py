"""The embedded default model: shipped weights, FluxPipeline-shaped calls, prompt handling, training."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import FirstBlockCacheConfig
from PIL import Image

from budcache_pipeline.models.digits.quality import digits_fid, judge_agreement
from budcache_pipeline.models.digits import (
    DigitsFluxPipeline,
    load_default_judge,
    load_default_pipeline,
    train_default_model,
)
from budcache_pipeline.models.digits.captions import NUMBER_WORDS, captions_for_labels
from budcache_pipeline.models.digits.evaluation import agreement_pairs, fid_reference_halves, generate_images
from budcache_pipeline.models.digits.pipeline import DEFAULT_WEIGHTS_DIR
from budcache_pipeline.models.digits.text_encoder import DigitsTokenizer, build_vocab


@pytest.fixture(scope="module")
def pipe() -> DigitsFluxPipeline:
    pipeline = load_default_pipeline()
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _latents(pipe: DigitsFluxPipeline, prompt: str = "a handwritten seven", steps: int = 6, seed: int = 0, **kwargs):
    generator = torch.Generator().manual_seed(seed)
    return pipe(prompt=prompt, num_inference_steps=steps, generator=generator, output_type="latent", **kwargs).images


@pytest.mark.slow
def test_shipped_model_loads_offline_in_a_fresh_process() -> None:
    code = (
        "from budcache_pipeline.models import load_default_pipeline\n"
        "pipe = load_default_pipeline()\n"
        "print(type(pipe).__name__, type(pipe.transformer).__name__, pipe.scheduler.config.shift)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["DigitsFluxPipeline", "FluxTransformer2DModel", "3.0"]


def test_shipped_weights_are_small() -> None:
    total = sum(path.stat().st_size for path in DEFAULT_WEIGHTS_DIR.rglob("*") if path.is_file())
    assert total <= 20 * 1024 * 1024


def test_model_is_a_small_flux_transformer(pipe: DigitsFluxPipeline) -> None:
    config = pipe.transformer.config
    assert (config.num_layers, config.num_single_layers, config.in_channels) == (1, 2, 4)
    assert config.guidance_embeds is False
    assert sum(config.axes_dims_rope) == config.attention_head_dim
    assert sum(p.numel() for p in pipe.transformer.parameters()) < 500_000
    assert pipe.scheduler.config.use_dynamic_shifting is False


@pytest.mark.parametrize(
    ("output_type", "check"),
    [
        ("pt", lambda im: isinstance(im, torch.Tensor) and im.shape == (2, 1, 16, 16)),
        ("np", lambda im: isinstance(im, np.ndarray) and im.shape == (2, 16, 16, 1)),
        ("pil", lambda im: len(im) == 2 and all(isinstance(i, Image.Image) and i.size == (16, 16) for i in im)),
        ("latent", lambda im: isinstance(im, torch.Tensor) and im.shape == (2, 64, 4)),
    ],
)
def test_output_types(pipe: DigitsFluxPipeline, output_type: str, check) -> None:
    images = pipe(prompt=["the digit 1", "two"], num_inference_steps=2, output_type=output_type).images
    assert check(images)


def test_pt_images_are_decoded_latents_in_unit_range(pipe: DigitsFluxPipeline) -> None:
    latents = _latents(pipe)
    generator = torch.Generator().manual_seed(0)
    images = pipe(prompt="a handwritten seven", num_inference_steps=6, generator=generator, output_type="pt").images
    assert torch.equal(images, pipe.decode_latents(latents, 16, 16))
    assert images.min() >= 0.0 and images.max() <= 1.0


def test_same_seed_same_image_and_batching_does_not_change_images(pipe: DigitsFluxPipeline) -> None:
    single = [_latents(pipe, seed=seed) for seed in (3, 4)]
    batched = pipe(
        prompt="a handwritten seven",
        num_inference_steps=6,
        num_images_per_prompt=2,
        generator=[torch.Generator().manual_seed(seed) for seed in (3, 4)],
        output_type="latent",
    ).images
    assert torch.allclose(torch.cat(single), batched, atol=1e-5)
    assert torch.equal(_latents(pipe, seed=3), single[0])


def test_prompt_embeds_give_the_same_result_as_the_prompt(pipe: DigitsFluxPipeline) -> None:
    embeds, pooled, text_ids = pipe.encode_prompt("number four, written by hand")
    assert embeds.shape == (1, pipe.tokenizer.max_length, pipe.transformer.config.joint_attention_dim)
    assert pooled.shape == (1, pipe.transformer.config.pooled_projection_dim)
    assert torch.equal(text_ids, torch.zeros(pipe.tokenizer.max_length, 3))
    generator = torch.Generator().manual_seed(1)
    from_embeds = pipe(
        prompt_embeds=embeds,
        pooled_prompt_embeds=pooled,
        num_inference_steps=6,
        generator=generator,
        output_type="latent",
    ).images
    assert torch.equal(from_embeds, _latents(pipe, "number four, written by hand", seed=1))


def test_call_is_the_flux_euler_rollout_on_the_shifted_schedule(pipe: DigitsFluxPipeline) -> None:
    steps, shift = 6, pipe.scheduler.config.shift
    embeds, pooled, text_ids = pipe.encode_prompt("the digit 3")
    generator = torch.Generator().manual_seed(0)
    x, img_ids = pipe.prepare_latents(1, 1, 16, 16, torch.float32, torch.device("cpu"), generator)
    base = np.linspace(1.0, 1.0 / steps, steps)
    sigmas = [*(shift * base / (1 + (shift - 1) * base)), 0.0]
    with torch.no_grad():
        for i in range(steps):
            v = pipe.transformer(
                hidden_states=x,
                timestep=torch.tensor([sigmas[i]], dtype=torch.float32),
                pooled_projections=pooled,
                encoder_hidden_states=embeds,
                txt_ids=text_ids,
                img_ids=img_ids,
                return_dict=False,
            )[0]
            x = x + (sigmas[i + 1] - sigmas[i]) * v
    assert torch.allclose(_latents(pipe, "the digit 3", steps=steps), x, atol=1e-4)
    assert torch.allclose(pipe.scheduler.sigmas, torch.tensor(sigmas, dtype=torch.float32), atol=1e-6)


def test_explicit_default_sigmas_match_the_default_schedule(pipe: DigitsFluxPipeline) -> None:
    sigmas = list(np.linspace(1.0, 1.0 / 6, 6))
    assert torch.equal(_latents(pipe, sigmas=sigmas), _latents(pipe))


def test_diffusers_first_block_cache_hooks_run_on_the_pipeline(pipe: DigitsFluxPipeline) -> None:
    reference = _latents(pipe, steps=10)
    try:
        pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.0))
        never_cached = _latents(pipe, steps=10)
        pipe.transformer.disable_cache()
        pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=10.0))
        always_cached = _latents(pipe, steps=10)
    finally:
        pipe.transformer.disable_cache()
    assert torch.allclose(never_cached, reference, atol=1e-5)
    assert not torch.allclose(always_cached, reference, atol=1e-2)


def test_unknown_words_do_not_crash(pipe: DigitsFluxPipeline) -> None:
    tokenizer = pipe.tokenizer
    ids = tokenizer("a fluorescent xylophone seven!")
    assert ids.shape == (1, tokenizer.max_length)
    a, seven = tokenizer.encode("a")[0], tokenizer.encode("seven")[0]
    assert ids[0, :4].tolist() == [a, tokenizer.unk_id, tokenizer.unk_id, seven]
    images = pipe(prompt="ZEBRA quantum 7 ☃", num_inference_steps=2, output_type="pt").images
    assert torch.isfinite(images).all()


def test_long_prompts_are_truncated(pipe: DigitsFluxPipeline) -> None:
    ids = pipe.tokenizer(" ".join(["seven"] * 50))
    assert ids.shape == (1, pipe.tokenizer.max_length) and (ids != pipe.tokenizer.pad_id).all()


@pytest.mark.parametrize("prompt", ["", "   ", "\n\t", "!!! ..."])
def test_empty_prompt_is_a_clear_error(pipe: DigitsFluxPipeline, prompt: str) -> None:
    with pytest.raises(ValueError, match="prompt"):
        pipe(prompt=prompt, num_inference_steps=2)
    with pytest.raises(ValueError, match="prompt"):
        pipe(prompt=["seven", prompt], num_inference_steps=2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "prompt"),
        ({"prompt": "seven", "prompt_embeds": torch.zeros(1, 10, 32)}, "not both"),
        ({"prompt_embeds": torch.zeros(1, 10, 32)}, "pooled_prompt_embeds"),
        ({"prompt": "seven", "height": 15}, "even"),
        ({"prompt": "seven", "output_type": "jpeg"}, "output_type"),
        ({"prompt": 7}, "string"),
    ],
)
def test_bad_call_arguments_are_rejected(pipe: DigitsFluxPipeline, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        pipe(num_inference_steps=2, **kwargs)


def test_tokenizer_round_trips_through_its_folder(tmp_path) -> None:
    tokenizer = DigitsTokenizer(build_vocab(), max_length=7)
    tokenizer.save_pretrained(tmp_path)
    loaded = DigitsTokenizer.from_pretrained(tmp_path)
    assert loaded.vocab == tokenizer.vocab and loaded.max_length == 7
    assert torch.equal(loaded("the digit 5"), tokenizer("the digit 5"))


def test_captions_are_varied_deterministic_and_name_the_digit() -> None:
    labels = [7] * 40
    captions = captions_for_labels(labels, seed=0)
    assert captions == captions_for_labels(labels, seed=0)
    assert len(set(captions)) > 5
    for text in captions:
        words = text.replace(",", " ").split()
        assert "seven" in words or "7" in words
    assert captions_for_labels(labels, seed=1) != captions
    assert all(word in build_vocab() for word in NUMBER_WORDS)


@pytest.mark.slow
def test_prompts_are_drawn_as_the_named_digit(pipe: DigitsFluxPipeline) -> None:
    prompts, digits, seeds = zip(*agreement_pairs(100))
    images = generate_images(pipe, list(prompts), list(seeds), num_inference_steps=28)
    assert judge_agreement(images, list(digits), load_default_judge()) >= 0.9


@pytest.mark.slow
def test_few_step_sampling_has_worse_fid_than_28_steps(pipe: DigitsFluxPipeline) -> None:
    reference, _, other_labels = fid_reference_halves()
    prompts = [f"the digit {int(d)}" for d in other_labels]
    seeds = list(range(len(prompts)))
    fid_28 = digits_fid(generate_images(pipe, prompts, seeds, num_inference_steps=28), reference)
    fid_3 = digits_fid(generate_images(pipe, prompts, seeds, num_inference_steps=3), reference)
    assert fid_3 > fid_28


def test_training_smoke_run_is_seeded_and_writes_a_loadable_folder(tmp_path) -> None:
    reports = [
        train_default_model(tmp_path / name, steps=3, batch_size=8, progress=False, evaluate=False, judge_epochs=1)
        for name in ("a", "b")
    ]
    for name in ("a", "b"):
        folder = tmp_path / name
        assert (folder / "loss_curve.png").is_file() and (folder / "train_report.json").is_file()
        assert (folder / "judge" / "config.json").is_file()
    first, second = (DigitsFluxPipeline.from_pretrained(tmp_path / name) for name in ("a", "b"))
    for p, q in zip(first.transformer.parameters(), second.transformer.parameters()):
        assert torch.equal(p, q)
    assert reports[0]["final_loss_mean_100"] == reports[1]["final_loss_mean_100"]
    first.set_progress_bar_config(disable=True)
    assert first(prompt="seven", num_inference_steps=2, output_type="pt").images.shape == (1, 1, 16, 16)


@pytest.mark.parametrize("fraction", [0.0, -0.5, 1.5])
def test_guided_fraction_outside_zero_one_is_refused(fraction: float) -> None:
    from budcache_pipeline.models.digits.data import digit_images
    from budcache_pipeline.models.digits.train import build_pipeline, train_generator

    images, labels = digit_images()
    with pytest.raises(ValueError, match="guided_fraction"):
        train_generator(build_pipeline(0), images[:8], labels[:8], steps=1, batch_size=8, guided_fraction=fraction)
