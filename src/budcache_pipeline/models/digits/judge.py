"""An independent digit classifier: judges what the generator drew and gives FID its features.

Inception weights are not available offline, so FID on digits uses this network's penultimate layer,
small (64-d) and trained on these images, so that blur or broken strokes move the features.
"""

from __future__ import annotations

import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

DEFAULT_JUDGE_DIR = Path(__file__).resolve().parent / "weights" / "judge"


def _as_unit_float(images: torch.Tensor) -> torch.Tensor:
    """Accept uint8 [0, 255] or float [0, 1] images of shape (B, 1, H, W) or (B, H, W)."""
    if images.ndim == 3:
        images = images.unsqueeze(1)
    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"expected grayscale images (B, 1, H, W), got shape {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    return images.float()


class Judge(ModelMixin, ConfigMixin):
    """Small CNN on (B, 1, 16, 16) images in [0, 1]; `features` is the penultimate layer."""

    @register_to_config
    def __init__(self, image_size: int = 16, feature_dim: int = 64, num_classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        self.fc = nn.Linear(64 * (image_size // 4) ** 2, feature_dim)
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, feature_dim) penultimate activations; inputs are normalised to [-1, 1] here."""
        x = _as_unit_float(images).to(self.dtype)
        size = self.config.image_size
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        x = self.conv(x * 2.0 - 1.0)
        return F.relu(self.fc(x.flatten(1)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits (B, num_classes)."""
        return self.head(self.dropout(self.features(images)))

    @torch.no_grad()
    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """Predicted digit per image, (B,) long."""
        was_training = self.training
        self.eval()
        labels = self(images).argmax(dim=1)
        self.train(was_training)
        return labels

    def feature_extractor(self) -> JudgeFeatures:
        """This judge's features as a module for torchmetrics' `FrechetInceptionDistance(feature=...)`."""
        return JudgeFeatures(self)


class JudgeFeatures(nn.Module):
    """FID feature module: always in eval mode, no gradients, declares `num_features` for torchmetrics."""

    def __init__(self, judge: Judge) -> None:
        super().__init__()
        self.judge = judge
        self.num_features = int(judge.config.feature_dim)
        self.train(False)

    def train(self, mode: bool = True) -> JudgeFeatures:
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.judge.features(images)


def _shift_augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random translation by up to one pixel plus faint noise, so the judge tolerates generator jitter."""
    height, width = images.shape[-2:]
    padded = F.pad(images, (1, 1, 1, 1))
    offsets = torch.randint(0, 9, (images.shape[0],), generator=generator)
    shifted = torch.empty_like(images)
    for offset in range(9):
        dy, dx = divmod(offset, 3)
        chosen = offsets == offset
        shifted[chosen] = padded[chosen, :, dy : dy + height, dx : dx + width]
    noise = 0.03 * torch.randn(shifted.shape, generator=generator)
    return (shifted + noise).clamp(0.0, 1.0)


def train_judge(
    images: torch.Tensor,
    labels: torch.Tensor,
    train_index: np.ndarray,
    holdout_index: np.ndarray,
    seed: int = 0,
    epochs: int = 40,
    batch_size: int = 64,
) -> tuple[Judge, dict[str, float]]:
    """Train on `train_index` only and report accuracy on `holdout_index` (seeded, deterministic)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    judge = Judge(image_size=images.shape[-1])
    optimizer = torch.optim.AdamW(judge.parameters(), lr=2e-3, weight_decay=1e-4)
    train_x, train_y = images[torch.from_numpy(train_index)], labels[torch.from_numpy(train_index)]
    steps_per_epoch = (len(train_x) + batch_size - 1) // batch_size
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=epochs * steps_per_epoch)
    start = time.perf_counter()
    judge.train()
    for _ in range(epochs):
        order = torch.randperm(len(train_x), generator=generator)
        for first in range(0, len(order), batch_size):
            batch = order[first : first + batch_size]
            x = _shift_augment(train_x[batch], generator)
            loss = F.cross_entropy(judge(x), train_y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
    judge.eval()
    holdout = torch.from_numpy(holdout_index)
    accuracy = (judge.classify(images[holdout]) == labels[holdout]).float().mean().item()
    return judge, {"judge_holdout_accuracy": accuracy, "judge_train_seconds": time.perf_counter() - start}


@lru_cache(maxsize=1)
def load_default_judge() -> Judge:
    """The shipped judge in eval mode (cached: metrics call this often and it never changes)."""
    return Judge.from_pretrained(DEFAULT_JUDGE_DIR, local_files_only=True, low_cpu_mem_usage=False).eval()
