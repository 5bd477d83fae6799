"""CallTimer: one time per call under the current label, nothing without one, nothing after remove."""

from __future__ import annotations

import torch

from budcache_pipeline.call_timer import CallTimer


def test_calls_are_timed_under_their_label_and_stop_after_remove():
    module = torch.nn.Linear(4, 4)
    timer = CallTimer(module)
    module(torch.zeros(1, 4))
    assert timer.times == {} and timer.percentile("a", 0.5) is None
    timer.label = "a"
    for _ in range(3):
        module(torch.zeros(1, 4))
    timer.label = "b"
    module(torch.zeros(1, 4))
    assert len(timer.times["a"]) == 3 and len(timer.times["b"]) == 1
    assert 0 < timer.percentile("a", 0.0) <= timer.percentile("a", 0.5) <= timer.percentile("a", 1.0)
    timer.remove()
    module(torch.zeros(1, 4))
    assert len(timer.times["b"]) == 1
