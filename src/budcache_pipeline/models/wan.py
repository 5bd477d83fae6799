"""Wan2.1 adapter (`wan`): WanPipeline for Wan2.1-T2V-1.3B and 14B.

True classifier-free guidance: a step calls the transformer twice, under the "cond" and
"uncond" cache contexts, so a compute step runs both block stacks and a cached step skips
both, each context keeping its own residuals. Latents are video tensors (batch, channels,
frames, height, width) kept in float32 as the pipeline keeps them. The shipped scheduler is
UniPC (a multistep solver), stepped through its own `step` with its state in every prefix
state; WanPipeline's call takes no `sigmas=`, so policies run the scheduler's own schedule.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from budcache_pipeline.models.adapter import Conditioning, ModelSpecError, PipelineAdapter, Size, register_adapter
from budcache_pipeline.solvers import SchedulerSolver


@register_adapter("wan")
class WanAdapter(PipelineAdapter):
    """WanPipeline: cond and uncond calls per step, per-context residuals, the pipeline's UniPC steps."""

    default_guidance_scale = 5.0
    default_size = Size(480, 832, 81)
    tiny_size = Size(32, 32, 5)

    def __init__(self, pipe: Any, **kwargs: Any) -> None:
        super().__init__(pipe, **kwargs)
        self.contexts = ("cond", "uncond") if self.guidance_scale > 1.0 else ("cond",)

    pipeline_class = "WanPipeline"

    @classmethod
    def tiny_pipeline(cls) -> Any:
        from budcache_pipeline.models.tiny import tiny_wan_pipeline

        return tiny_wan_pipeline()

    @classmethod
    def tiny_text_shapes(cls) -> dict[str, tuple[int, ...]]:
        from budcache_pipeline.models.tiny import text_shapes

        return text_shapes(pooled=False, negative=True)

    @property
    def latent_dtype(self) -> torch.dtype:
        return torch.float32

    def default_sigmas(self, steps: int, size: Size) -> list[float]:
        return [float(s) for s in SchedulerSolver(self.pipe.scheduler, steps).sigmas]

    def schedule_kwargs(self, sigmas: Sequence[float], size: Size) -> dict[str, Any]:
        steps = len(sigmas) - 1
        own = torch.tensor(self.default_sigmas(steps, size))
        if not torch.allclose(own, torch.tensor(list(sigmas), dtype=torch.float32), atol=1e-6):
            raise ModelSpecError(
                "WanPipeline runs its scheduler's own sigmas and takes no `sigmas=`: this policy's schedule "
                f"differs from {type(self.pipe.scheduler).__name__}'s for {steps} steps (use the searched, unaligned policy)"
            )
        return {"num_inference_steps": steps}

    def check_size(self, size: Size) -> None:
        frames = size.num_frames
        temporal = getattr(self.pipe, "vae_scale_factor_temporal", 4)
        if frames is None or (frames - 1) % temporal:
            raise ModelSpecError(f"Wan needs num_frames of the form {temporal}k + 1 (e.g. 81), got {frames}")

    def _encode_prompt(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, negative = self.pipe.encode_prompt(
            prompt=prompts,
            negative_prompt=[self.negative_prompt] * len(prompts),
            do_classifier_free_guidance=len(self.contexts) == 2,
            device=self.device,
        )
        out = {"prompt_embeds": embeds}
        if negative is not None:
            out["negative_prompt_embeds"] = negative
        return out

    def prepare(self, prompts: Sequence[str], seeds: Sequence[int], size: Size) -> tuple[Conditioning, torch.Tensor]:
        self.check_batch(prompts, seeds)
        self.check_size(size)
        text = self.encode(list(prompts), self._encode_prompt)
        channels = self.transformer.config.in_channels

        def draw(generator: torch.Generator) -> torch.Tensor:
            return self.pipe.prepare_latents(
                1, channels, size.height, size.width, size.num_frames, torch.float32, self.device, generator
            )

        rows = {"prompt_embeds": text["prompt_embeds"]}
        if len(self.contexts) == 2:
            rows["negative_prompt_embeds"] = text["negative_prompt_embeds"]
        rows = {k: v.to(self.device, self.dtype) for k, v in rows.items()}
        shared = {"guidance_scale": torch.tensor(self.guidance_scale, dtype=torch.float64)}
        return Conditioning(rows, shared), self.seeded_noise(seeds, draw)

    def velocity(self, conditioning: Conditioning, latents: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        rows = conditioning.rows
        model_input = latents.to(self.dtype)
        t = timestep.expand(latents.shape[0])
        with self.transformer.cache_context("cond"):
            noise = self.transformer(
                hidden_states=model_input, timestep=t, encoder_hidden_states=rows["prompt_embeds"], return_dict=False
            )[0]
        if len(self.contexts) == 1:
            return noise
        with self.transformer.cache_context("uncond"):
            uncond = self.transformer(
                hidden_states=model_input,
                timestep=t,
                encoder_hidden_states=rows["negative_prompt_embeds"],
                return_dict=False,
            )[0]
        return uncond + float(conditioning.shared["guidance_scale"]) * (noise - uncond)

    def pipeline_inputs(self, conditioning: Conditioning, noise: torch.Tensor, size: Size) -> dict[str, Any]:
        rows = conditioning.rows
        return {
            "prompt_embeds": rows["prompt_embeds"],
            "negative_prompt_embeds": rows.get("negative_prompt_embeds"),
            "guidance_scale": self.guidance_scale,
            "latents": noise,
            "height": size.height,
            "width": size.width,
            "num_frames": size.num_frames,
        }

    def decode(self, latents: torch.Tensor, size: Size) -> torch.Tensor:
        """(B, C, F, h, w) latents -> (B, 3, F, H, W) video in [0, 1], as WanPipeline decodes."""
        vae = self.pipe.vae
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, vae.dtype)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(latents.device, vae.dtype)
        with torch.no_grad():
            video = vae.decode(latents.to(vae.dtype) / inv_std + mean, return_dict=False)[0]
        return (video.float() / 2 + 0.5).clamp(0, 1)
