"""How a search reports where it is: one `SearchProgress` after every checkpoint, to a callback.

A search on a real model runs for hours; its caller decides what to show (a tqdm bar,
a log line, an MLflow metric) or when to stop it: raising from the callback stops the
search with the checkpoint that was just written, so rerunning resumes from there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tqdm.auto import tqdm


@dataclass(frozen=True)
class SearchProgress:
    """Where a search is after a checkpoint.

    `phase`: "start" (initial masks scored), "sa" (annealing), "hc" (hill climbing) or
    "done". `iteration`: the annealing iteration or the climbing start's round. `done` of
    `total`: iterations and rounds over all starts (a retired start counts as finished).
    `best`: the lowest loss so far (while annealing, on the screening subset). `start`:
    the start that is climbing.
    """

    budget: int
    phase: str
    iteration: int
    done: int
    total: int
    best: float | None = None
    start: str | None = None


ProgressCallback = Callable[[SearchProgress], None]


class ProgressBar:
    """A tqdm bar per search budget, moved by the search's reports (what `search.progress: true` shows)."""

    def __init__(self) -> None:
        self._bar: tqdm | None = None
        self._budget: int | None = None

    def __call__(self, where: SearchProgress) -> None:
        if self._bar is None or where.budget != self._budget:
            self.close()
            self._bar = tqdm(total=where.total, desc=f"search B={where.budget}", unit="it")
            self._budget = where.budget
        self._bar.update(where.done - self._bar.n)
        if where.best is not None:
            shown = {"start": where.start} if where.start is not None else {}
            self._bar.set_postfix(**shown, best=f"{where.best:.4g}")
        if where.phase == "done":
            self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        self._bar = None
