"""A PNG of one prompt drawn with several seeds, large enough for a person to read the digits."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from budcache_pipeline.models.digits.pipeline import DigitsFluxPipeline


def generate_grid(
    pipe: DigitsFluxPipeline,
    prompt: str,
    steps: int,
    seeds: list[int],
    out_path: str | Path,
    sigmas: list[float] | None = None,
) -> Path:
    """Draw `prompt` once per seed, side by side (nearest-neighbour upscaled), and write a PNG."""
    if not seeds:
        raise ValueError("give at least one seed")
    images = pipe(
        prompt=prompt,
        num_inference_steps=steps,
        sigmas=sigmas,
        num_images_per_prompt=len(seeds),
        generator=[torch.Generator().manual_seed(seed) for seed in seeds],
        output_type="pt",
    ).images
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, len(seeds), figsize=(1.6 * len(seeds), 2.0), squeeze=False)
    for ax, image, seed in zip(axes[0], images, seeds):
        ax.imshow(image[0].cpu().numpy(), cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_title(f"seed {seed}", fontsize=8)
        ax.axis("off")
    fig.suptitle(f"{prompt!r}, {steps} steps", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
