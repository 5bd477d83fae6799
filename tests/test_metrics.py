"""Quality metrics: exact values where they are known, and FID features that notice degraded digits."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from budcache_pipeline.metrics import frechet_distance, latent_mse, psnr, ssim
from budcache_pipeline.models.digits.quality import digits_fid, judge_agreement
from budcache_pipeline.models.digits.data import digit_images, holdout_images, judge_split
from budcache_pipeline.models.digits.evaluation import fid_reference_halves
from budcache_pipeline.models.digits.judge import load_default_judge


def test_latent_mse_values_and_shapes() -> None:
    a = torch.zeros(3, 64, 4)
    b = torch.full((3, 64, 4), 0.5)
    b[2] = 1.0
    assert latent_mse(a, a).item() == 0.0
    assert latent_mse(a, b).item() == pytest.approx((0.25 * 2 + 1.0) / 3)
    assert latent_mse(a, b, per_sample=True).tolist() == [0.25, 0.25, 1.0]
    with pytest.raises(ValueError, match="shapes differ"):
        latent_mse(a, b[:2])


def test_psnr_and_ssim_on_known_pairs() -> None:
    images, _ = digit_images()
    images = images[:8]
    shifted = (images + 0.1).clamp(max=1.0)
    assert psnr(images, images) == math.inf
    assert psnr(images * 0 + 0.2, images * 0 + 0.3) == pytest.approx(20.0, abs=1e-4)
    assert ssim(images, images) == pytest.approx(1.0, abs=1e-6)
    assert ssim(shifted, images) < 1.0
    with pytest.raises(ValueError):
        psnr(images, images[:4])
    with pytest.raises(ValueError, match="SSIM"):
        ssim(images[:, 0], images[:, 0])


def test_judge_is_accurate_on_digits_it_never_trained_on() -> None:
    images, labels = holdout_images()
    _, holdout = judge_split(digit_images()[1])
    assert len(labels) == len(holdout)
    assert judge_agreement(images, labels) >= 0.95


def test_judge_split_is_fixed_and_disjoint() -> None:
    labels = digit_images()[1]
    train, holdout = judge_split(labels)
    again_train, again_holdout = judge_split(labels)
    assert (train == again_train).all() and (holdout == again_holdout).all()
    assert not set(train) & set(holdout) and len(train) + len(holdout) == len(labels)


def test_judge_agreement_rejects_mismatched_labels() -> None:
    images, labels = holdout_images()
    with pytest.raises(ValueError, match="one label per image"):
        judge_agreement(images[:5], labels[:4])


def test_judge_features_accept_uint8_and_float_alike() -> None:
    images, _ = holdout_images()
    features = load_default_judge().feature_extractor()
    as_uint8 = (images[:16] * 255).round().to(torch.uint8)
    assert features.num_features == features(images[:16]).shape[1]
    assert torch.allclose(features(as_uint8), features(as_uint8.float() / 255.0))
    with pytest.raises(ValueError, match="grayscale"):
        features(torch.rand(2, 3, 16, 16))


def test_fid_separates_degraded_digits_from_real_ones() -> None:
    reference, other, _ = fid_reference_halves()
    real_vs_real = digits_fid(other, reference)
    blurred = F.avg_pool2d(other, 3, stride=1, padding=1, count_include_pad=False)
    noisy = (other + 0.15 * torch.randn(other.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    # Measured with the shipped judge: real halves 45.1, blurred 80.8, noisy 81.0.
    assert digits_fid(blurred, reference) > 1.5 * real_vs_real
    assert digits_fid(noisy, reference) > 1.5 * real_vs_real
    assert digits_fid(reference, reference) == pytest.approx(0.0, abs=1e-2)


def test_frechet_distance_takes_any_feature_module() -> None:
    class MeanFeature(nn.Module):
        num_features = 2

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            flat = images.flatten(1)
            return torch.stack([flat.mean(1), flat.std(1)], dim=1)

    generator = torch.Generator().manual_seed(0)
    a = torch.rand(200, 1, 8, 8, generator=generator)
    b = torch.rand(200, 1, 8, 8, generator=generator) * 0.5
    assert frechet_distance(a, b, MeanFeature()) > frechet_distance(a, a.flip(0), MeanFeature())
    with pytest.raises(ValueError, match="two images"):
        frechet_distance(a[:1], b, MeanFeature())
