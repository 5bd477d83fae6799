"""Sigma schedules as the transformer sees them, and the inputs a pipeline needs to reproduce them.

`FlowMatchEulerDiscreteScheduler.set_timesteps(sigmas=...)` re-applies its shift
(static `shift`, or the dynamic one from `mu`) to the sigmas it is given. A policy
stores the schedule after the shift; handing it back to a pipeline means inverting
the shift, and the round trip is verified on a copy of the scheduler.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import torch

_ROUND_TRIP_TOLERANCE = 1e-5


def shift_mu(scheduler: Any, image_seq_len: int | None) -> float | None:
    """FLUX's resolution-dependent shift, computed exactly as FluxPipeline does."""
    if not scheduler.config.get("use_dynamic_shifting", False):
        return None
    if image_seq_len is None:
        raise ValueError("this scheduler shifts sigmas by image size: pass image_seq_len")
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    return calculate_shift(
        image_seq_len,
        scheduler.config.get("base_image_seq_len", 256),
        scheduler.config.get("max_image_seq_len", 4096),
        scheduler.config.get("base_shift", 0.5),
        scheduler.config.get("max_shift", 1.15),
    )


def default_sigmas(scheduler: Any, steps: int, image_seq_len: int | None = None) -> list[float]:
    """The steps + 1 sigmas (ending at 0) a FLUX-style pipeline runs by default, after the shift."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    scheduler = copy.deepcopy(scheduler)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=shift_mu(scheduler, image_seq_len))
    return [float(s) for s in scheduler.sigmas]


def _unshift(scheduler: Any, sigma: float, mu: float | None) -> float:
    if sigma >= 1.0:
        return 1.0
    if mu is None:
        shift = scheduler.config.get("shift", 1.0)
        return sigma / (shift - (shift - 1) * sigma)
    if scheduler.config.get("time_shift_type", "exponential") == "linear":
        return 1.0 / (1.0 + mu * (1.0 / sigma - 1.0))
    return 1.0 / (1.0 + math.exp(mu) * (1.0 / sigma - 1.0))


def scheduler_input_sigmas(scheduler: Any, sigmas: list[float], image_seq_len: int | None = None) -> list[float]:
    """The `sigmas=` argument that makes `scheduler` run exactly `sigmas` (steps + 1, ending at 0).

    Raises ValueError when the scheduler transforms sigmas in a way that cannot be
    inverted (Karras, exponential or beta sigmas, terminal stretching).
    """
    if len(sigmas) < 2 or sigmas[-1] != 0:
        raise ValueError("sigmas must hold steps + 1 values ending at 0")
    mu = shift_mu(scheduler, image_seq_len)
    inputs = [_unshift(scheduler, float(s), mu) for s in sigmas[:-1]]
    check = copy.deepcopy(scheduler)
    check.set_timesteps(sigmas=inputs, mu=mu)
    error = (check.sigmas.double() - torch.tensor(sigmas, dtype=torch.float64)).abs().max().item()
    if error > _ROUND_TRIP_TOLERANCE:
        raise ValueError(
            f"{type(scheduler).__name__} does not reproduce these sigmas (max error {error:.2e}): "
            "disable karras/exponential/beta sigmas and shift_terminal on the scheduler"
        )
    return inputs
