"""Importing this module registers the built-in adapters: digits, flux, wan, sd3."""

from budcache_pipeline.models.digits.adapter import DigitsAdapter
from budcache_pipeline.models.flux import FluxAdapter
from budcache_pipeline.models.sd3 import SD3Adapter
from budcache_pipeline.models.wan import WanAdapter

__all__ = ["DigitsAdapter", "FluxAdapter", "SD3Adapter", "WanAdapter"]
