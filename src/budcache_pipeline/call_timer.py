"""Wall time of every call of a module, for the benches' per-call figures."""

from __future__ import annotations

import time
from typing import Any

import torch


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work, so a clock read after it measures the work (a no-op off CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class CallTimer:
    """Seconds of every call of `module` under the current `label` (none while it is empty).

    Torch's own forward hooks, so the time includes any diffusers hook on the module; on CUDA
    both ends synchronise the device.
    """

    def __init__(self, module: torch.nn.Module, device: torch.device | None = None, label: str = "") -> None:
        self.device = device or torch.device("cpu")
        self.times: dict[str, list[float]] = {}
        self.label = label
        self._started = 0.0
        self._handles = [module.register_forward_pre_hook(self._pre), module.register_forward_hook(self._post)]

    def _pre(self, *_: Any) -> None:
        synchronize(self.device)
        self._started = time.perf_counter()

    def _post(self, *_: Any) -> None:
        synchronize(self.device)
        if self.label:
            self.times.setdefault(self.label, []).append(time.perf_counter() - self._started)

    def percentile(self, label: str, q: float) -> float | None:
        """The q-quantile (0..1) of the label's call times, None when it has none."""
        ordered = sorted(self.times.get(label, []))
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
