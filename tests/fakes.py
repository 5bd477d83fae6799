"""Shared test doubles: tiny diffusers pipelines built from configs, and adapters over them.

Text conditioning comes from `HashEmbedder` (seeded per prompt), so no tokenizer or text
encoder is ever fetched; the stock pipelines are called with `prompt_embeds`.
"""

from __future__ import annotations

import torch

from budcache_pipeline.models.adapter import Size
from budcache_pipeline.models.flux import FluxAdapter
from budcache_pipeline.models.tiny import EMBED_DIM, POOLED_DIM, TEXT_TOKENS, HashEmbedder


def flux_embedder() -> HashEmbedder:
    """FluxPipeline's prompt tensors: T5-like (tokens, dim) and CLIP-like pooled (dim,)."""
    return HashEmbedder({"prompt_embeds": (TEXT_TOKENS, EMBED_DIM), "pooled_prompt_embeds": (POOLED_DIM,)})


def flux_adapter(pipe) -> FluxAdapter:
    """A FluxAdapter over a text-encoder-free FluxPipeline (`tests.conftest.tiny_flux_pipeline`)."""
    return FluxAdapter(pipe, embedder=flux_embedder())


def square(size: int) -> Size:
    return Size(size, size)


def uncached_finals(adapter, prompts, seeds, size: Size, steps: int) -> tuple:
    """(conditioning, noise, sigmas, finals) of plain uncached rollouts, for expectations."""
    from budcache_pipeline.models.adapter import BoundDenoiser
    from budcache_pipeline.sampling import rollout

    conditioning, noise = adapter.prepare(prompts, seeds, size)
    sigmas = adapter.default_sigmas(steps, size)
    with torch.inference_mode():
        final = rollout(BoundDenoiser(adapter, conditioning), None, noise, adapter.solver(sigmas)).final
    return conditioning, noise, sigmas, final


def flux_rollout_set(prompts, seeds, steps: int, size: int):
    """A RolloutSet of uncached tiny-FLUX rollouts (conditioning, noise, schedule, finals)."""
    from budcache_pipeline.evaluation import RolloutSet
    from budcache_pipeline.models.adapter import BoundDenoiser
    from tests.conftest import tiny_flux_pipeline

    adapter = flux_adapter(tiny_flux_pipeline())
    conditioning, noise, sigmas, final = uncached_finals(adapter, list(prompts), list(seeds), square(size), steps)
    return RolloutSet(BoundDenoiser(adapter, conditioning), noise, torch.tensor(sigmas), final)
