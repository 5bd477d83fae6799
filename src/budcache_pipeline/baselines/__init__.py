"""Heuristic caches a searched policy must beat, behind one interface, and a registry of them by name.

Adding a baseline is one new module with a `Baseline` subclass (its parameters, how it is
applied and reset, what it counts, how it is tuned to a budget) and one line in `BASELINES`.
`uniform` is compared too, but it is a BudCache policy (`FixedPolicy.uniform`), not a baseline.
"""

from __future__ import annotations

from typing import Any

from budcache_pipeline.baselines.baseline import Baseline, DiffusersCache, ThresholdBaseline
from budcache_pipeline.baselines.first_block_cache import FirstBlockCache
from budcache_pipeline.baselines.mag_cache import MagCache, mag_cache_min_steps, mag_cache_schedule
from budcache_pipeline.baselines.method import BaselineError, CacheMethod, FixedPolicy, Uncached
from budcache_pipeline.baselines.taylorseer import TaylorSeer, taylorseer_compute_steps
from budcache_pipeline.baselines.teacache import PublishedTeaCache, TeaCache

BASELINES: dict[str, type[Baseline]] = {
    TeaCache.kind: TeaCache,
    PublishedTeaCache.kind: PublishedTeaCache,
    FirstBlockCache.kind: FirstBlockCache,
    MagCache.kind: MagCache,
    TaylorSeer.kind: TaylorSeer,
}
UNIFORM = "uniform"
MATCHES = ("compute", "blocks")
"""What a baseline's budget counts: full block-stack computations, or block evaluations."""

def baseline_class(name: str) -> type[Baseline]:
    """The registered baseline called `name`, or an error that lists the names there are."""
    if name not in BASELINES:
        raise BaselineError(f"unknown baseline {name!r}: choose one of {[UNIFORM, *BASELINES]}")
    return BASELINES[name]


def method_from_json(data: dict[str, Any]) -> CacheMethod:
    """The method `CacheMethod.to_json` wrote (for job files): its kind and parameters."""
    kinds: dict[str, type[CacheMethod]] = {Uncached.kind: Uncached, FixedPolicy.kind: FixedPolicy, **BASELINES}
    kind = str(data["kind"])
    if kind not in kinds:
        raise BaselineError(f"unknown cache method {kind!r}: choose one of {list(kinds)}")
    return kinds[kind](**data["params"])


__all__ = [
    "BASELINES",
    "MATCHES",
    "UNIFORM",
    "Baseline",
    "BaselineError",
    "CacheMethod",
    "DiffusersCache",
    "FirstBlockCache",
    "FixedPolicy",
    "MagCache",
    "PublishedTeaCache",
    "TaylorSeer",
    "TeaCache",
    "ThresholdBaseline",
    "Uncached",
    "baseline_class",
    "mag_cache_min_steps",
    "mag_cache_schedule",
    "method_from_json",
    "taylorseer_compute_steps",
]
