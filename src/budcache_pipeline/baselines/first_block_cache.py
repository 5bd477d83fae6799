"""diffusers' FirstBlockCache: runs the first block every step and skips the rest while its output changes little.

It runs part of the stack on every step to decide, so besides the budget in full
block-stack computations it is also compared at an equal number of block evaluations
(`name@blocks` in the evaluate parameters). One decision is shared by a batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from budcache_pipeline.baselines.baseline import DiffusersCache, ThresholdBaseline


@dataclass(frozen=True)
class FirstBlockCache(ThresholdBaseline, DiffusersCache):
    """Skip the other blocks while the first block's relative output change stays under `threshold`."""

    kind: ClassVar[str] = "first_block_cache"
    per_image: ClassVar[bool] = True
    start_threshold: ClassVar[float] = 0.05

    def diffusers_config(self, steps: int) -> Any:
        from diffusers.hooks import FirstBlockCacheConfig

        return FirstBlockCacheConfig(threshold=self.threshold)
