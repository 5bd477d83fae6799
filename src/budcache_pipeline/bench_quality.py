"""`budcache bench quality`: searched policies against every heuristic at matched budgets, on held-out pairs."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from budcache_pipeline.bench_fid import FID_BUDGETS, bench_fid_comparison
from budcache_pipeline.models.adapter import Size
from budcache_pipeline.search.config import SearchConfig

QUALITY_BUDGETS = (14, 10, 7, 5, 4, 3)
QUALITY_STEPS = 28
ALIGN_MAX_BUDGET_FRACTION = 0.3
QUALITY_GOALS = {"ratio": 0.60, "multi_over_single": 0.70, "reuse_over_naive": 0.40, "search_seconds": 30.0}
# Half the library's default SA and HC work: on the default model at 32 calibration pairs it found
# the same masks as the defaults at every budget (linear forecast), in ~75% of the time.
QUALITY_SEARCH = SearchConfig(sa_iterations=100, hc_rounds=10)


def default_prompt_sets(
    calibration_size: int, holdout_size: int
) -> tuple[list[tuple[str, int, int]], list[tuple[str, int, int]]]:
    """The default model's bench prompt sets: (prompt, category, seed), disjoint in prompts and seeds."""
    from budcache_pipeline.models.adapter import adapter_class
    from budcache_pipeline.models.spec import ModelSpec

    return adapter_class(ModelSpec().adapter).benchmark_prompt_sets(calibration_size, holdout_size)


def _json_number(value: Any) -> Any:
    from budcache_pipeline.evaluation import finite_or_none

    return finite_or_none(value)


def bench_quality(
    budgets: Sequence[int] = QUALITY_BUDGETS,
    steps: int = QUALITY_STEPS,
    calibration_size: int = 32,
    holdout_size: int = 64,
    *,
    adapter: Any = None,
    prompt_sets: tuple[Sequence[tuple[str, int, int]], Sequence[tuple[str, int, int]]] | None = None,
    size: int = 16,
    baselines: Sequence[str] | None = None,
    search: SearchConfig = QUALITY_SEARCH,
    align: bool = True,
    align_iterations: int = 40,
    forecast: str = "linear",
    timing_images: int = 8,
    image_metrics: bool = True,
    fid_samples: int = 0,
    fid_budgets: Sequence[int] = FID_BUDGETS,
    out_dir: str | None = None,
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Searched policies against every heuristic at matched budgets, judged on held-out prompts and seeds.

    Calibration pairs feed the reference trajectories, the BudCache search (also run
    on the first pair alone, as the published code calibrates) and every baseline's
    bisection; the table compares all of them on the held-out pairs. `adapter` defaults
    to the shipped default model; image metrics come from its quality plug-in.
    `search` is the BudCache search's settings and `forecast` the searched policies' forecast
    ("reuse" is the paper's plain reuse). `fid_samples` > 0 adds the FID comparison of
    `bench_fid` at `fid_budgets` on that many more held-out pairs (the default model's
    prompt sets; its judge embeds the images).
    """
    import pathlib

    from budcache_pipeline.caching.baselines import METHODS, TEACACHE_PUBLISHED, BaselineError, CacheMethod
    from budcache_pipeline.caching.budcache import transformer_blocks
    from budcache_pipeline.evaluation import (
        BaselineCalibrator,
        EvalMethod,
        QualityMetrics,
        RolloutSet,
        evaluate_methods,
        teacache_mask,
    )
    from budcache_pipeline.search import MaskObjective, align_schedule, compute_reference, search_policy
    from budcache_pipeline.metrics import latent_mse
    from budcache_pipeline.search.objective import mask_key

    started = time.perf_counter()
    budgets = sorted({int(b) for b in budgets}, reverse=True)
    if not budgets or not all(1 <= b < steps for b in budgets):
        raise ValueError(f"budgets must lie between 1 and steps - 1 = {steps - 1}, got {budgets}")
    if fid_samples < 0 or fid_samples == 1:
        raise ValueError(f"fid_samples must be 0 (no FID comparison) or at least 2, got {fid_samples}")
    model = "default model" if adapter is None else type(adapter.pipe).__name__
    baselines = list(baselines) if baselines is not None else [*METHODS, TEACACHE_PUBLISHED]
    if adapter is None:
        from budcache_pipeline.models.spec import load_adapter

        adapter = load_adapter({})
    calibration_pairs, holdout_pairs = prompt_sets or default_prompt_sets(calibration_size, holdout_size)
    if set(p for p, _, _ in calibration_pairs) & set(p for p, _, _ in holdout_pairs) or set(
        s for _, _, s in calibration_pairs
    ) & set(s for _, _, s in holdout_pairs):
        raise ValueError("calibration and held-out pairs must share no prompt and no seed")
    out = pathlib.Path(out_dir) if out_dir is not None else None
    timings: dict[str, float] = {}

    def reference(pairs: Sequence[tuple[str, int, int]], name: str) -> Any:
        return compute_reference(
            adapter, [p for p, _, _ in pairs], [s for _, _, s in pairs], steps, Size(size, size),
            out_dir=out / "reference" / name if out is not None else None, progress=False,
        )

    clock = time.perf_counter()
    calibration_ref, holdout_ref = reference(calibration_pairs, "calibration"), reference(holdout_pairs, "holdout")
    single_ref = calibration_ref.subset([0])
    timings["reference_seconds"] = time.perf_counter() - clock
    calibration = RolloutSet.from_reference(adapter, calibration_ref)
    holdout = RolloutSet.from_reference(adapter, holdout_ref)
    num_blocks = len(transformer_blocks(adapter.transformer))
    progress(f"references: {len(calibration)} calibration and {len(holdout)} held-out pairs, {steps} steps")

    clock = time.perf_counter()
    calibrator = BaselineCalibrator(calibration)
    calibrations, unreachable = [], {}
    for budget in budgets:
        for name in baselines:
            matches = ("compute", "blocks") if name == "first_block_cache" else ("compute",)
            for match in matches:
                try:
                    result = calibrator.calibrate(name, budget, match)
                except BaselineError as exc:
                    unreachable[f"{name}:{match}:{budget}"] = str(exc)
                    progress(f"{name} ({match}) at B={budget}: {exc}")
                    continue
                calibrations.append(result)
                progress(
                    f"{result.name} B={budget}: parameter {result.method.parameter}, "
                    f"{result.mean_compute_steps:.2f}±{result.std_compute_steps:.2f} steps, "
                    f"{result.mean_block_evaluations:.1f} block evals, calibration loss {result.loss:.4g}"
                )
    timings["baseline_calibration_seconds"] = time.perf_counter() - clock

    searches: dict[int, dict[str, Any]] = {}
    methods: list[EvalMethod] = []
    tea_by_budget = {c.budget: c.method for c in calibrations if c.name == "teacache"}
    for budget in budgets:
        entry: dict[str, Any] = {}
        for label, ref, data in (("multi", calibration_ref, calibration), ("single", single_ref, None)):
            extra = {}
            if budget in tea_by_budget:
                source = data if data is not None else calibration.subset(slice(0, 1))
                extra["teacache"] = teacache_mask(tea_by_budget[budget], source, budget)
            clock, cpu_clock = time.perf_counter(), time.process_time()
            objective = MaskObjective(adapter, ref, forecast=forecast)
            result = search_policy(objective, budget, search, extra_starts=extra)
            seconds = time.perf_counter() - clock
            entry[label] = {"result": result, "seconds": seconds, "cpu_seconds": time.process_time() - cpu_clock}
            progress(
                f"search ({label}) B={budget}: loss {result.loss:.4g} in {seconds:.1f} s, "
                f"{result.cost['block_stack_calls']:.0f}/{result.cost['block_stack_calls_naive']:.0f} "
                f"block-stack calls ({result.cost['calibration_rollouts']:.2f} calibration rollouts), "
                f"mask {mask_key(result.mask)}"
            )
        multi = entry["multi"]["result"]
        methods.append(EvalMethod("budcache", budget, CacheMethod.fixed(multi.mask, forecast=forecast),
                                  {"calibration_loss": multi.loss}))
        methods.append(EvalMethod("budcache_single", budget,
                                  CacheMethod.fixed(entry["single"]["result"].mask, forecast=forecast),
                                  {"calibration_loss": entry["single"]["result"].loss}))
        if align and budget / steps <= ALIGN_MAX_BUDGET_FRACTION:
            clock = time.perf_counter()
            aligned = min(
                (align_schedule(adapter, calibration_ref, multi.mask, variant=variant, iterations=align_iterations,
                                progress=False, forecast=forecast) for variant in ("full", "segment")),
                key=lambda a: a.loss_after,
            )
            entry["alignment"] = {"variant": aligned.variant, "calibration_loss_before": aligned.loss_before,
                                  "calibration_loss_after": aligned.loss_after,
                                  "seconds": time.perf_counter() - clock}
            progress(f"alignment B={budget}: {aligned.variant} {aligned.loss_before:.4g} -> {aligned.loss_after:.4g}")
            if aligned.improved:
                methods.append(EvalMethod("budcache_aligned", budget,
                                          CacheMethod.fixed(multi.mask, aligned.sigmas, forecast),
                                          {"calibration_loss": aligned.loss_after, "variant": aligned.variant}))
        searches[budget] = entry
    for c in calibrations:
        methods.append(EvalMethod(c.name, c.budget, c.method, {"calibration_loss": c.loss,
                                                               "calibration_steps": c.mean_compute_steps}))

    quality = QualityMetrics()
    if image_metrics:
        quality = adapter.quality_metrics(holdout_ref, [str(c) for _, c, _ in holdout_pairs])
    clock = time.perf_counter()
    finals: dict[tuple[str, int], torch.Tensor] = {}
    table = evaluate_methods(holdout, methods, quality, timing_images=timing_images, collect=finals, progress=progress)
    timings["evaluation_seconds"] = time.perf_counter() - clock
    fid = None
    if fid_samples:
        clock = time.perf_counter()
        pairs = default_prompt_sets(calibration_size, fid_samples)[1]
        fid = bench_fid_comparison(adapter, table, methods, quality, pairs, fid_budgets, steps, Size(size, size),
                                   progress)
        timings["fid_seconds"] = time.perf_counter() - clock
    if out is not None:
        from budcache_pipeline.reporting import plot_quality_bench

        masks = {b: e["multi"]["result"].mask for b, e in searches.items()}
        histories = {b: e["multi"]["result"].history for b, e in searches.items()}
        plot_quality_bench(out, table, masks, histories, finals, quality.decode, steps)
    timings["total_seconds"] = time.perf_counter() - started
    settings = {
        "model": model,
        "model_fingerprint": calibration_ref.manifest.get("model_fingerprint"),
        "weights_sha256": _weights_sha256(adapter.transformer),
        "calibration_pairs": len(calibration),
        "holdout_pairs": len(holdout),
        "steps": steps,
        "size": size,
        "threads": torch.get_num_threads(),
        "search_options": search.to_dict(),
        "baselines": baselines,
        "calibration_prompts": [p for p, _, _ in calibration_pairs],
        "holdout_prompts": [p for p, _, _ in holdout_pairs],
        "align_iterations": align_iterations,
        "forecast": forecast,
    }
    per_sample = {key: latent_mse(final, holdout.reference, per_sample=True).numpy() for key, final in finals.items()}
    summary = _quality_summary(
        table, searches, calibrations, unreachable, budgets, num_blocks, timings, settings, calibrator, per_sample
    )
    if fid is not None:
        summary["fid"] = fid
        summary["goals"]["fid_shift_ratio_met"] = all(r.get("shift_ratio_met", False) for r in fid["budgets"].values())
    return summary


def _weights_sha256(module: torch.nn.Module) -> str:
    """Hash of the weights themselves: the fingerprint names the architecture, this the trained model."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _quality_summary(
    table: Any,
    searches: dict[int, dict[str, Any]],
    calibrations: list[Any],
    unreachable: dict[str, str],
    budgets: list[int],
    num_blocks: int,
    timings: dict[str, float],
    settings: dict[str, Any],
    calibrator: Any,
    per_sample: dict[tuple[str, int], Any],
) -> dict[str, Any]:
    """The JSON of `budcache bench quality`: per-budget ratios (with intervals over the held-out pairs),
    aggregates, goals, and the full table."""
    import os

    from budcache_pipeline.evaluation import best_per_budget
    from budcache_pipeline.evaluation.intervals import ratio_interval

    heuristics = [c.name for c in calibrations if c.match == "compute"]
    blocks_matched = [c.name for c in calibrations if c.match == "blocks" or c.name != "first_block_cache"]
    per_budget, multi_over_single, calls, naive = {}, [], 0.0, 0.0
    for budget in budgets:
        rows = table[table["budget"] == budget].set_index("method")
        mse = {name: float(value) for name, value in rows["latent_mse"].items()}
        entry = searches[budget]
        multi, single = entry["multi"]["result"], entry["single"]["result"]
        calls += multi.cost["block_stack_calls"]
        naive += multi.cost["block_stack_calls_naive"]
        record: dict[str, Any] = {
            "budcache_mse": mse["budcache"],
            "budcache_single_mse": mse["budcache_single"],
            "multi_over_single": mse["budcache"] / mse["budcache_single"],
            "mask": "".join("1" if m else "0" for m in multi.mask),
            "single_mask": "".join("1" if m else "0" for m in single.mask),
            "search_calibration_loss": multi.loss,
            "start_spread": multi.spread,
            "reuse_over_naive": multi.cost["block_stack_calls"] / max(multi.cost["block_stack_calls_naive"], 1e-12),
            "search_calibration_rollouts": multi.cost["calibration_rollouts"],
            "search_seconds": entry["multi"]["seconds"],
            "search_cpu_seconds": entry["multi"]["cpu_seconds"],
            "single_search_seconds": entry["single"]["seconds"],
        }
        multi_over_single.append(record["multi_over_single"])
        present = [h for h in heuristics if h in mse]
        if present:
            best = best_per_budget(table[table["budget"] == budget], present).iloc[0]
            record.update(best_heuristic=best["method"], best_heuristic_mse=float(best["latent_mse"]),
                          ratio=mse["budcache"] / float(best["latent_mse"]))
            pair = {"budcache": per_sample[("budcache", budget)], "best": per_sample[(best["method"], budget)]}
            interval = ratio_interval(pair, "budcache", "best", seed=budget)
            record.update(ratio_interval=[interval.low, interval.high], ratio_below_one=interval.high < 1)
        present_blocks = [h for h in blocks_matched if h in mse]
        if present_blocks:
            best = best_per_budget(table[table["budget"] == budget], present_blocks).iloc[0]
            record.update(best_heuristic_matched_blocks=best["method"],
                          best_heuristic_matched_blocks_mse=float(best["latent_mse"]),
                          ratio_matched_blocks=mse["budcache"] / float(best["latent_mse"]))
        if "alignment" in entry:
            record["alignment"] = dict(entry["alignment"])
            if "budcache_aligned" in mse:
                aligned = mse["budcache_aligned"]
                record["alignment"].update(holdout_mse=aligned, lowers_holdout_mse=aligned < mse["budcache"])
                if aligned < mse["budcache"] and "best_heuristic_mse" in record:
                    record["ratio_with_alignment"] = aligned / record["best_heuristic_mse"]
                    pair = {"aligned": per_sample[("budcache_aligned", budget)],
                            "best": per_sample[(record["best_heuristic"], budget)]}
                    interval = ratio_interval(pair, "aligned", "best", seed=budget)
                    record["ratio_with_alignment_interval"] = [interval.low, interval.high]
        per_budget[str(budget)] = record
    reuse = calls / naive if naive else None
    search_seconds = {str(b): per_budget[str(b)]["search_seconds"] for b in budgets}
    search_cpu_seconds = {str(b): per_budget[str(b)]["search_cpu_seconds"] for b in budgets}
    mean_multi_over_single = sum(multi_over_single) / len(multi_over_single)
    ratios = [r["ratio"] for r in per_budget.values() if "ratio" in r]
    goals = {
        "ratio_max": QUALITY_GOALS["ratio"],
        "ratio_met": bool(ratios) and max(ratios) <= QUALITY_GOALS["ratio"],
        "multi_over_single_max": QUALITY_GOALS["multi_over_single"],
        "multi_over_single_met": mean_multi_over_single <= QUALITY_GOALS["multi_over_single"],
        "reuse_over_naive_max": QUALITY_GOALS["reuse_over_naive"],
        "reuse_over_naive_met": reuse is not None and reuse <= QUALITY_GOALS["reuse_over_naive"],
        "search_seconds_max": QUALITY_GOALS["search_seconds"],
        "search_seconds_met": max(search_seconds.values()) <= QUALITY_GOALS["search_seconds"],
        "search_cpu_seconds_met": max(search_cpu_seconds.values()) <= QUALITY_GOALS["search_seconds"],
    }
    fit = calibrator.teacache_fit
    return {
        "model": settings["model"],
        "budgets": per_budget,
        "multi_over_single": mean_multi_over_single,
        "reuse_over_naive": reuse,
        "search_seconds": search_seconds,
        "search_cpu_seconds": search_cpu_seconds,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "goals": goals,
        "blocks_per_stack": num_blocks,
        "teacache_fit": {"coefficients": list(fit.coefficients), "r_squared": fit.r_squared} if fit else None,
        "mag_ratios": list(calibrator.mag_ratios),
        "baseline_calibrations": [c.summary() for c in calibrations],
        "unreachable": unreachable,
        "timings": timings,
        "settings": settings,
        "rows": [{k: _json_number(v) for k, v in row.items()} for row in table.to_dict(orient="records")],
    }


def format_quality_table(result: dict[str, Any]) -> str:
    """The held-out table and the headline figures of `bench_quality`, for a terminal."""
    import pandas as pd

    from budcache_pipeline.reporting import quality_table

    lines = [quality_table(pd.DataFrame(result["rows"])), ""]
    lines.append(f"{'budget':>6} {'budcache':>10} {'best heuristic':>22} {'ratio':>6} {'95% interval':>14} "
                 f"{'blocks-matched':>22} {'ratio':>6} {'search s':>8}")
    for budget, r in result["budgets"].items():
        best = f"{r.get('best_heuristic', '-')} {r.get('best_heuristic_mse', float('nan')):.2e}"
        blocks = (
            f"{r.get('best_heuristic_matched_blocks', '-')} "
            f"{r.get('best_heuristic_matched_blocks_mse', float('nan')):.2e}"
        )
        low, high = r.get("ratio_interval", [float("nan")] * 2)
        lines.append(f"{budget:>6} {r['budcache_mse']:>10.2e} {best:>22} {r.get('ratio', float('nan')):>6.2f} "
                     f"{f'[{low:.2f}, {high:.2f}]':>14} {blocks:>22} {r.get('ratio_matched_blocks', float('nan')):>6.2f} "
                     f"{r['search_seconds']:>8.1f}")
    goals = result["goals"]
    reuse = result["reuse_over_naive"]
    lines.append(
        f"multi/single {result['multi_over_single']:.3f} (goal <= {goals['multi_over_single_max']}), "
        f"reuse/naive {reuse if reuse is None else f'{reuse:.3f}'} (goal <= {goals['reuse_over_naive_max']}), "
        f"ratio goal <= {goals['ratio_max']}: {'met' if goals['ratio_met'] else 'missed'}"
    )
    lines.append("ratio intervals: 95% paired bootstrap over the held-out pairs (an upper end below 1: beyond the noise)")
    if "fid" in result:
        from budcache_pipeline.bench_fid import format_fid

        lines.extend(format_fid(result["fid"]))
    return "\n".join(lines)
