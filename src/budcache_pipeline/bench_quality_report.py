"""The JSON and the terminal table of `budcache bench quality`: per-budget ratios with intervals, goals, run record."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from budcache_pipeline.bench_fid import format_fid
from budcache_pipeline.caching.budcache import transformer_blocks
from budcache_pipeline.evaluation import BaselineCalibrator, Calibration, best_per_budget, finite_or_none
from budcache_pipeline.evaluation.intervals import ratio_interval
from budcache_pipeline.search.objective import mask_key

QUALITY_GOALS = {"ratio": 0.60, "multi_over_single": 0.70, "reuse_over_naive": 0.40, "search_seconds": 30.0}


def _budget_record(
    table: Any, entry: dict[str, Any], budget: int, heuristics: Sequence[str], blocks_matched: Sequence[str],
    per_sample: dict[tuple[str, int], Any],
) -> dict[str, Any]:
    """One budget's figures: the searched policy's held-out MSE against the best heuristic, with intervals."""
    rows = table[table["budget"] == budget]
    mse = {name: float(value) for name, value in rows.set_index("method")["latent_mse"].items()}
    multi, single = entry["multi"]["result"], entry["single"]["result"]
    record: dict[str, Any] = {
        "budcache_mse": mse["budcache"],
        "budcache_single_mse": mse["budcache_single"],
        "multi_over_single": mse["budcache"] / mse["budcache_single"],
        "mask": mask_key(multi.mask),
        "single_mask": mask_key(single.mask),
        "search_calibration_loss": multi.loss,
        "start_spread": multi.spread,
        "reuse_over_naive": multi.cost["block_stack_calls"] / max(multi.cost["block_stack_calls_naive"], 1e-12),
        "search_calibration_rollouts": multi.cost["calibration_rollouts"],
        "search_seconds": entry["multi"]["seconds"],
        "search_cpu_seconds": entry["multi"]["cpu_seconds"],
        "single_search_seconds": entry["single"]["seconds"],
    }
    present = [h for h in heuristics if h in mse]
    if present:
        best = best_per_budget(rows, present).iloc[0]
        record.update(best_heuristic=best["method"], best_heuristic_mse=float(best["latent_mse"]),
                      ratio=mse["budcache"] / float(best["latent_mse"]))
        pair = {"budcache": per_sample[("budcache", budget)], "best": per_sample[(best["method"], budget)]}
        interval = ratio_interval(pair, "budcache", "best", seed=budget)
        record.update(ratio_interval=[interval.low, interval.high], ratio_below_one=interval.high < 1)
    present_blocks = [h for h in blocks_matched if h in mse]
    if present_blocks:
        best = best_per_budget(rows, present_blocks).iloc[0]
        record.update(best_heuristic_matched_blocks=best["method"],
                      best_heuristic_matched_blocks_mse=float(best["latent_mse"]),
                      ratio_matched_blocks=mse["budcache"] / float(best["latent_mse"]))
    if "alignment" in entry:
        record["alignment"] = _alignment_record(entry["alignment"], mse, record, budget, per_sample)
    return record


def _alignment_record(
    alignment: dict[str, Any], mse: dict[str, float], record: dict[str, Any], budget: int,
    per_sample: dict[tuple[str, int], Any],
) -> dict[str, Any]:
    """The alignment's report with its held-out MSE; the aligned ratio goes into `record` when it won."""
    out = dict(alignment)
    if "budcache_aligned" in mse:
        aligned = mse["budcache_aligned"]
        out.update(holdout_mse=aligned, lowers_holdout_mse=aligned < mse["budcache"])
        if aligned < mse["budcache"] and "best_heuristic_mse" in record:
            record["ratio_with_alignment"] = aligned / record["best_heuristic_mse"]
            pair = {"aligned": per_sample[("budcache_aligned", budget)],
                    "best": per_sample[(record["best_heuristic"], budget)]}
            interval = ratio_interval(pair, "aligned", "best", seed=budget)
            record["ratio_with_alignment_interval"] = [interval.low, interval.high]
    return out


def quality_summary(
    table: Any, searches: dict[int, dict[str, Any]], calibrations: Sequence[Calibration], budgets: list[int],
    per_sample: dict[tuple[str, int], Any],
) -> dict[str, Any]:
    """Per-budget ratios (with intervals over the held-out pairs), aggregates and goals."""
    heuristics = [c.name for c in calibrations if c.match == "compute"]
    blocks_matched = [c.name for c in calibrations if c.match == "blocks" or c.name != "first_block_cache"]
    per_budget = {
        str(b): _budget_record(table, searches[b], b, heuristics, blocks_matched, per_sample) for b in budgets
    }
    calls = sum(searches[b]["multi"]["result"].cost["block_stack_calls"] for b in budgets)
    naive = sum(searches[b]["multi"]["result"].cost["block_stack_calls_naive"] for b in budgets)
    reuse = calls / naive if naive else None
    search_seconds = {str(b): per_budget[str(b)]["search_seconds"] for b in budgets}
    search_cpu_seconds = {str(b): per_budget[str(b)]["search_cpu_seconds"] for b in budgets}
    multi_over_single = sum(r["multi_over_single"] for r in per_budget.values()) / len(per_budget)
    ratios = [r["ratio"] for r in per_budget.values() if "ratio" in r]
    goals = {
        "ratio_max": QUALITY_GOALS["ratio"],
        "ratio_met": bool(ratios) and max(ratios) <= QUALITY_GOALS["ratio"],
        "multi_over_single_max": QUALITY_GOALS["multi_over_single"],
        "multi_over_single_met": multi_over_single <= QUALITY_GOALS["multi_over_single"],
        "reuse_over_naive_max": QUALITY_GOALS["reuse_over_naive"],
        "reuse_over_naive_met": reuse is not None and reuse <= QUALITY_GOALS["reuse_over_naive"],
        "search_seconds_max": QUALITY_GOALS["search_seconds"],
        "search_seconds_met": max(search_seconds.values()) <= QUALITY_GOALS["search_seconds"],
        "search_cpu_seconds_met": max(search_cpu_seconds.values()) <= QUALITY_GOALS["search_seconds"],
    }
    return {
        "budgets": per_budget,
        "multi_over_single": multi_over_single,
        "reuse_over_naive": reuse,
        "search_seconds": search_seconds,
        "search_cpu_seconds": search_cpu_seconds,
        "goals": goals,
    }


def run_record(
    transformer: Any, calibrator: BaselineCalibrator, calibrations: Sequence[Calibration],
    unreachable: list[dict[str, Any]], timings: dict[str, float], settings: dict[str, Any], table: Any,
) -> dict[str, Any]:
    """What the run measured besides the headline: calibrations, fitted baselines, timings, the full table."""
    fit = calibrator.teacache_fit
    return {
        "model": settings["model"],
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "blocks_per_stack": len(transformer_blocks(transformer)),
        "teacache_fit": {"coefficients": list(fit.coefficients), "r_squared": fit.r_squared} if fit else None,
        "mag_ratios": list(calibrator.mag_ratios),
        "baseline_calibrations": [c.summary() for c in calibrations],
        "unreachable": unreachable,
        "timings": timings,
        "settings": settings,
        "rows": [{k: finite_or_none(v) for k, v in row.items()} for row in table.to_dict(orient="records")],
    }
def format_quality_table(result: dict[str, Any]) -> str:
    """The held-out table and the headline figures of `bench_quality`, for a terminal."""
    import pandas as pd

    from budcache_pipeline.reporting import quality_table

    lines = [quality_table(pd.DataFrame(result["rows"])), ""]
    lines.append(f"{'budget':>6} {'budcache':>10} {'best heuristic':>22} {'ratio':>6} {'95% interval':>14} "
                 f"{'aligned':>7} {'blocks-matched':>22} {'ratio':>6} {'search s':>8} {'rollouts':>8} {'align':>6}")
    for budget, r in result["budgets"].items():
        best = f"{r.get('best_heuristic', '-')} {r.get('best_heuristic_mse', float('nan')):.2e}"
        blocks = (
            f"{r.get('best_heuristic_matched_blocks', '-')} "
            f"{r.get('best_heuristic_matched_blocks_mse', float('nan')):.2e}"
        )
        low, high = r.get("ratio_interval", [float("nan")] * 2)
        lines.append(f"{budget:>6} {r['budcache_mse']:>10.2e} {best:>22} {r.get('ratio', float('nan')):>6.2f} "
                     f"{f'[{low:.2f}, {high:.2f}]':>14} {r.get('ratio_with_alignment', float('nan')):>7.2f} "
                     f"{blocks:>22} {r.get('ratio_matched_blocks', float('nan')):>6.2f} "
                     f"{r['search_seconds']:>8.1f} {r.get('search_calibration_rollouts', float('nan')):>8.2f} "
                     f"{r.get('alignment', {}).get('calibration_rollouts', float('nan')):>6.1f}")
    goals = result["goals"]
    reuse = result["reuse_over_naive"]
    lines.append(
        f"multi/single {result['multi_over_single']:.3f} (goal <= {goals['multi_over_single_max']}), "
        f"reuse/naive {reuse if reuse is None else f'{reuse:.3f}'} (goal <= {goals['reuse_over_naive_max']}), "
        f"ratio goal <= {goals['ratio_max']}: {'met' if goals['ratio_met'] else 'missed'}"
    )
    lines.append("ratio intervals: 95% paired bootstrap over the held-out pairs (an upper end below 1: beyond the noise); "
                 "aligned: with the learned schedule and forecast gains; rollouts: the search's cost and align: "
                 "the alignment's, in calibration rollouts")
    if "fid" in result:
        lines.extend(format_fid(result["fid"]))
    return "\n".join(lines)
