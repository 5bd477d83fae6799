"""scikit-learn's 8x8 digits at the generator's resolution, and the fixed split the judge trains on."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

IMAGE_SIZE = 16
JUDGE_HOLDOUT_FRACTION = 0.3
SPLIT_SEED = 0


def digit_images(size: int = IMAGE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as (N, 1, size, size) floats in [0, 1] (bilinear upsampling) and (N,) labels."""
    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False).clamp(0.0, 1.0)
    return images, torch.from_numpy(digits.target.astype(np.int64))


def judge_split(labels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (train, holdout) index arrays: the judge trains on the first, metrics use the second."""
    indices = np.arange(len(labels))
    train, holdout = train_test_split(
        indices, test_size=JUDGE_HOLDOUT_FRACTION, random_state=SPLIT_SEED, stratify=labels.numpy()
    )
    return np.sort(train), np.sort(holdout)


def holdout_images(size: int = IMAGE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """The real images the judge never trained on: the reference set for FID and judge accuracy."""
    images, labels = digit_images(size)
    _, holdout = judge_split(labels)
    index = torch.from_numpy(holdout)
    return images[index], labels[index]
