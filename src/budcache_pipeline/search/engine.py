"""Multi-start SA + HC search for one budget: orchestration, checkpoints, convergence record, cost.

The paper's search depends on its initial mask, so every start (DP, uniform,
front-loaded, random, and any caller-given mask such as a TeaCache-derived one)
runs annealing then hill climbing, and the result reports the spread of their
final losses. Cost is what limits this on small machines, so the starts anneal in
lockstep on a small screening subset (their proposals share forwards), a start that
falls clearly behind the leader can be retired early (racing), and every decision
that fixes the result (initial and final losses, each hill-climbing step) is made
on the full calibration set.

On one machine at one torch thread count, a search is a pure function of its
inputs and seed: the same policy, bit for bit. Across batch shapes
(`max_rows_per_forward`), thread counts and machines, float32 matmuls and
reductions sum in other orders and a loss moves in its last bits: the masks are
the same, the losses agree within `tolerance.LOSS_RELATIVE_TOLERANCE`. The
checkpoint holds the RNG states, masks and memoised losses, so a killed search
resumes and ends with the same masks; the losses it recomputes run in other batch
compositions than the uninterrupted search's, so they agree within that tolerance.
Sharded over K processes (`search.distributed`), the losses are sums over ranks: the
masks are the one-process masks, the losses agree within the same tolerance, and rank 0
alone writes the checkpoint while the others wait.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd

from budcache_pipeline.atomic import write_text_atomic
from budcache_pipeline.cost import search_rollouts
from budcache_pipeline.policy import CachePolicy, provenance_now
from budcache_pipeline.search.config import SearchConfig
from budcache_pipeline.search.distributed import Shard
from budcache_pipeline.search.objective import MaskObjective, mask_key
from budcache_pipeline.search.phases import SearchRun
from budcache_pipeline.search.progress import ProgressCallback
from budcache_pipeline.search.starts import SearchSetupError, check_mask, normalise_forced

CHECKPOINT_VERSION = 1
HISTORY_COLUMNS = ["iteration", "phase", "start", "objective", "temperature", "current_loss", "best_loss"]
_DETERMINISTIC_COST_KEYS = (
    "evaluations",
    "memo_hits",
    "block_stack_calls",
    "block_stack_calls_naive",
    "calibration_rollouts",
    "saved_fraction",
    "start_block_stack_calls",
    "start_block_stack_calls_naive",
    "calibration_pairs",
    "screen_pairs",
)


@dataclass
class SearchResult:
    """The best mask over all starts, each start's outcome, the convergence record and the search cost."""

    mask: list[bool]
    loss: float
    budget: int
    steps: int
    starts: list[dict[str, Any]]
    history: pd.DataFrame
    cost: dict[str, Any]
    forecast: str = "reuse"

    @property
    def spread(self) -> dict[str, Any]:
        """How much the outcome depends on the start: min/max/mean/std of the starts' final losses."""
        finals = [s["final_loss"] for s in self.starts]
        best = min(range(len(finals)), key=lambda k: finals[k])
        return {
            "min": min(finals),
            "max": max(finals),
            "mean": statistics.fmean(finals),
            "std": statistics.pstdev(finals),
            "best_start": self.starts[best]["start"],
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "mask": list(self.mask),
            "loss": self.loss,
            "budget": self.budget,
            "steps": self.steps,
            "starts": self.starts,
            "history": self.history.to_dict(orient="records"),
            "cost": self.cost,
            "forecast": self.forecast,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SearchResult:
        return cls(
            mask=[bool(m) for m in data["mask"]],
            loss=float(data["loss"]),
            budget=int(data["budget"]),
            steps=int(data["steps"]),
            starts=data["starts"],
            history=_history_frame(data["history"]),
            cost=data["cost"],
            forecast=data.get("forecast", "reuse"),
        )


def _history_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=HISTORY_COLUMNS).astype({"temperature": float})


class _Checkpoint:
    """The search's resumable state in one JSON file, written atomically by rank 0 alone."""

    def __init__(self, path: Path | None, signature: dict[str, Any], shard: Shard) -> None:
        self.path = Path(path) if path is not None else None
        self.shard = shard
        self.signature = signature
        self.data: dict[str, Any] = {"version": CHECKPOINT_VERSION, "signature": signature, "chains": []}
        if self.path is not None and self.path.exists():
            stored = json.loads(self.path.read_text())
            if stored.get("version") != CHECKPOINT_VERSION or stored.get("signature") != signature:
                differing = sorted(
                    k for k in signature.keys() | stored.get("signature", {}).keys()
                    if signature.get(k) != stored.get("signature", {}).get(k)
                )
                raise SearchSetupError(
                    f"checkpoint {self.path} belongs to another search (differs in {differing or ['version']}): "
                    "delete it or pass another checkpoint path"
                )
            self.data = stored

    def save(self) -> None:
        if self.path is None:
            return
        if self.shard.is_main:
            write_text_atomic(self.path, json.dumps(self.data))
        self.shard.barrier("the checkpoint write")


class _CostMeter:
    """Block-stack work in full-batch forwards, summed over the objectives a search uses.

    `calibration_rollouts` is that work over the number of steps: how many uncached rollouts
    of the whole calibration set the search cost, the unit that carries across models
    (times the reference's seconds gives its GPU time).
    """

    def __init__(self, objective: MaskObjective, screen: MaskObjective | None, prior: dict[str, Any] | None) -> None:
        self.objective, self.screen = objective, screen
        self.prior = prior or {}
        self.started = time.perf_counter()
        self.base = {id(o): dict(o.stats) for o in self._objectives()}

    def _objectives(self) -> list[MaskObjective]:
        return [self.objective] + ([self.screen] if self.screen is not None else [])

    def now(self) -> dict[str, Any]:
        total = {"evaluations": 0, "memo_hits": 0, "block_stack_calls": 0.0, "block_stack_calls_naive": 0.0}
        for objective in self._objectives():
            base, stats = self.base[id(objective)], objective.stats
            weight = len(objective) / len(self.objective)
            total["evaluations"] += stats["evaluations"] - base["evaluations"]
            total["memo_hits"] += stats["memo_hits"] - base["memo_hits"]
            for key in ("block_stack_calls", "block_stack_calls_naive"):
                total[key] += (stats[key] - base[key]) * weight
        stats, base = self.objective.stats, self.base[id(self.objective)]
        cost = {
            "evaluations": self.prior.get("evaluations", 0) + total["evaluations"],
            "memo_hits": self.prior.get("memo_hits", 0) + total["memo_hits"],
            "wall_seconds": self.prior.get("wall_seconds", 0.0) + time.perf_counter() - self.started,
            "calibration_pairs": len(self.objective),
            "screen_pairs": len(self.screen) if self.screen is not None else 0,
        }
        for key in ("block_stack_calls", "block_stack_calls_naive"):
            start = stats.get(f"start_{key}", 0.0) - base.get(f"start_{key}", 0.0)
            cost[f"start_{key}"] = self.prior.get(f"start_{key}", 0.0) + start
            cost[key] = self.prior.get(key, 0.0) + total[key] + start
        naive = cost["block_stack_calls_naive"]
        cost["saved_fraction"] = 1.0 - cost["block_stack_calls"] / naive if naive else 0.0
        cost["calibration_rollouts"] = search_rollouts(cost, self.objective.steps)
        return cost


def _starts(
    objective: MaskObjective, budget: int, config: SearchConfig, extra_starts: dict[str, Sequence[bool]] | None
) -> dict[str, list[bool] | None]:
    """Start names in order, with the masks given by the caller (built-in ones are built lazily)."""
    names: dict[str, list[bool] | None] = dict.fromkeys(config.starts)
    for name, mask in (extra_starts or {}).items():
        if name in names:
            raise SearchSetupError(f"extra start {name!r} clashes with a start of the same name: rename it")
        names[name] = check_mask(mask, objective.steps, budget, config.forced, name=f"extra start {name!r}")
    if not names:
        raise SearchSetupError("no starts given: pass at least one start or extra start")
    return names


def _signature(
    objective: MaskObjective,
    budget: int,
    config: SearchConfig,
    names: dict[str, list[bool] | None],
    screen: MaskObjective | None,
) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: every setting, the starts, the reference and the model."""
    return {
        "budget": budget,
        "steps": objective.steps,
        "forced": list(config.forced),
        "starts": {name: mask_key(mask) if mask is not None else None for name, mask in names.items()},
        "seed": config.seed,
        "sa_iterations": config.sa_iterations,
        "t_start": config.t_start,
        "t_end": config.t_end,
        "hc_rounds": config.hc_rounds,
        "screen_pairs": len(screen) if screen is not None else 0,
        "race_margin": config.race_margin,
        "dp_samples": config.dp_samples,
        "hc_confirm": config.hc_confirm,
        "hc_far_jumps": config.hc_far_jumps,
        "reference": objective.manifest.get("prompts_seeds_sha256"),
        "model_fingerprint": objective.manifest.get("model_fingerprint"),
        "sigmas": objective.schedule,
        "forecast": objective.forecast,
        "loss": getattr(objective.loss, "__qualname__", repr(objective.loss)),
    }


def _for_budget(config: SearchConfig, steps: int, budget: int) -> tuple[SearchConfig, list[bool] | None]:
    """The settings the phases run (forced positions normalised) and the one mask that fits, if only one does."""
    if budget > steps:
        raise SearchSetupError(f"budget {budget} exceeds the {steps} steps of the reference")
    config = replace(config, forced=normalise_forced(config.forced, steps, budget))
    if budget == len(config.forced) or budget == steps:
        only = [p in config.forced for p in range(steps)] if budget < steps else [True] * steps
        return replace(config, sa_iterations=0, hc_rounds=0), only
    return config, None


def search_policy(
    objective: MaskObjective,
    budget: int,
    config: SearchConfig = SearchConfig(),
    *,
    extra_starts: dict[str, list[bool]] | None = None,
    checkpoint: Path | None = None,
    progress: ProgressCallback | None = None,
) -> SearchResult:
    """Best mask with exactly `budget` compute steps, by SA then HC from each start (`SearchConfig`).

    All starts anneal in lockstep, chunk by chunk, their proposals sharing forwards, on the
    screening subset; every start's initial and final loss and every HC decision use the
    full set. `extra_starts`: named masks to start from besides the config's starts (e.g.
    a TeaCache-derived one). `checkpoint`: a file the search saves to after every chunk and
    resumes from. `progress` is called after every checkpoint with where the search is
    (`progress.ProgressBar` draws a bar; raising from it stops the search, the checkpoint stays).
    """
    config, only = _for_budget(config, objective.steps, budget)
    names = _starts(objective, budget, config, extra_starts)
    screen = objective.subset(config.screen_samples) if config.screen_samples else None
    screen = screen if screen is not objective else None
    state = _Checkpoint(checkpoint, _signature(objective, budget, config, names, screen), objective.shard)
    if state.data.get("result") is not None:
        return SearchResult.from_dict(state.data["result"])
    objective.load_memo(state.data.get("memo", {}).get("full", {}))
    if screen is not None:
        screen.load_memo(state.data.get("memo", {}).get("screen", {}))
    meter = _CostMeter(objective, screen, state.data.get("cost"))
    run = SearchRun(objective, screen, state, meter, config, budget, progress)
    run.start(names, only)
    run.anneal()
    run.confirm()
    run.climb()
    result = _best_of(run, meter, objective, budget)
    state.data["result"] = result.to_dict()
    state.save()
    run.report("done", 0, result.loss)
    return result


def _best_of(run: SearchRun, meter: _CostMeter, objective: MaskObjective, budget: int) -> SearchResult:
    """The lowest final loss over the starts, with every start's outcome, the history and the cost."""
    outcomes = run.outcomes()
    best = min(range(len(outcomes)), key=lambda k: outcomes[k]["final_loss"])
    return SearchResult(
        mask=list(outcomes[best]["mask"]),
        loss=outcomes[best]["final_loss"],
        budget=budget,
        steps=objective.steps,
        starts=outcomes,
        history=_history_frame(run.history()),
        cost=meter.now(),
        forecast=objective.forecast,
    )


def result_to_policy(
    result: SearchResult,
    *,
    model_name: str,
    model_fingerprint: str,
    sigmas: Sequence[float] | None,
    settings: dict[str, Any],
    scores: dict[str, Any],
    created_at: str | None = None,
    model_weights: str | None = None,
) -> CachePolicy:
    """The deployable policy of a search, with settings, scores, starts and cost in its provenance.

    Wall time is left out so that the same inputs and seed give the same bytes; pass
    `created_at` as well for a byte-identical file (default: now).
    """
    cost = {k: result.cost[k] for k in _DETERMINISTIC_COST_KEYS if k in result.cost}
    starts = [
        {
            "start": s["start"],
            "initial_loss": s["initial_loss"],
            "final_loss": s["final_loss"],
            "mask": mask_key(s["mask"]),
        }
        for s in result.starts
    ]
    entries: dict[str, Any] = {
        "search": settings,
        "scores": scores,
        "cost": cost,
        "starts": starts,
        "start_spread": result.spread,
    }
    if created_at is not None:
        entries["created_at"] = created_at
    return CachePolicy(
        mask=tuple(result.mask),
        model_name=model_name,
        model_fingerprint=model_fingerprint,
        sigmas=tuple(sigmas) if sigmas is not None else None,
        provenance=provenance_now(**entries),
        forecast=result.forecast,
        model_weights=model_weights,
    )
