"""FLUX adapter (`flux`): FluxPipeline for FLUX.1-dev and FLUX.1-schnell.

FLUX.1-dev is guidance-distilled: one transformer call per step under the "cond" cache
context, the guidance scale entering as an embedding; FLUX.1-schnell has no guidance
embedding. The scheduler shifts sigmas by a `mu` computed from the packed image length.
Any pipeline with FluxPipeline's methods (`encode_prompt`, `prepare_latents`) works, such
as the embedded default model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from budcache_pipeline.models.adapter import Conditioning, PipelineAdapter, Size, register_adapter
from budcache_pipeline.schedules import default_sigmas, scheduler_input_sigmas


@register_adapter("flux")
class FluxAdapter(PipelineAdapter):
    """FluxPipeline: packed 2x2 latents, text/image position ids shared by every row."""

    default_guidance_scale = 3.5
    default_size = Size(1024, 1024)
    tiny_size = Size(16, 16)

    pipeline_class = "FluxPipeline"

    @classmethod
    def tiny_pipeline(cls) -> Any:
        from budcache_pipeline.models.tiny import tiny_flux_pipeline

        return tiny_flux_pipeline()

    @classmethod
    def tiny_text_shapes(cls) -> dict[str, tuple[int, ...]]:
        from budcache_pipeline.models.tiny import text_shapes

        return text_shapes(pooled=True, negative=False)

    def image_seq_len(self, size: Size) -> int:
        """Packed image tokens for this size, as FluxPipeline computes them for its shift."""
        scale = getattr(self.pipe, "vae_scale_factor", 1) * 2
        return (size.height // scale) * (size.width // scale)

    def default_sigmas(self, steps: int, size: Size) -> list[float]:
        return default_sigmas(self.pipe.scheduler, steps, self.image_seq_len(size))

    def schedule_kwargs(self, sigmas: Sequence[float], size: Size) -> dict[str, Any]:
        inputs = scheduler_input_sigmas(self.pipe.scheduler, list(sigmas), self.image_seq_len(size))
        return {"num_inference_steps": len(sigmas) - 1, "sigmas": inputs}

    def _encode_prompt(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, pooled, _ = self.pipe.encode_prompt(prompt=prompts, device=self.device)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def prepare(self, prompts: Sequence[str], seeds: Sequence[int], size: Size) -> tuple[Conditioning, torch.Tensor]:
        self.check_batch(prompts, seeds)
        text = self.encode(list(prompts), self._encode_prompt)
        device, dtype = self.device, self.dtype
        channels = self.transformer.config.in_channels // 4
        image_ids: list[torch.Tensor] = []

        def draw(generator: torch.Generator) -> torch.Tensor:
            noise, ids = self.pipe.prepare_latents(1, channels, size.height, size.width, dtype, device, generator)
            image_ids[:] = [ids]
            return noise

        noise = self.seeded_noise(seeds, draw)
        embeds = text["prompt_embeds"].to(device=device, dtype=dtype)
        rows = {"prompt_embeds": embeds, "pooled_prompt_embeds": text["pooled_prompt_embeds"].to(device, dtype)}
        if self.transformer.config.get("guidance_embeds", False):
            rows["guidance"] = torch.full((len(prompts),), self.guidance_scale, device=device, dtype=torch.float32)
        shared = {"text_ids": torch.zeros(embeds.shape[1], 3, device=device, dtype=dtype), "latent_image_ids": image_ids[0]}
        return Conditioning(rows, shared), noise

    def velocity(self, conditioning: Conditioning, latents: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        rows, shared = conditioning.rows, conditioning.shared
        t = timestep.expand(latents.shape[0]).to(latents.dtype)
        with self.transformer.cache_context("cond"):
            return self.transformer(
                hidden_states=latents,
                timestep=t / 1000,
                guidance=rows.get("guidance"),
                pooled_projections=rows["pooled_prompt_embeds"],
                encoder_hidden_states=rows["prompt_embeds"],
                txt_ids=shared["text_ids"],
                img_ids=shared["latent_image_ids"],
                return_dict=False,
            )[0]

    def pipeline_inputs(self, conditioning: Conditioning, noise: torch.Tensor, size: Size) -> dict[str, Any]:
        inputs = {
            "prompt_embeds": conditioning.rows["prompt_embeds"],
            "pooled_prompt_embeds": conditioning.rows["pooled_prompt_embeds"],
            "latents": noise,
            "height": size.height,
            "width": size.width,
        }
        if "guidance_scale" in _parameters(self.pipe.__call__):
            inputs["guidance_scale"] = self.guidance_scale
        return inputs

    def decode(self, latents: torch.Tensor, size: Size) -> torch.Tensor:
        """Packed latents -> (B, 3, H, W) images in [0, 1] through the VAE, as FluxPipeline decodes."""
        pipe = self.pipe
        vae = pipe.vae
        unpacked = pipe._unpack_latents(latents, size.height, size.width, pipe.vae_scale_factor)
        unpacked = unpacked / vae.config.scaling_factor + vae.config.shift_factor
        with torch.no_grad():
            images = vae.decode(unpacked.to(vae.dtype), return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)


def _parameters(function: Any) -> set[str]:
    import inspect

    return set(inspect.signature(function).parameters)
