"""FLUX adapter: prompts and seeds to the tensors a FluxTransformer2DModel call needs.

Works for diffusers' `FluxPipeline` and for any pipeline with the same methods
(`encode_prompt`, `prepare_latents`), such as the embedded default model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from budcache_pipeline.schedules import default_sigmas, image_seq_len


@dataclass
class FluxDenoiser:
    """A FLUX transformer bound to a batch's conditioning, called exactly as FluxPipeline calls it."""

    transformer: torch.nn.Module
    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor
    text_ids: torch.Tensor
    latent_image_ids: torch.Tensor
    guidance: torch.Tensor | None = None

    def velocity(self, latents: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        timestep = (sigma * 1000).expand(latents.shape[0]).to(latents.dtype)
        with self.transformer.cache_context("cond"):
            return self.transformer(
                hidden_states=latents,
                timestep=timestep / 1000,
                guidance=self.guidance,
                pooled_projections=self.pooled_prompt_embeds,
                encoder_hidden_states=self.prompt_embeds,
                txt_ids=self.text_ids,
                img_ids=self.latent_image_ids,
                return_dict=False,
            )[0]

    def subset(self, index: slice) -> FluxDenoiser:
        """The denoiser for a slice of the batch (latent_image_ids and text_ids are shared)."""
        return FluxDenoiser(
            self.transformer,
            self.prompt_embeds[index],
            self.pooled_prompt_embeds[index],
            self.text_ids,
            self.latent_image_ids,
            self.guidance[index] if self.guidance is not None else None,
        )


@dataclass
class FluxBatch:
    """Everything a rollout of a (prompt, seed) batch needs."""

    denoiser: FluxDenoiser
    noise: torch.Tensor
    height: int
    width: int


def prepare_batch(
    pipe: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    height: int,
    width: int,
    guidance_scale: float = 3.5,
) -> FluxBatch:
    """Encode prompts and draw each sample's noise from its own seed, as FluxPipeline would."""
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds: pass one seed per prompt")
    if not prompts:
        raise ValueError("the batch is empty: pass at least one prompt")
    transformer = pipe.transformer
    device, dtype = transformer.device, transformer.dtype
    with torch.no_grad():
        prompt_embeds, pooled, text_ids = pipe.encode_prompt(prompt=list(prompts), device=device)
    channels = transformer.config.in_channels // 4
    noises, image_ids = [], None
    for seed in seeds:
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        noise, image_ids = pipe.prepare_latents(1, channels, height, width, dtype, device, generator)
        noises.append(noise)
    guidance = None
    if transformer.config.get("guidance_embeds", False):
        guidance = torch.full((len(prompts),), guidance_scale, device=device, dtype=torch.float32)
    denoiser = FluxDenoiser(transformer, prompt_embeds.to(dtype), pooled.to(dtype), text_ids, image_ids, guidance)
    return FluxBatch(denoiser=denoiser, noise=torch.cat(noises), height=height, width=width)


def flux_default_sigmas(pipe: Any, steps: int, height: int, width: int) -> list[float]:
    """The schedule (steps + 1 sigmas) the transformer sees when the pipeline runs its defaults."""
    return default_sigmas(pipe.scheduler, steps, image_seq_len(pipe, height, width))
