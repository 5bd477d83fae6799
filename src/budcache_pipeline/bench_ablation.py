"""`budcache bench ablation`: what each phase of the search buys on held-out pairs, and what it costs.

Every variant searches the same calibration reference at every budget and seed; the held-out
MSE is the final-latent MSE of its mask against the uncached model on the bench's held-out
pairs (the quality bench's `latent_mse`), and the cost is in calibration rollouts. At loose
budgets the search's seed moves the result more than most settings do, so a setting is
judged over several seeds (`seeds`), each variant against the Kedro default at the same seed. The
calibration set moves it as much: `calibration_sets` repeats everything on sets of the same prompts
with other noise seeds (the held-out pairs stay the same).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from budcache_pipeline.models.adapter import Size
from budcache_pipeline.search.config import BUDGET_SETTINGS_KEY, TIGHT_KEYS, SearchConfig

ABLATION_BUDGETS = (14, 10, 7, 5, 4, 3)
_PHASES_OFF = {"sa_iterations": 0, "hc_rounds": 0}
VARIANTS: dict[str, dict[str, Any]] = {
    "dp": {"starts": ["dp"], **_PHASES_OFF},
    "dp+hc": {"starts": ["dp"], "sa_iterations": 0},
    "dp+sa+hc": {"starts": ["dp"]},
    "uniform+sa+hc": {"starts": ["uniform"]},
    "dp_linear": {"starts": ["dp_linear"], **_PHASES_OFF},
    "dp_linear+hc": {"starts": ["dp_linear"], "sa_iterations": 0},
    "dp_linear+sa+hc": {"starts": ["dp_linear"]},
    # the cheapest that kept quality on average: DP on 2 pairs, then hill climbing that screens on 2 pairs,
    # confirms the best 2 and makes no far jumps
    "lean": {"starts": ["dp"], "dp_samples": 2, "sa_iterations": 0, "screen_samples": 2, "hc_confirm": 2,
             "hc_far_jumps": 0},
}
"""Search variants by their phases; options not named are the Kedro default's (`kedro`) without its
per-budget settings, and a variant that names its starts uses them at every budget."""
CALIBRATION_SET_SEED_STRIDE = 1000
"""Calibration set k uses the default set's prompts with their noise seeds shifted by k times this."""
_SEARCH_KEYS = (*(f.name for f in fields(SearchConfig)), *TIGHT_KEYS, BUDGET_SETTINGS_KEY)
COLUMNS = ["budget", "seed", "calibration_set", "variant", "calibration_mse", "holdout_mse", "holdout_vs_kedro",
           "calibration_rollouts", "search_seconds", "mask"]


def kedro_search_options(project_root: Path, env: str | None = None) -> tuple[dict[str, Any], str]:
    """The search settings `kedro run --env ENV` uses (conf/base with the environment's overrides, read by
    the project's own config loader) and its forecast, so the ablation measures what runs."""
    from kedro.config import MissingConfigException, OmegaConfigLoader

    from budcache_pipeline.settings import CONFIG_LOADER_ARGS

    conf = project_root / "conf"
    if not (conf / "base").is_dir():
        raise FileNotFoundError(f"{conf / 'base'} not found: run the ablation from the Kedro project")
    loader = OmegaConfigLoader(conf_source=str(conf), env=env, **CONFIG_LOADER_ARGS)
    try:
        search = loader["parameters"]["search"]
    except (MissingConfigException, KeyError) as exc:
        raise FileNotFoundError(f"no `search` parameters under {conf}: is this the budcache Kedro project?") from exc
    return {k: search[k] for k in _SEARCH_KEYS if k in search}, search.get("forecast", "linear")


def bench_ablation(
    budgets: Sequence[int] = ABLATION_BUDGETS,
    steps: int = 28,
    calibration_size: int = 16,
    holdout_size: int = 64,
    *,
    kedro_options: Mapping[str, Any],
    forecast: str = "linear",
    variants: Mapping[str, Mapping[str, Any]] = VARIANTS,
    seeds: Sequence[int] = (0,),
    calibration_sets: int = 1,
    adapter: Any = None,
    progress: Callable[[str], None] = print,
) -> pd.DataFrame:
    """One row per (budget, seed, calibration set, variant): calibration and held-out MSE, cost in
    calibration rollouts, mask.

    `seeds` replace the search seed of every variant, the Kedro default's included; each of the
    `calibration_sets` sets is searched at every seed.
    """
    from budcache_pipeline.bench_quality import default_prompt_sets
    from budcache_pipeline.search import MaskObjective, compute_reference, search_policy
    from budcache_pipeline.search.objective import mask_key

    budgets = sorted({int(b) for b in budgets}, reverse=True)
    if not budgets or not all(1 <= b < steps for b in budgets):
        raise ValueError(f"budgets must lie between 1 and steps - 1 = {steps - 1}, got {budgets}")
    seeds = list(dict.fromkeys(seeds))
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ValueError(f"seeds must be a non-empty list of integers, got {seeds}")
    if isinstance(calibration_sets, bool) or not isinstance(calibration_sets, int) or calibration_sets < 1:
        raise ValueError(f"calibration_sets must be an integer >= 1, got {calibration_sets!r}")
    if adapter is None:
        from budcache_pipeline.models.spec import load_adapter

        adapter = load_adapter({})
    calibration_pairs, holdout_pairs = default_prompt_sets(calibration_size, holdout_size)

    def reference(pairs: Sequence[tuple[str, int, int]]) -> Any:
        return compute_reference(adapter, [p for p, _, _ in pairs], [s for _, _, s in pairs], steps, Size(16, 16),
                                 progress=False)

    calibrations = [
        reference([(p, c, s + CALIBRATION_SET_SEED_STRIDE * k) for p, c, s in calibration_pairs])
        for k in range(calibration_sets)
    ]
    holdout = MaskObjective(adapter, reference(holdout_pairs), forecast=forecast)
    everything = {"kedro": dict(kedro_options), **{n: _variant(kedro_options, o) for n, o in variants.items()}}
    rows = []
    runs = itertools.product(budgets, seeds, enumerate(calibrations), everything.items())
    for budget, seed, (number, calibration), (name, chosen) in runs:
        clock = time.perf_counter()
        config = SearchConfig.from_params({**chosen, "seed": seed}, budget, steps)
        result = search_policy(MaskObjective(adapter, calibration, forecast=forecast), budget, config)
        rows.append({"budget": budget, "seed": seed, "calibration_set": number, "variant": name,
                     "calibration_mse": result.loss, "holdout_mse": holdout(result.mask),
                     "calibration_rollouts": result.cost["calibration_rollouts"],
                     "search_seconds": time.perf_counter() - clock, "mask": mask_key(result.mask)})
        progress(f"B={budget} seed {seed} set {number} {name}: held-out {rows[-1]['holdout_mse']:.3e}, "
                 f"{rows[-1]['calibration_rollouts']:.2f} calibration rollouts")
    table = pd.DataFrame(rows)
    same = ["budget", "seed", "calibration_set"]
    kedro = table[table["variant"] == "kedro"].set_index(same)["holdout_mse"]
    table["holdout_vs_kedro"] = table["holdout_mse"] / kedro.reindex(pd.MultiIndex.from_frame(table[same])).to_numpy()
    return table[COLUMNS]


def _variant(kedro_options: Mapping[str, Any], variant: Mapping[str, Any]) -> dict[str, Any]:
    options = {**kedro_options, **variant}
    options.pop(BUDGET_SETTINGS_KEY, None)
    if "starts" in variant:
        for key in TIGHT_KEYS:
            options.pop(key, None)
    return options


def format_ablation(table: pd.DataFrame) -> str:
    """The ablation as a terminal table, with the mean cost per variant underneath and, over several seeds,
    each variant's geometric-mean held-out MSE relative to the default per budget."""
    shown = table.to_string(index=False, float_format=lambda v: f"{v:.3g}")
    means = table.groupby("variant", sort=False)["calibration_rollouts"].mean()
    text = shown + "\n\nmean calibration rollouts per budget: " + ", ".join(f"{n} {v:.2f}" for n, v in means.items())
    if table["seed"].nunique() > 1 or table["calibration_set"].nunique() > 1:
        relative = np.exp(np.log(table["holdout_vs_kedro"]).groupby([table["budget"], table["variant"]], sort=False)
                          .mean()).unstack("variant")
        text += "\n\nheld-out MSE / default, geometric mean over seeds and calibration sets:\n" + relative.to_string(
            float_format=lambda v: f"{v:.3g}")
    return text
