"""Prefix states bounded in bytes: dropping states changes what a search costs, never what it finds."""

from __future__ import annotations

import pytest
import torch

from budcache_pipeline.sampling import RolloutState
from budcache_pipeline.search import MaskObjective, SearchConfig, search_policy
from budcache_pipeline.search.prefix_store import PrefixStore, parse_bytes, state_bytes
from budcache_pipeline.search.tolerance import LOSS_RELATIVE_TOLERANCE
from tests.search.conftest import STEPS, random_mask

FAST = SearchConfig(sa_iterations=30, hc_rounds=3, dp_samples=3, race_margin=None, seed=2)


def one_state_bytes(adapter, reference) -> int:
    objective = MaskObjective(adapter, reference, max_cached_states=4)
    objective([True] * STEPS)
    return max(state_bytes(state) for state, _ in objective.prefix_store._device.values())


def test_a_search_under_a_byte_bound_finds_the_same_policy_and_stays_under_it(adapter, reference):
    bound = 3 * one_state_bytes(adapter, reference)
    free = MaskObjective(adapter, reference, max_cached_states=10_000)
    tight = MaskObjective(adapter, reference, max_cached_states=10_000, max_state_bytes=bound)
    unbounded, bounded = search_policy(free, 4, FAST), search_policy(tight, 4, FAST)
    assert bounded.mask == unbounded.mask
    assert bounded.loss == pytest.approx(unbounded.loss, rel=LOSS_RELATIVE_TOLERANCE), "other batch shapes"
    stats = tight.stats
    assert 0 < stats["peak_state_bytes"] <= bound < free.stats["peak_state_bytes"]
    assert stats["state_evictions"] > 0 and stats["state_hits"] > 0 and stats["state_misses"] > 0
    assert tight.stats["block_stack_calls"] > free.stats["block_stack_calls"], "fewer states, more reruns"


def test_a_state_larger_than_the_bound_is_not_kept_and_changes_no_loss(adapter, reference):
    masks = [random_mask(STEPS, 5, torch.Generator().manual_seed(k)) for k in range(4)]
    none_kept = MaskObjective(adapter, reference, max_state_bytes=16)
    kept = MaskObjective(adapter, reference)
    assert none_kept.evaluate_many(masks) == pytest.approx(kept.evaluate_many(masks), rel=LOSS_RELATIVE_TOLERANCE)
    assert len(none_kept.prefix_store) == 0 and none_kept.stats["peak_state_bytes"] == 0


def test_pinned_prefixes_outlive_others_but_never_the_byte_bound():
    size = state_bytes(RolloutState(1, torch.zeros(2, 3), {}))
    store = PrefixStore(max_states=1)
    store.pin(["1"])
    store.put("1", RolloutState(1, torch.zeros(2, 3), {}))
    store.put("11", RolloutState(2, torch.zeros(2, 3), {}))
    assert store.longest("1111", 4)[0] == 1, "the pinned prefix stays, the newer unpinned one goes"
    bytes_bound = PrefixStore(max_states=10, max_bytes=size)
    bytes_bound.pin(["1", "11"])
    bytes_bound.put("1", RolloutState(1, torch.zeros(2, 3), {}))
    bytes_bound.put("11", RolloutState(2, torch.zeros(2, 3), {}))
    assert bytes_bound.bytes <= size and bytes_bound.longest("1111", 4)[0] == 2


@pytest.mark.parametrize("bounds", [dict(max_states=-1), dict(max_states=4, max_bytes=-1), dict(max_states=4, max_host_bytes=-5)])
def test_negative_bounds_are_refused(bounds):
    with pytest.raises(ValueError, match="state bounds must be >= 0"):
        PrefixStore(**bounds)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the host tier holds states evicted from a GPU")
def test_states_evicted_from_the_gpu_come_back_from_host_memory():
    store = PrefixStore(max_states=1, max_host_bytes=1 << 20, device="cuda")
    store.put("1", RolloutState(1, torch.ones(2, 3, device="cuda"), {}))
    store.put("11", RolloutState(2, torch.zeros(2, 3, device="cuda"), {}))
    assert store.host_bytes > 0
    step, state = store.longest("1011", 4)
    assert step == 1 and state.latents.device.type == "cuda" and state.latents.sum() == 6


@pytest.mark.parametrize(("text", "count"), [(None, None), (1024, 1024), ("512MiB", 512 * 2**20), ("8 GB", 8 * 10**9), ("1.5GiB", 3 * 2**29)])
def test_byte_counts_are_read_with_units(text, count):
    assert parse_bytes(text) == count


def test_a_byte_count_without_a_known_unit_is_refused():
    with pytest.raises(ValueError, match="not a byte count"):
        parse_bytes("8 parsecs")
