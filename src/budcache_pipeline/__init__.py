"""BudCache: budget-constrained step-level caching for diffusers pipelines."""

from budcache_pipeline.caching import disable_budcache, enable_budcache
from budcache_pipeline.policy import CachePolicy, PolicyError, load_policy, model_fingerprint

__version__ = "0.1.0"

__all__ = [
    "CachePolicy",
    "PolicyError",
    "__version__",
    "disable_budcache",
    "enable_budcache",
    "load_policy",
    "model_fingerprint",
]
