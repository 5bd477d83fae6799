"""A text-to-digit pipeline with FluxPipeline's call shape, so FLUX code paths run on it unchanged.

The transformer is a stock `FluxTransformer2DModel` and the denoising loop is FluxPipeline 0.42's
(same timestep scaling, `cache_context("cond")`, scheduler step); only the text encoders and the VAE
differ: a tiny encoder of ours, and pixel space (decode = unpack + rescale to [0, 1]).
"""

from __future__ import annotations

import json
from pathlib import Path
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps
from diffusers.pipelines.flux.pipeline_output import FluxPipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from budcache_pipeline.models.digits.text_encoder import DigitsTextEncoder, DigitsTokenizer

DEFAULT_WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
MODEL_INDEX_FILE = "model_index.json"
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# Local folders only; low_cpu_mem_usage=False because it would want `accelerate` for no gain at this size.
_LOCAL = {"local_files_only": True, "low_cpu_mem_usage": False}


@dataclass
class _Conditioning:
    """What the transformer sees besides the latents at every step; a step-end callback may replace `prompt_embeds`."""

    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor
    text_ids: torch.Tensor
    latent_image_ids: torch.Tensor


class DigitsFluxPipeline(DiffusionPipeline):
    """FLUX-architecture text-to-digit generator on 16x16 grayscale images in pixel space."""

    model_cpu_offload_seq = "text_encoder->transformer"
    _callback_tensor_inputs = ["latents", "prompt_embeds"]

    _pack_latents = staticmethod(FluxPipeline._pack_latents)
    _unpack_latents = staticmethod(FluxPipeline._unpack_latents)
    _prepare_latent_image_ids = staticmethod(FluxPipeline._prepare_latent_image_ids)

    def __init__(
        self,
        transformer: FluxTransformer2DModel,
        scheduler: FlowMatchEulerDiscreteScheduler,
        text_encoder: DigitsTextEncoder,
        tokenizer: DigitsTokenizer,
    ) -> None:
        super().__init__()
        self.register_modules(
            transformer=transformer, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer
        )
        # Pixel space: no VAE compression, so latent height/width equal the image's.
        self.vae_scale_factor = 1
        self.default_sample_size = 16
        self._joint_attention_kwargs: dict[str, Any] | None = None
        self._num_timesteps = 0
        self._current_timestep: torch.Tensor | None = None
        self._interrupt = False

    @property
    def joint_attention_kwargs(self) -> dict[str, Any] | None:
        return self._joint_attention_kwargs

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def current_timestep(self) -> torch.Tensor | None:
        return self._current_timestep

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    def encode_prompt(
        self,
        prompt: str | list[str] | None,
        device: torch.device | None = None,
        num_images_per_prompt: int = 1,
        prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(prompt_embeds (B*n, L, D), pooled_prompt_embeds (B*n, P), text_ids (L, 3) zeros), as FluxPipeline."""
        device = device or self._execution_device
        if prompt_embeds is None:
            if prompt is None:
                raise ValueError("give either `prompt` or `prompt_embeds` with `pooled_prompt_embeds`")
            input_ids = self.tokenizer(prompt).to(device)
            prompt_embeds, pooled_prompt_embeds = self.text_encoder(input_ids)
        elif pooled_prompt_embeds is None:
            raise ValueError("`pooled_prompt_embeds` must be given with `prompt_embeds`")
        dtype = self.text_encoder.dtype
        prompt_embeds = prompt_embeds.to(device=device, dtype=dtype).repeat_interleave(num_images_per_prompt, dim=0)
        pooled_prompt_embeds = pooled_prompt_embeds.to(device=device, dtype=dtype).repeat_interleave(
            num_images_per_prompt, dim=0
        )
        text_ids = torch.zeros(prompt_embeds.shape[1], 3).to(device=device, dtype=dtype)
        return prompt_embeds, pooled_prompt_embeds, text_ids

    def prepare_latents(
        self,
        batch_size: int,
        num_channels_latents: int,
        height: int,
        width: int,
        dtype: torch.dtype,
        device: torch.device,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed Gaussian noise (B, HW/4, 4C) and its position ids, exactly as FluxPipeline makes them."""
        height = 2 * (int(height) // (self.vae_scale_factor * 2))
        width = 2 * (int(width) // (self.vae_scale_factor * 2))
        shape = (batch_size, num_channels_latents, height, width)
        if latents is not None:
            latent_image_ids = self._prepare_latent_image_ids(batch_size, height // 2, width // 2, device, dtype)
            return latents.to(device=device, dtype=dtype), latent_image_ids
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(
                f"You have passed a list of generators of length {len(generator)}, but requested an effective batch"
                f" size of {batch_size}. Make sure the batch size matches the length of the generators."
            )
        latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        latents = self._pack_latents(latents, batch_size, num_channels_latents, height, width)
        latent_image_ids = self._prepare_latent_image_ids(batch_size, height // 2, width // 2, device, dtype)
        return latents, latent_image_ids

    def decode_latents(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Packed latents -> (B, 1, H, W) float images in [0, 1] (the model works in [-1, 1] pixels)."""
        images = self._unpack_latents(latents, height, width, self.vae_scale_factor)
        return ((images.float() + 1.0) / 2.0).clamp(0.0, 1.0)

    def check_inputs(
        self,
        prompt: str | list[str] | None,
        height: int,
        width: int,
        prompt_embeds: torch.Tensor | None,
        pooled_prompt_embeds: torch.Tensor | None,
        output_type: str,
        callback_on_step_end_tensor_inputs: Sequence[str],
    ) -> None:
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("give `prompt` or `prompt_embeds`, not both")
        if prompt is None and prompt_embeds is None:
            raise ValueError("give either `prompt` or `prompt_embeds` with `pooled_prompt_embeds`")
        if prompt is not None and not isinstance(prompt, (str, list)):
            raise ValueError(f"`prompt` must be a string or a list of strings, got {type(prompt).__name__}")
        if prompt_embeds is not None and pooled_prompt_embeds is None:
            raise ValueError("`pooled_prompt_embeds` must be given with `prompt_embeds`")
        if height % (self.vae_scale_factor * 2) or width % (self.vae_scale_factor * 2):
            raise ValueError(f"height and width must be even (2x2 patch packing), got {height}x{width}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        unknown = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(f"callback tensors must be among {self._callback_tensor_inputs}, got {unknown}")

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 28,
        sigmas: list[float] | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        joint_attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[..., dict[str, Any]] | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ) -> FluxPipelineOutput | tuple:
        """Generate digits; arguments and loop follow `FluxPipeline.__call__` (no guidance, no VAE).

        `output_type`: "pil" (grayscale images), "np" (B, H, W, 1), "pt" (B, 1, H, W) in [0, 1],
        or "latent" (packed latents).
        """
        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor
        self.check_inputs(
            prompt, height, width, prompt_embeds, pooled_prompt_embeds, output_type, callback_on_step_end_tensor_inputs
        )
        self._joint_attention_kwargs = joint_attention_kwargs
        self._current_timestep = None
        self._interrupt = False
        batch_size = self._batch_size(prompt, prompt_embeds)
        device = self._execution_device
        prompt_embeds, pooled_prompt_embeds, text_ids = self.encode_prompt(
            prompt=prompt,
            prompt_embeds=prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            device=device,
            num_images_per_prompt=num_images_per_prompt,
        )
        num_channels_latents = self.transformer.config.in_channels // 4
        latents, latent_image_ids = self.prepare_latents(
            batch_size * num_images_per_prompt, num_channels_latents, height, width, prompt_embeds.dtype, device,
            generator, latents,
        )
        timesteps = self._timesteps(num_inference_steps, sigmas, latents.shape[1], device)
        if self.joint_attention_kwargs is None:
            self._joint_attention_kwargs = {}
        conditioning = _Conditioning(prompt_embeds, pooled_prompt_embeds, text_ids, latent_image_ids)
        latents = self._denoise(
            latents, timesteps, conditioning, callback_on_step_end, callback_on_step_end_tensor_inputs
        )
        image = self._to_output(latents, height, width, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return FluxPipelineOutput(images=image)

    @staticmethod
    def _batch_size(prompt: str | list[str] | None, prompt_embeds: torch.Tensor | None) -> int:
        """Prompts in the call, before `num_images_per_prompt` repeats them."""
        if prompt is not None and isinstance(prompt, str):
            return 1
        if prompt is not None and isinstance(prompt, list):
            return len(prompt)
        return prompt_embeds.shape[0]

    def _timesteps(
        self, num_inference_steps: int, sigmas: list[float] | None, image_seq_len: int, device: torch.device
    ) -> torch.Tensor:
        """Set the scheduler to FluxPipeline's schedule: linear sigmas by default, shifted by `mu` for this size."""
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps) if sigmas is None else sigmas
        mu = calculate_shift(
            image_seq_len,
            self.scheduler.config.get("base_image_seq_len", 256),
            self.scheduler.config.get("max_image_seq_len", 4096),
            self.scheduler.config.get("base_shift", 0.5),
            self.scheduler.config.get("max_shift", 1.15),
        )
        timesteps, _ = retrieve_timesteps(self.scheduler, num_inference_steps, device, sigmas=sigmas, mu=mu)
        self._num_timesteps = len(timesteps)
        return timesteps

    def _denoise(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        conditioning: _Conditioning,
        callback_on_step_end: Callable[..., dict[str, Any]] | None,
        callback_on_step_end_tensor_inputs: Sequence[str],
    ) -> torch.Tensor:
        """FluxPipeline's loop: one transformer call in cache context "cond" and one Euler step per timestep."""
        self.scheduler.set_begin_index(0)
        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                self._current_timestep = t
                noise_pred = self._predict_noise(latents, t, conditioning)
                latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]
                if callback_on_step_end is not None:
                    tensors = {"latents": latents, "prompt_embeds": conditioning.prompt_embeds}
                    callback_kwargs = {k: tensors[k] for k in callback_on_step_end_tensor_inputs}
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                    latents = callback_outputs.pop("latents", latents)
                    conditioning.prompt_embeds = callback_outputs.pop("prompt_embeds", conditioning.prompt_embeds)
                progress_bar.update()
        self._current_timestep = None
        return latents

    def _predict_noise(self, latents: torch.Tensor, t: torch.Tensor, conditioning: _Conditioning) -> torch.Tensor:
        timestep = t.expand(latents.shape[0]).to(latents.dtype)
        with self.transformer.cache_context("cond"):
            return self.transformer(
                hidden_states=latents,
                timestep=timestep / 1000,
                guidance=None,
                pooled_projections=conditioning.pooled_prompt_embeds,
                encoder_hidden_states=conditioning.prompt_embeds,
                txt_ids=conditioning.text_ids,
                img_ids=conditioning.latent_image_ids,
                joint_attention_kwargs=self.joint_attention_kwargs,
                return_dict=False,
            )[0]

    def _to_output(self, latents: torch.Tensor, height: int, width: int, output_type: str) -> Any:
        """Packed latents as `output_type` asks: themselves, or decoded images as tensors, arrays or PIL."""
        if output_type == "latent":
            return latents
        image = self.decode_latents(latents, height, width)
        if output_type == "pt":
            return image
        image = VaeImageProcessor.pt_to_numpy(image)
        return VaeImageProcessor.numpy_to_pil(image) if output_type == "pil" else image

    def save_pretrained(self, save_directory: str | Path) -> None:
        """Write the diffusers-style folder that `from_pretrained` reads (one subfolder per component)."""
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        self.transformer.save_pretrained(folder / "transformer")
        self.scheduler.save_pretrained(folder / "scheduler")
        self.text_encoder.save_pretrained(folder / "text_encoder")
        self.tokenizer.save_pretrained(folder / "tokenizer")
        components = {name: list(value) for name, value in self.config.items() if isinstance(value, (tuple, list))}
        index = {"_class_name": type(self).__name__, **components}
        (folder / MODEL_INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | Path, torch_dtype: torch.dtype | None = None
    ) -> DigitsFluxPipeline:
        """Load from a local folder written by `save_pretrained`; never touches the network."""
        folder = Path(pretrained_model_name_or_path)
        if not (folder / MODEL_INDEX_FILE).is_file():
            raise FileNotFoundError(f"{folder} is not a DigitsFluxPipeline folder (no {MODEL_INDEX_FILE})")
        pipe = cls(
            transformer=FluxTransformer2DModel.from_pretrained(folder / "transformer", **_LOCAL),
            scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler", local_files_only=True),
            text_encoder=DigitsTextEncoder.from_pretrained(folder / "text_encoder", **_LOCAL),
            tokenizer=DigitsTokenizer.from_pretrained(folder / "tokenizer"),
        )
        if torch_dtype is not None:
            pipe.to(dtype=torch_dtype)
        return pipe


def load_default_pipeline(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> DigitsFluxPipeline:
    """The shipped digits model, loaded offline from the package folder."""
    return DigitsFluxPipeline.from_pretrained(DEFAULT_WEIGHTS_DIR).to(device=device, dtype=dtype)
