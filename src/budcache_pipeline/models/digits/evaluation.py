"""Figures for the digits model: does it draw the digit it is asked for, and how close to real digits."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from budcache_pipeline.models.digits.quality import digits_fid, judge_agreement
from budcache_pipeline.models.digits.captions import prompt_for_digit
from budcache_pipeline.models.digits.data import SPLIT_SEED, holdout_images
from budcache_pipeline.models.digits.judge import Judge
from budcache_pipeline.models.digits.pipeline import DigitsFluxPipeline

FID_SEED_OFFSET = 10_000


def agreement_pairs(count: int = 100, seed_offset: int = 0) -> list[tuple[str, int, int]]:
    """(prompt, digit, seed) triples: digits balanced, wordings and seeds varied, always the same list."""
    return [(prompt_for_digit(i % 10, variant=i), i % 10, seed_offset + i) for i in range(count)]


def generate_images(
    pipe: DigitsFluxPipeline,
    prompts: list[str],
    seeds: list[int],
    num_inference_steps: int = 28,
    sigmas: list[float] | None = None,
    batch_size: int = 128,
) -> torch.Tensor:
    """(B, 1, H, W) images in [0, 1]; image i depends only on (prompts[i], seeds[i]), not on batching."""
    if len(prompts) != len(seeds):
        raise ValueError("need one seed per prompt")
    chunks = []
    for first in range(0, len(prompts), batch_size):
        chunk_seeds = seeds[first : first + batch_size]
        chunks.append(
            pipe(
                prompt=prompts[first : first + batch_size],
                num_inference_steps=num_inference_steps,
                sigmas=sigmas,
                generator=[torch.Generator().manual_seed(seed) for seed in chunk_seeds],
                output_type="pt",
            ).images
        )
    return torch.cat(chunks).cpu()


def fid_reference_halves() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Held-out real digits split in two stratified halves: (reference images, other half, its labels)."""
    images, labels = holdout_images()
    reference, other = train_test_split(
        np.arange(len(labels)), test_size=0.5, random_state=SPLIT_SEED, stratify=labels.numpy()
    )
    other_index = torch.from_numpy(np.sort(other))
    return images[torch.from_numpy(np.sort(reference))], images[other_index], labels[other_index]


def evaluate_pipeline(
    pipe: DigitsFluxPipeline,
    judge: Judge,
    num_inference_steps: int = 28,
    sigmas: list[float] | None = None,
    count: int = 100,
) -> dict[str, float]:
    """Judge agreement on `count` (prompt, seed) pairs and FID against held-out real digits.

    FID(generated, real half A) is reported beside FID(real half B, real half A): the floor that
    sampling noise alone gives at this sample size. Generated images follow half B's labels.
    """
    prompts, digits, seeds = zip(*agreement_pairs(count))
    images = generate_images(pipe, list(prompts), list(seeds), num_inference_steps, sigmas)
    reference, other, other_labels = fid_reference_halves()
    fid_prompts = [prompt_for_digit(int(d), variant=i) for i, d in enumerate(other_labels)]
    fid_seeds = [FID_SEED_OFFSET + i for i in range(len(fid_prompts))]
    generated = generate_images(pipe, fid_prompts, fid_seeds, num_inference_steps, sigmas)
    return {
        "num_inference_steps": num_inference_steps,
        "judge_agreement": judge_agreement(images, list(digits), judge),
        "judge_agreement_fid_set": judge_agreement(generated, other_labels, judge),
        "fid_generated_vs_real": digits_fid(generated, reference, judge),
        "fid_real_vs_real": digits_fid(other, reference, judge),
        "fid_samples": len(generated),
    }
