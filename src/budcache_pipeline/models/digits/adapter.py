"""The embedded default model's adapter (`digits`): a FLUX-architecture pipeline in pixel space."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from budcache_pipeline.models.adapter import Size, register_adapter
from budcache_pipeline.models.flux import FluxAdapter
from budcache_pipeline.models.spec import ModelSpec


@register_adapter("digits")
class DigitsAdapter(FluxAdapter):
    """FluxAdapter on the shipped DigitsFluxPipeline: 16x16 grayscale digits, no guidance embedding."""

    default_guidance_scale = 1.0  # no guidance embedding: recorded as 1.0, unused
    default_size = Size(16, 16)
    tiny_size = Size(16, 16)

    @classmethod
    def load(cls, spec: ModelSpec) -> DigitsAdapter:
        from budcache_pipeline.models.digits.pipeline import DigitsFluxPipeline, load_default_pipeline

        device, dtype = spec.resolve_device(), spec.resolve_dtype()
        if spec.weights in (None, "default"):
            pipe = load_default_pipeline(device=device, dtype=dtype)
        else:
            pipe = DigitsFluxPipeline.from_pretrained(spec.weights, torch_dtype=dtype).to(device)
        pipe.set_progress_bar_config(disable=True)
        return cls(pipe)

    def decode(self, latents: torch.Tensor, size: Size) -> torch.Tensor:
        """Packed latents -> (B, 1, H, W) images in [0, 1] (pixel space, no VAE)."""
        return self.pipe.decode_latents(latents.to(self.device), size.height, size.width)

    @staticmethod
    def benchmark_prompt_sets(
        calibration_size: int, holdout_size: int
    ) -> tuple[list[tuple[str, int, int]], list[tuple[str, int, int]]]:
        """`budcache bench quality`'s (prompt, digit, seed) sets, disjoint in prompts and seeds."""
        from budcache_pipeline.models.digits.prompt_sets import benchmark_prompt_sets

        return benchmark_prompt_sets(calibration_size, holdout_size)

    def quality_metrics(self, reference: Any, categories: Sequence[Any] | None = None) -> Any:
        """PSNR/SSIM, plus FID in the judge's feature space and judge agreement.

        FID's real set is the first stratified half of the held-out real digits, as in the
        training report (whose real-vs-real FID of the other half is the floor to compare with).
        """
        from budcache_pipeline.models.digits.evaluation import fid_reference_halves
        from budcache_pipeline.models.digits.judge import load_default_judge
        from budcache_pipeline.models.digits.quality import prompt_digits

        quality = super().quality_metrics(reference, categories)
        judge = load_default_judge()
        quality.features = judge.feature_extractor()
        quality.real_images = fid_reference_halves()[0]
        quality.classify = judge.classify
        quality.labels = prompt_digits(categories) if categories is not None else None
        return quality
