"""Rollout states keyed by mask prefix, bounded in count and in bytes, with an optional host-memory tier.

On a real model a state is big (latents plus every cache context's residuals and the
solver's history: about 57 MB per FLUX.1-dev sample at 1024² under a linear forecast), so
the store is bounded in bytes on the model's device. States evicted from the device can
move to (pinned) host memory before they are dropped, and come back when a candidate
resumes from them. Dropping a state changes what a search costs, never what it finds.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

import torch

from budcache_pipeline.sampling import RolloutState

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
PREFIX_STATE_STATS = ("state_hits", "state_misses", "state_evictions", "peak_state_bytes", "peak_host_state_bytes")
_SNAPSHOT_TENSORS = ("residual_hidden", "residual_encoder", "slope_hidden", "slope_encoder", "residual_sigma")


def parse_bytes(value: int | str | None) -> int | None:
    """A byte count from an int or a string such as "512MiB" or "8 GB" (None: unbounded)."""
    if value is None or isinstance(value, int):
        return value
    text = str(value).strip().lower().replace(" ", "")
    number = text.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = text[len(number):]
    if not number or unit not in _UNITS:
        raise ValueError(f"{value!r} is not a byte count: write e.g. 536870912, '512MiB' or '8GB'")
    return int(float(number) * _UNITS[unit])


def _tensors(state: RolloutState) -> list[torch.Tensor]:
    found = [state.latents]
    for snapshot in state.cache.values():
        found.extend(t for t in (getattr(snapshot, name) for name in _SNAPSHOT_TENSORS) if t is not None)
    for value in (state.solver or {}).values():
        items = value if isinstance(value, list) else [value]
        found.extend(t for t in items if torch.is_tensor(t) and t.dim() > 1)
    return found


def state_bytes(state: RolloutState) -> int:
    """Bytes a state holds (tensors it shares with other states counted in each: an upper bound)."""
    return sum(t.numel() * t.element_size() for t in _tensors(state))


def _moved(state: RolloutState, device: torch.device, pin: bool) -> RolloutState:
    """The state's tensors on `device`; the solver's schedule constants (1-d) stay where they are."""

    def move(value: Any) -> Any:
        moved = value.to(device, non_blocking=True)
        return moved.pin_memory() if pin else moved

    def move_solver(value: Any) -> Any:
        if isinstance(value, list):
            return [move_solver(v) for v in value]
        return move(value) if torch.is_tensor(value) and value.dim() > 1 else value

    cache = {
        name: replace(snapshot, **{f: move(t) for f in _SNAPSHOT_TENSORS if (t := getattr(snapshot, f)) is not None})
        for name, snapshot in state.cache.items()
    }
    solver = None if state.solver is None else {k: move_solver(v) for k, v in state.solver.items()}
    return RolloutState(state.step, move(state.latents), cache, solver)


class PrefixStore:
    """Least-recently-used prefix states within `max_states` and `max_bytes` on the device.

    `max_host_bytes` > 0 keeps evicted device states in host memory (pinned on CUDA) up to
    that many bytes. Pinned prefixes (the search's current and best masks) are evicted last, and
    only to keep the byte bound: the count bound may be exceeded by them, the byte bound never.
    `stats`: hits, misses, evictions, bytes now and at peak, per tier.
    """

    def __init__(
        self, max_states: int, max_bytes: int | None = None, max_host_bytes: int = 0, device: Any = "cpu"
    ) -> None:
        if max_states < 0 or (max_bytes is not None and max_bytes < 0) or max_host_bytes < 0:
            raise ValueError(
                f"state bounds must be >= 0, got max_states={max_states}, max_bytes={max_bytes}, "
                f"max_host_bytes={max_host_bytes}"
            )
        self.max_states, self.max_bytes, self.max_host_bytes = max_states, max_bytes, max_host_bytes
        self.device = torch.device(device)
        self._device: OrderedDict[str, tuple[RolloutState, int]] = OrderedDict()
        self._host: OrderedDict[str, tuple[RolloutState, int]] = OrderedDict()
        self._pinned: set[str] = set()
        self.bytes = self.host_bytes = 0
        self.stats = dict.fromkeys(PREFIX_STATE_STATS, 0)

    @property
    def enabled(self) -> bool:
        return self.max_states > 0 and self.max_bytes != 0

    def __len__(self) -> int:
        return len(self._device) + len(self._host)

    def pin(self, prefixes: Iterable[str]) -> None:
        self._pinned = set(prefixes)

    def longest(self, key: str, steps: int) -> tuple[int, RolloutState | None]:
        """The longest stored prefix of `key` shorter than `steps`, and its state (counted as a hit or miss)."""
        for k in range(steps - 1, 0, -1):
            state = self._get(key[:k])
            if state is not None:
                self.stats["state_hits"] += 1
                return k, state
        self.stats["state_misses"] += 1
        return 0, None

    def _get(self, prefix: str) -> RolloutState | None:
        if prefix in self._device:
            self._device.move_to_end(prefix)
            return self._device[prefix][0]
        if prefix in self._host:
            state, size = self._host.pop(prefix)
            self.host_bytes -= size
            state = _moved(state, self.device, pin=False)
            self.put(prefix, state)
            return state
        return None

    def put(self, prefix: str, state: RolloutState) -> None:
        if not self.enabled:
            return
        size = state_bytes(state)
        if self.max_bytes is not None and size > self.max_bytes:
            return
        if prefix in self._device:
            self.bytes -= self._device.pop(prefix)[1]
        self._device[prefix] = (state, size)
        self.bytes += size
        self._evict()
        self.stats["peak_state_bytes"] = max(self.stats["peak_state_bytes"], self.bytes)

    def _over(self) -> bool:
        return len(self._device) > self.max_states or (self.max_bytes is not None and self.bytes > self.max_bytes)

    def _evict(self) -> None:
        """Least recently used first; pinned prefixes last, and only when the byte bound needs it."""
        for spare_pinned in (True, False):
            for prefix in list(self._device):
                if not self._over():
                    return
                if spare_pinned and prefix in self._pinned:
                    continue
                state, size = self._device.pop(prefix)
                self.bytes -= size
                self.stats["state_evictions"] += 1
                self._to_host(prefix, state, size)
            if self.max_bytes is None or self.bytes <= self.max_bytes:
                return

    def _to_host(self, prefix: str, state: RolloutState, size: int) -> None:
        if self.max_host_bytes == 0 or self.device.type == "cpu" or size > self.max_host_bytes:
            return
        self._host[prefix] = (_moved(state, torch.device("cpu"), pin=torch.cuda.is_available()), size)
        self.host_bytes += size
        while self.host_bytes > self.max_host_bytes:
            self.host_bytes -= self._host.popitem(last=False)[1][1]
        self.stats["peak_host_state_bytes"] = max(self.stats["peak_host_state_bytes"], self.host_bytes)
