"""A model's identity: its architecture's fingerprint and its weights' digest."""

from __future__ import annotations

import torch

from budcache_pipeline.model_identity import model_fingerprint, weights_digest
from tests.conftest import tiny_flux_pipeline, tiny_sd3_transformer


def test_fingerprint_follows_architecture_not_weights():
    a, b = tiny_flux_pipeline(seed=0).transformer, tiny_flux_pipeline(seed=1).transformer
    assert model_fingerprint(a) == model_fingerprint(b)
    assert model_fingerprint(a) != model_fingerprint(tiny_sd3_transformer())


def test_weights_digest_tells_a_fused_lora_from_its_base_but_not_a_dtype_change():
    base = tiny_flux_pipeline().transformer
    digest = weights_digest(base)
    assert weights_digest(tiny_flux_pipeline().transformer.to(torch.bfloat16)) == digest, "bfloat16 copy, same digest"
    fused = tiny_flux_pipeline().transformer
    weight = fused.transformer_blocks[0].attn.to_q.weight
    with torch.no_grad():
        low_rank = torch.randn(weight.shape[0], 4) @ torch.randn(4, weight.shape[1])
        weight += 0.01 * low_rank
    assert weights_digest(fused) != digest
    assert weights_digest(tiny_flux_pipeline().transformer) == digest, "same weights, same digest"
