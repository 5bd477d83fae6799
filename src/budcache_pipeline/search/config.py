"""The search's settings as one frozen value: what `search_policy` runs, a policy records and a checkpoint matches.

Every knob that changes a search's result is a field here, with the library's defaults, and
is checked when the value is made. What only bounds a search's cost (prefix states kept,
rows per forward, processes) stays with the objective and the runner: a search resumed
under other bounds is the same search, so those bounds are neither recorded in a policy
nor part of a checkpoint's signature. The forecast is the objective's as well (it changes
the loss being minimised, and `MaskObjective` rolls out with it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from budcache_pipeline.search.hill_climbing import CONFIRM, FAR_JUMPS
from budcache_pipeline.search.starts import BUILTIN_STARTS, SearchSetupError, starts_for_budget

DEFAULT_STARTS = ("dp", "uniform", "front_loaded", "random")
DEFAULT_SCREEN_SAMPLES = 4
DEFAULT_RACE_MARGIN = 0.25
RECORDED_ALWAYS = ("starts", "forced", "seed", "sa_iterations", "hc_rounds", "screen_samples", "dp_samples")
"""Fields every policy's provenance records; the others only where they differ from the defaults."""
TIGHT_KEYS = ("tight_starts", "tight_budget_fraction")
BUDGET_SETTINGS_KEY = "budget_settings"
"""`search:` parameter mapping a budget to settings that replace the others at that budget only."""
RUN_KEYS = frozenset({
    "calibration_size", "forecast", "max_cached_states", "max_state_bytes", "max_host_state_bytes",
    "max_rows_per_forward", "processes", "checkpoint_dir", "progress",
})
"""`search:` parameters that are not the search's settings: its calibration pairs, its objective
(forecast and memory bounds) and how it runs (processes, checkpoints, progress)."""


def _refusal(name: str, value: Any, wanted: str) -> SearchSetupError:
    """A setting that cannot be used, named with what it must be."""
    return SearchSetupError(f"search setting {name} must be {wanted}, got {value!r}")


def _integer(name: str, value: Any, least: int | None, wanted: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or (least is not None and value < least):
        raise _refusal(name, value, wanted)
    return int(value)


def _number(name: str, value: Any, ok: Any, wanted: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
        raise _refusal(name, value, wanted)
    return float(value)


def _start_names(name: str, value: Any) -> tuple[str, ...]:
    """Built-in start names, each once, as a tuple (extra starts are masks passed to `search_policy`)."""
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise _refusal(name, value, f"a list of start names from {list(BUILTIN_STARTS)}")
    seen: list[str] = []
    for start in value:
        if start not in BUILTIN_STARTS:
            raise SearchSetupError(
                f"search setting {name}: unknown start {start!r}: use one of {list(BUILTIN_STARTS)} "
                "or pass its mask in search_policy's extra_starts"
            )
        if start in seen:
            raise SearchSetupError(f"search setting {name}: start {start!r} is listed twice: list each start once")
        seen.append(start)
    return tuple(seen)


def _forced(value: Any) -> tuple[int, ...]:
    wanted = "a list of step indices (integers >= 0) that always compute"
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise _refusal("forced", value, wanted)
    return tuple(_integer("forced", p, 0, wanted) for p in value)


def _budget_settings(value: Any, settings: Sequence[str]) -> dict[int, dict[str, Any]]:
    """`budget_settings` as {budget: {setting: value}}, every budget a whole number and every key a setting.

    A budget given as a number and as text (the YAML's `10:` and `kedro run --params
    search.budget_settings.10.dp_samples=3`) is one budget: the later settings win key by key.
    """
    if value is None:
        return {}
    wanted = "a mapping from budgets to mappings of search settings, e.g. {7: {dp_samples: 2}}"
    if not isinstance(value, Mapping):
        raise _refusal(BUDGET_SETTINGS_KEY, value, wanted)
    checked: dict[int, dict[str, Any]] = {}
    for budget, overrides in value.items():
        try:
            number = int(budget)
        except (TypeError, ValueError):
            raise _refusal(BUDGET_SETTINGS_KEY, value, wanted) from None
        if isinstance(budget, bool) or str(number) != str(budget).strip() or not isinstance(overrides, Mapping):
            raise _refusal(BUDGET_SETTINGS_KEY, value, wanted)
        unknown = sorted(set(overrides) - set(settings))
        if unknown:
            raise SearchSetupError(
                f"search setting {BUDGET_SETTINGS_KEY}[{number}]: unknown setting(s) {unknown}: use {settings}"
            )
        checked.setdefault(number, {}).update(overrides)
    return checked


@dataclass(frozen=True)
class SearchConfig:
    """What a search does besides its objective and budget; `to_dict` is what a policy records of it.

    `starts`: built-in starts annealed in lockstep. `forced`: steps that always compute (step 0
    always does). `sa_iterations` / `hc_rounds`: annealing iterations and hill-climbing rounds
    per start. `screen_samples`: anneal on that many strided calibration pairs and rank
    hill-climbing neighbours on them, confirming the best `hc_confirm` on the full set (None:
    everything on the full set). `dp_samples`: pairs the DP start's segment errors are
    estimated on. `t_start` / `t_end`: the geometric cooling's temperatures. `race_margin`:
    past the first tenth of annealing, retire a start whose best loss is more than this
    fraction above the leader's (None: no racing). `hc_far_jumps`: seeded moves beyond the
    neighbourhood window per hill-climbing round.
    """

    starts: tuple[str, ...] = DEFAULT_STARTS
    forced: tuple[int, ...] = (0,)
    seed: int = 0
    sa_iterations: int = 200
    hc_rounds: int = 20
    screen_samples: int | None = DEFAULT_SCREEN_SAMPLES
    dp_samples: int = DEFAULT_SCREEN_SAMPLES
    t_start: float = 5e-2
    t_end: float = 1e-5
    race_margin: float | None = DEFAULT_RACE_MARGIN
    hc_confirm: int = CONFIRM
    hc_far_jumps: int = FAR_JUMPS

    def __post_init__(self) -> None:
        checked = {
            "starts": _start_names("starts", self.starts),
            "forced": _forced(self.forced),
            "seed": _integer("seed", self.seed, None, "an integer"),
            "sa_iterations": _integer("sa_iterations", self.sa_iterations, 0, "an integer >= 0 (0: no annealing)"),
            "hc_rounds": _integer("hc_rounds", self.hc_rounds, 0, "an integer >= 0 (0: no hill climbing)"),
            "screen_samples": None if self.screen_samples is None else _integer(
                "screen_samples", self.screen_samples, 1, "an integer >= 1, or null to anneal on every pair"),
            "dp_samples": _integer("dp_samples", self.dp_samples, 1, "an integer >= 1"),
            "t_start": _number("t_start", self.t_start, lambda t: t > 0, "a temperature > 0"),
            "race_margin": None if self.race_margin is None else _number(
                "race_margin", self.race_margin, lambda m: m >= 0, "a fraction >= 0, or null for no racing"),
            "hc_confirm": _integer("hc_confirm", self.hc_confirm, 1, "an integer >= 1"),
            "hc_far_jumps": _integer("hc_far_jumps", self.hc_far_jumps, 0, "an integer >= 0"),
        }
        checked["t_end"] = _number("t_end", self.t_end, lambda t: 0 < t <= checked["t_start"],
                                   f"a temperature in (0, t_start = {self.t_start!r}]")
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    @classmethod
    def from_params(cls, params: Mapping[str, Any], budget: int, steps: int) -> SearchConfig:
        """The settings of the Kedro `search:` parameters for one budget; keys not given take the defaults.

        At budgets of at most `tight_budget_fraction` of the steps `tight_starts` replace
        `starts` (`starts_for_budget`); then the settings `budget_settings` gives for this budget
        replace the others. A key that is neither a setting nor one of the parameters of the
        calibration set, the objective or the run is refused by name.
        """
        settings = [f.name for f in fields(cls)]
        unknown = sorted(set(params) - set(settings) - {*TIGHT_KEYS, BUDGET_SETTINGS_KEY} - RUN_KEYS)
        if unknown:
            raise SearchSetupError(
                f"unknown search parameter(s) {unknown}: the search's settings are {settings}, "
                f"{list(TIGHT_KEYS)} and {BUDGET_SETTINGS_KEY}; the node also reads {sorted(RUN_KEYS)}"
            )
        given = {k: params[k] for k in settings if k in params}
        starts = _start_names("starts", params.get("starts", DEFAULT_STARTS))
        tight = params.get("tight_starts")
        tight = _start_names("tight_starts", tight) if tight else tight
        given["starts"] = starts_for_budget(budget, steps, starts, tight, params.get("tight_budget_fraction"))
        given.update(_budget_settings(params.get(BUDGET_SETTINGS_KEY), settings).get(budget, {}))
        return cls(**given)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings: the recorded-always fields, then any other field that differs from its default.

        Policies searched with the defaults read as they did before the last fields were settings.
        """
        data: dict[str, Any] = {}
        for field in fields(self):
            value = getattr(self, field.name)
            if field.name in RECORDED_ALWAYS or value != field.default:
                data[field.name] = list(value) if isinstance(value, tuple) else value
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SearchConfig:
        """The settings `to_dict` wrote (a job file's `search` block); a missing field takes its default."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SearchSetupError(f"unknown search setting(s) {unknown}: use {sorted(known)}")
        return cls(**data)

    def settings(self, budget: int, calibration_pairs: int, forecast: str) -> dict[str, Any]:
        """What a policy's provenance records of its search (and the search node keys its checkpoint files by)."""
        return {"budget": budget, **self.to_dict(), "calibration_pairs": calibration_pairs, "forecast": forecast}
