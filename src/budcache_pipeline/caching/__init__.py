"""Runtime hooks that apply cache policies to diffusers transformers."""

from budcache_pipeline.caching.budcache import disable_budcache, enable_budcache, get_runtime, transformer_blocks
from budcache_pipeline.caching.runtime import BudCacheError, BudCacheRuntime, ContextSnapshot

__all__ = [
    "BudCacheError",
    "BudCacheRuntime",
    "ContextSnapshot",
    "disable_budcache",
    "enable_budcache",
    "get_runtime",
    "transformer_blocks",
]
