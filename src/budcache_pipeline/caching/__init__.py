"""Runtime hooks that apply cache policies to diffusers transformers."""

from budcache_pipeline.caching.budcache import (
    BudCacheError,
    BudCacheRuntime,
    ContextSnapshot,
    disable_budcache,
    enable_budcache,
    get_runtime,
    transformer_blocks,
)

__all__ = [
    "BudCacheError",
    "BudCacheRuntime",
    "ContextSnapshot",
    "disable_budcache",
    "enable_budcache",
    "get_runtime",
    "transformer_blocks",
]
