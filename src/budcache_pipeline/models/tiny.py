"""Tiny random-weight pipelines of the real diffusers classes, built from configs, for tests and tiny envs.

No file is fetched: the transformers and VAEs are built from small configs with seeded
weights, and text conditioning comes from `HashEmbedder` (seeded tensors of the shapes the
real text encoders give) passed to the stock pipelines as `prompt_embeds`.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable

import torch

EMBED_DIM = 32
POOLED_DIM = 32
TEXT_TOKENS = 8


class HashEmbedder:
    """Prompt -> fixed pseudo-random embeddings seeded by the prompt's sha256 (stands in for text encoders).

    `names` maps each output name to its trailing shape; names starting with `negative_` embed the
    negative prompt instead. Embeddings differ per prompt and never per call.
    """

    def __init__(self, shapes: dict[str, tuple[int, ...]], negative_prompt: str = "") -> None:
        self.shapes = shapes
        self.negative_prompt = negative_prompt

    @staticmethod
    def _tensor(prompt: str, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        seed = int.from_bytes(hashlib.sha256(f"{name}\0{prompt}".encode()).digest()[:8], "little")
        return torch.randn(shape, generator=torch.Generator().manual_seed(seed))

    def __call__(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        out = {}
        for name, shape in self.shapes.items():
            negative = name.startswith("negative_")
            base = name.removeprefix("negative_")
            texts = [self.negative_prompt] * len(prompts) if negative else prompts
            out[name] = torch.stack([self._tensor(text, base, shape) for text in texts])
        return out


def text_shapes(pooled: bool, negative: bool) -> dict[str, tuple[int, ...]]:
    """The prompt tensors a pipeline's `encode_prompt` returns, at the tiny models' sizes."""
    shapes: dict[str, tuple[int, ...]] = {"prompt_embeds": (TEXT_TOKENS, EMBED_DIM)}
    if pooled:
        shapes["pooled_prompt_embeds"] = (POOLED_DIM,)
    if negative:
        shapes.update({f"negative_{k}": v for k, v in list(shapes.items())})
    return shapes


_GLOBAL_RNG = threading.Lock()
"""diffusers initialises weights from torch's global generator: two threads building a tiny model at once
(Kedro's ThreadRunner) would interleave its draws and get other weights."""


def _seeded(build: Callable[[], torch.nn.Module], seed: int) -> torch.nn.Module:
    """`build()` with torch's global generator seeded by `seed`, restored afterwards, one thread at a time."""
    with _GLOBAL_RNG, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build().eval()


def _tiny_image_vae(seed: int) -> torch.nn.Module:
    """A 1-level AutoencoderKL (no spatial compression) with 4 latent channels."""
    from diffusers import AutoencoderKL

    return _seeded(
        lambda: AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
            block_out_channels=(8,), layers_per_block=1, latent_channels=4, norm_num_groups=4,
            use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035,
        ),
        seed,
    )


def tiny_flux_pipeline(seed: int = 0, guidance_embeds: bool = True):
    """A FluxPipeline with 1 dual + 1 single block (inner dim 32) and a 1-level VAE (no compression)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    transformer = _seeded(
        lambda: FluxTransformer2DModel(
            patch_size=1, in_channels=16, out_channels=None, num_layers=1, num_single_layers=1,
            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=EMBED_DIM,
            pooled_projection_dim=POOLED_DIM, guidance_embeds=guidance_embeds, axes_dims_rope=(4, 6, 6),
        ),
        seed,
    )
    vae = _tiny_image_vae(seed + 1)
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    return FluxPipeline(
        scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
        transformer=transformer,
    )


def tiny_wan_pipeline(seed: int = 0):
    """A WanPipeline with 2 blocks (inner dim 24), a tiny Wan VAE and Wan2.1's UniPC flow scheduler."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    transformer = _seeded(
        lambda: WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
            text_dim=EMBED_DIM, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
        ),
        seed,
    )
    vae = _seeded(
        lambda: AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                 temperal_downsample=[False, True, True]),
        seed + 1,
    )
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    return WanPipeline(tokenizer=None, text_encoder=None, transformer=transformer, vae=vae, scheduler=scheduler)


def tiny_sd3_pipeline(seed: int = 0):
    """A StableDiffusion3Pipeline with 2 joint blocks (inner dim 32) and a 1-level VAE."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    transformer = _seeded(
        lambda: SD3Transformer2DModel(
            sample_size=32, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
            caption_projection_dim=32, joint_attention_dim=EMBED_DIM, pooled_projection_dim=POOLED_DIM,
            out_channels=4,
        ),
        seed,
    )
    vae = _tiny_image_vae(seed + 1)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None,
        text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None,
    )
