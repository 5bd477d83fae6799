"""Forecast gains: per-step, per-channel-group scales on what a cached step adds, learned with the schedule.

At tight budgets one residual stands in for a dozen steps, and neither the residual nor its
slope in sigma is the right size for all of them. Schedule alignment can learn, per step,
a gain on the residual and a gain on the slope term; the hidden channels are split into
`channels` contiguous groups that each get their own gain (1 group: one scalar per step).
A group count that divides the stack's width (64 divides FLUX's 3072, Wan2.1's 1536 and
5120, SD3's 1536) keeps a policy's size independent of the model's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

_KEYS = ("residual", "slope")


class ForecastGainsError(ValueError):
    """Gains that do not fit a policy: wrong row count, ragged rows or non-finite values."""


@dataclass(frozen=True)
class ForecastGains:
    """`residual[i]` and `slope[i]`: step i's gain per channel group (rows of compute steps are not read)."""

    residual: tuple[tuple[float, ...], ...]
    slope: tuple[tuple[float, ...], ...]

    def __post_init__(self) -> None:
        for name in _KEYS:
            object.__setattr__(self, name, _rows(name, getattr(self, name)))
        if len(self.residual) != len(self.slope):
            raise ForecastGainsError(
                f"'residual' has {len(self.residual)} rows and 'slope' {len(self.slope)}: give one row per step in both"
            )
        if len(self.residual[0]) != len(self.slope[0]):
            raise ForecastGainsError(
                f"'residual' rows have {len(self.residual[0])} gains and 'slope' rows {len(self.slope[0])}: "
                "use the same channel groups in both"
            )

    @property
    def steps(self) -> int:
        return len(self.residual)

    @property
    def channels(self) -> int:
        return len(self.residual[0])

    @classmethod
    def identity(cls, steps: int, channels: int) -> ForecastGains:
        """Gains of 1: the forecast unchanged."""
        if steps < 1 or channels < 1:
            raise ForecastGainsError(f"steps and channels must be at least 1, got {steps} and {channels}")
        ones = ((1.0,) * channels,) * steps
        return cls(ones, ones)

    def tensors(self, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The (steps, channels) float32 tensors the runtime multiplies with."""
        return (
            torch.tensor(self.residual, dtype=torch.float32, device=device),
            torch.tensor(self.slope, dtype=torch.float32, device=device),
        )

    def to_dict(self) -> dict[str, Any]:
        return {name: [list(row) for row in getattr(self, name)] for name in _KEYS}

    @classmethod
    def from_dict(cls, data: Any) -> ForecastGains:
        if not isinstance(data, dict) or set(data) != set(_KEYS):
            found = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise ForecastGainsError(
                f"forecast gains must be an object with exactly the keys {list(_KEYS)}, got {found}"
            )
        return cls(data["residual"], data["slope"])


def _rows(name: str, rows: Any) -> tuple[tuple[float, ...], ...]:
    """`rows` as a non-empty rectangle of finite floats, or an error naming what is wrong."""
    if not isinstance(rows, (list, tuple)) or not rows:
        raise ForecastGainsError(f"'{name}' must be a non-empty list of rows, one per step")
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, (list, tuple)) or not row or not all(
            isinstance(g, (int, float)) and not isinstance(g, bool) for g in row
        ):
            raise ForecastGainsError(f"'{name}' row {i} must be a non-empty list of numbers")
        if not all(math.isfinite(g) for g in row):
            raise ForecastGainsError(f"'{name}' row {i} contains NaN or infinity: use finite gains")
        out.append(tuple(float(g) for g in row))
    if len({len(row) for row in out}) != 1:
        lengths = sorted({len(row) for row in out})
        raise ForecastGainsError(f"'{name}' rows have different lengths {lengths}: use one length")
    return tuple(out)


def per_channel(gains: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """One step's group gains spread over the last dimension of `like` (contiguous groups of equal size)."""
    width = like.shape[-1]
    groups = gains.shape[-1]
    if width % groups:
        raise ForecastGainsError(
            f"the policy's forecast gains have {groups} channel groups, which do not divide the block stack's "
            f"width {width}: learn the gains on this model"
        )
    return gains.to(dtype=like.dtype, device=like.device).repeat_interleave(width // groups)


def channel_groups(transformer: torch.nn.Module, wanted: int) -> int:
    """The most channel groups, up to `wanted`, that split the block stack's width evenly (gcd of the two)."""
    config = getattr(transformer, "config", {})
    heads, head_dim = config.get("num_attention_heads"), config.get("attention_head_dim")
    if not isinstance(heads, int) or not isinstance(head_dim, int):
        raise ForecastGainsError(
            f"{type(transformer).__name__}'s config has no num_attention_heads x attention_head_dim to size "
            "forecast gains by: learn gains with gain_channels 0"
        )
    return math.gcd(wanted, heads * head_dim)


def check_steps(gains: ForecastGains | None, steps: int) -> None:
    """Gains must have one row per step of the mask they scale."""
    if gains is not None and gains.steps != steps:
        raise ForecastGainsError(f"forecast gains have {gains.steps} rows but the mask has {steps} steps")

