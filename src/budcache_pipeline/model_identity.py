"""Which model a policy was searched on: a transformer's architecture fingerprint and its weights digest."""

from __future__ import annotations

import hashlib
import json

import torch

_DIGEST_SAMPLES = 4096


def model_fingerprint(transformer: torch.nn.Module) -> str:
    """Identify a transformer by its class, config and parameter shapes/dtypes.

    Two models that share this fingerprint run the same computation graph, so a
    policy searched on one is valid on the other; weights are not hashed because
    deployments load the same architecture in other precisions or devices.
    """
    config = getattr(transformer, "config", {})
    config_items = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    shapes = [(name, list(p.shape)) for name, p in transformer.named_parameters()]
    payload = json.dumps(
        {"class": type(transformer).__name__, "config": config_items, "parameters": shapes},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def weights_digest(transformer: torch.nn.Module) -> str:
    """Identify a transformer's parameter values, so a fine-tune or a fused LoRA is told from its base.

    Hashes a strided sample of every tensor rounded to bfloat16: cheap on a 12B model, and the
    same weights loaded in float32 or bfloat16, on any device, give the same digest.
    """
    digest = hashlib.sha256()
    for name, parameter in transformer.named_parameters():
        flat = parameter.detach().reshape(-1)
        stride = max(1, flat.numel() // _DIGEST_SAMPLES)
        sample = flat[::stride][:_DIGEST_SAMPLES].to("cpu", torch.bfloat16).view(torch.int16)
        digest.update(name.encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]
