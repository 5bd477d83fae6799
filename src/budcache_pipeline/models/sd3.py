"""SD3 adapter (`sd3`): StableDiffusion3Pipeline.

Classifier-free guidance is batched: one transformer call per step on the uncond and cond
rows together (uncond first), so the block stack's residuals hold both halves in one tensor.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from budcache_pipeline.models.adapter import Conditioning, PipelineAdapter, Size, register_adapter
from budcache_pipeline.schedules import scheduler_input_sigmas, shift_mu

_EMBEDS = ("prompt_embeds", "pooled_prompt_embeds")


@register_adapter("sd3")
class SD3Adapter(PipelineAdapter):
    """StableDiffusion3Pipeline: guidance rows [uncond; cond] in one call, static (or dynamic) shift."""

    # The pipeline calls the transformer outside any cache context: the runtime's default one.
    contexts = ("default",)
    default_guidance_scale = 7.0
    default_size = Size(1024, 1024)
    tiny_size = Size(16, 16)

    pipeline_class = "StableDiffusion3Pipeline"

    @classmethod
    def tiny_pipeline(cls) -> Any:
        from budcache_pipeline.models.tiny import tiny_sd3_pipeline

        return tiny_sd3_pipeline()

    @classmethod
    def tiny_text_shapes(cls) -> dict[str, tuple[int, ...]]:
        from budcache_pipeline.models.tiny import text_shapes

        return text_shapes(pooled=True, negative=True)

    @property
    def guided(self) -> bool:
        return self.guidance_scale > 1.0

    def image_seq_len(self, size: Size) -> int:
        patch = self.transformer.config.patch_size
        scale = self.pipe.vae_scale_factor
        return (size.height // scale // patch) * (size.width // scale // patch)

    def _mu(self, size: Size) -> float | None:
        return shift_mu(self.pipe.scheduler, self.image_seq_len(size))

    def default_sigmas(self, steps: int, size: Size) -> list[float]:
        """The schedule StableDiffusion3Pipeline runs when given no sigmas (its scheduler's own spacing)."""
        import copy

        scheduler = copy.deepcopy(self.pipe.scheduler)
        mu = self._mu(size)
        scheduler.set_timesteps(steps, **({"mu": mu} if mu is not None else {}))
        return [float(s) for s in np.asarray(scheduler.sigmas)]

    def schedule_kwargs(self, sigmas: Sequence[float], size: Size) -> dict[str, Any]:
        inputs = scheduler_input_sigmas(self.pipe.scheduler, list(sigmas), self.image_seq_len(size))
        return {"num_inference_steps": len(sigmas) - 1, "sigmas": inputs}

    def _encode_prompt(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, negative, pooled, negative_pooled = self.pipe.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            negative_prompt=[self.negative_prompt] * len(prompts),
            do_classifier_free_guidance=self.guided,
            device=self.device,
        )
        out = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
        if self.guided:
            out.update(negative_prompt_embeds=negative, negative_pooled_prompt_embeds=negative_pooled)
        return out

    def prepare(self, prompts: Sequence[str], seeds: Sequence[int], size: Size) -> tuple[Conditioning, torch.Tensor]:
        self.check_batch(prompts, seeds)
        text = self.encode(list(prompts), self._encode_prompt)
        names = _EMBEDS + tuple(f"negative_{k}" for k in _EMBEDS) if self.guided else _EMBEDS
        rows = {k: text[k].to(self.device, self.dtype) for k in names}
        channels = self.transformer.config.in_channels

        def draw(generator: torch.Generator) -> torch.Tensor:
            return self.pipe.prepare_latents(1, channels, size.height, size.width, self.dtype, self.device, generator)

        shared = {"guidance_scale": torch.tensor(self.guidance_scale, dtype=torch.float64)}
        return Conditioning(rows, shared), self.seeded_noise(seeds, draw)

    def velocity(self, conditioning: Conditioning, latents: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        rows = conditioning.rows
        t = timestep.expand(latents.shape[0])
        if not self.guided:
            return self.transformer(
                hidden_states=latents, timestep=t, encoder_hidden_states=rows["prompt_embeds"],
                pooled_projections=rows["pooled_prompt_embeds"], return_dict=False,
            )[0]
        out = self.transformer(
            hidden_states=torch.cat([latents, latents]),
            timestep=torch.cat([t, t]),
            encoder_hidden_states=torch.cat([rows["negative_prompt_embeds"], rows["prompt_embeds"]]),
            pooled_projections=torch.cat([rows["negative_pooled_prompt_embeds"], rows["pooled_prompt_embeds"]]),
            return_dict=False,
        )[0]
        uncond, cond = out.chunk(2)
        return uncond + float(conditioning.shared["guidance_scale"]) * (cond - uncond)

    def pipeline_inputs(self, conditioning: Conditioning, noise: torch.Tensor, size: Size) -> dict[str, Any]:
        inputs: dict[str, Any] = {k: v for k, v in conditioning.rows.items()}
        inputs.update(latents=noise, height=size.height, width=size.width, guidance_scale=self.guidance_scale)
        return inputs

    def decode(self, latents: torch.Tensor, size: Size) -> torch.Tensor:
        vae = self.pipe.vae
        scaled = latents / vae.config.scaling_factor + vae.config.shift_factor
        with torch.no_grad():
            images = vae.decode(scaled.to(vae.dtype), return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)
