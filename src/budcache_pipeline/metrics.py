"""Model-free quality metrics for cached rollouts: latent MSE (the search objective), PSNR/SSIM, FID.

FID uses torchmetrics' implementation with a feature network the model's adapter supplies (the
default model's is its judge's penultimate layer), because torchvision and the Inception weights
are not available here.
"""

from __future__ import annotations

import torch
from torch import nn
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
from torchmetrics.image.fid import FrechetInceptionDistance

FID_BATCH = 256


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.shape != y.shape:
        raise ValueError(f"shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
    if x.ndim < 2:
        raise ValueError(f"expected a batch of at least 2-d tensors, got shape {tuple(x.shape)}")


def latent_mse(latents: torch.Tensor, reference: torch.Tensor, per_sample: bool = False) -> torch.Tensor:
    """Mean squared error between final latents: a scalar, or one value per sample with `per_sample`."""
    _check_pair(latents, reference)
    squared = (latents.float() - reference.float()).pow(2).flatten(1)
    return squared.mean(dim=1) if per_sample else squared.mean()


def psnr(images: torch.Tensor, reference: torch.Tensor, data_range: float = 1.0) -> float:
    """Mean over images of per-image PSNR in dB (inf when every image matches exactly)."""
    _check_pair(images, reference)
    dims = tuple(range(1, images.ndim))
    values = peak_signal_noise_ratio(
        images.float(), reference.float(), data_range=data_range, reduction="none", dim=dims
    )
    return values.mean().item()


def ssim(images: torch.Tensor, reference: torch.Tensor, data_range: float = 1.0) -> float:
    """Mean SSIM of (B, C, H, W) images against their references (Gaussian window, sigma 1.5)."""
    _check_pair(images, reference)
    if images.ndim != 4:
        raise ValueError(f"SSIM needs (B, C, H, W) images, got shape {tuple(images.shape)}")
    return structural_similarity_index_measure(images.float(), reference.float(), data_range=data_range).item()


def frechet_distance(generated: torch.Tensor, real: torch.Tensor, feature: nn.Module) -> float:
    """FID between two image sets through torchmetrics, with `feature` as the embedding network.

    `feature` receives the images exactly as given (torchmetrics does not rescale them for a custom
    module) and should expose `num_features`.
    """
    if len(generated) < 2 or len(real) < 2:
        raise ValueError("FID needs at least two images in each set")
    metric = FrechetInceptionDistance(feature=feature, normalize=True)
    for first in range(0, len(real), FID_BATCH):
        metric.update(real[first : first + FID_BATCH], real=True)
    for first in range(0, len(generated), FID_BATCH):
        metric.update(generated[first : first + FID_BATCH], real=False)
    return metric.compute().item()
