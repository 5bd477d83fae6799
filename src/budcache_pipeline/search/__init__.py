"""Offline search of fixed-budget cache policies: teachers, objective, SA + HC, starts, schedule alignment."""

from budcache_pipeline.search.alignment import (
    AlignmentResult,
    accept_alignment,
    align_schedule,
    aligned_policy,
    holdout_losses,
)
from budcache_pipeline.search.config import DEFAULT_STARTS, SearchConfig
from budcache_pipeline.search.engine import SearchResult, result_to_policy, search_policy
from budcache_pipeline.search.objective import MaskObjective, latent_mse_per_sample, mask_key
from budcache_pipeline.search.progress import ProgressBar, SearchProgress
from budcache_pipeline.search.reference import (
    ReferenceSetError,
    ReferenceSet,
    compute_reference,
    load_reference,
)
from budcache_pipeline.search.starts import SearchSetupError, dp_start, edge_errors, starts_for_budget

__all__ = [
    "DEFAULT_STARTS",
    "AlignmentResult",
    "MaskObjective",
    "ProgressBar",
    "ReferenceSetError",
    "ReferenceSet",
    "SearchConfig",
    "SearchProgress",
    "SearchResult",
    "SearchSetupError",
    "accept_alignment",
    "align_schedule",
    "aligned_policy",
    "compute_reference",
    "dp_start",
    "edge_errors",
    "holdout_losses",
    "latent_mse_per_sample",
    "load_reference",
    "mask_key",
    "result_to_policy",
    "search_policy",
    "starts_for_budget",
]
