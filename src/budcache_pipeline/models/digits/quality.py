"""The default model's quality plug-in: FID in its judge's feature space and the judge's agreement."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from budcache_pipeline.metrics import frechet_distance
from budcache_pipeline.models.digits.judge import Judge, load_default_judge


def digits_fid(generated: torch.Tensor, real: torch.Tensor, judge: Judge | None = None) -> float:
    """FID of (B, 1, H, W) digit images in [0, 1] in the judge's feature space (shipped judge by default)."""
    judge = judge if judge is not None else load_default_judge()
    return frechet_distance(generated, real, judge.feature_extractor())


def judge_agreement(images: torch.Tensor, labels: torch.Tensor | list[int], judge: Judge | None = None) -> float:
    """Fraction of images the judge classifies as the digit their prompt named."""
    judge = judge if judge is not None else load_default_judge()
    labels = torch.as_tensor(labels, dtype=torch.long)
    if len(images) != len(labels) or len(labels) == 0:
        raise ValueError(f"need one label per image, got {len(images)} images and {len(labels)} labels")
    return (judge.classify(images).cpu() == labels).float().mean().item()


def prompt_digits(categories: Sequence[object]) -> list[int] | None:
    """The digit each prompt asks for, when every category is a digit (the shipped prompt set's are)."""
    if all(isinstance(c, str) and c.isdigit() and len(c) == 1 for c in categories):
        return [int(c) for c in categories]
    return None
