"""`budcache bench quality`: searched policies against every heuristic at matched budgets, on held-out pairs.

The stages are the Kedro project's, through the same library calls: reference trajectories,
baselines calibrated to each budget (`evaluation.calibrate_baselines`, as the evaluate node),
the search per budget (also on the first calibration pair alone, as the published code
calibrates), schedule alignment at tight budgets, and the held-out table (`evaluate_methods`).
"""

from __future__ import annotations

import hashlib
import pathlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from budcache_pipeline.baselines import FixedPolicy
from budcache_pipeline.bench_fid import FID_BUDGETS, bench_fid_comparison
from budcache_pipeline.bench_quality_report import quality_summary, run_record
from budcache_pipeline.evaluation import (
    BaselineCalibrator,
    Calibration,
    EvalMethod,
    QualityMetrics,
    RolloutSet,
    calibrate_baselines,
    evaluate_methods,
    teacache_mask,
)
from budcache_pipeline.metrics import latent_mse
from budcache_pipeline.models.adapter import Size
from budcache_pipeline.search import MaskObjective, SearchConfig, align_schedule, compute_reference, search_policy
from budcache_pipeline.search.objective import mask_key

QUALITY_BUDGETS = (14, 10, 7, 5, 4, 3)
QUALITY_STEPS = 28
QUALITY_BASELINES = (
    "uniform", "teacache", "first_block_cache", "first_block_cache@blocks", "mag_cache", "taylorseer", "teacache_flux",
)
"""The evaluate pipeline's baseline entries, plus TeaCache with FLUX.1's published polynomial."""
ALIGN_MAX_BUDGET_FRACTION = 0.3
ALIGN_GAIN_CHANNELS = 64
"""Forecast-gain channel groups the bench's alignment learns (the Kedro default, `align.gain_channels`)."""
# Half the library's default SA and HC work: on the default model at 32 calibration pairs it found
# the same masks as the defaults at every budget (linear forecast), in ~75% of the time.
QUALITY_SEARCH = SearchConfig(sa_iterations=100, hc_rounds=10)
QUALITY_BUDGET_SETTINGS: dict[int, dict[str, Any]] = {10: {"dp_samples": 2}}
"""Settings that replace QUALITY_SEARCH's at single budgets: the Kedro default's `search.budget_settings`."""

Pairs = Sequence[tuple[str, int, int]]


def default_prompt_sets(calibration_size: int, holdout_size: int) -> tuple[list[tuple[str, int, int]], ...]:
    """The default model's bench prompt sets: (prompt, category, seed), disjoint in prompts and seeds."""
    from budcache_pipeline.models.adapter import adapter_class
    from budcache_pipeline.models.spec import ModelSpec

    return adapter_class(ModelSpec().adapter).benchmark_prompt_sets(calibration_size, holdout_size)


@dataclass
class _Bench:
    """One bench run's model, settings and what its stages have produced so far."""

    adapter: Any
    model: str
    steps: int
    size: int
    forecast: str
    progress: Callable[[str], None]
    out: pathlib.Path | None
    gain_channels: int = ALIGN_GAIN_CHANNELS
    timings: dict[str, float] = field(default_factory=dict)
    references: dict[str, Any] = field(default_factory=dict)

    def reference(self, pairs: Pairs, name: str) -> Any:
        return compute_reference(
            self.adapter, [p for p, _, _ in pairs], [s for _, _, s in pairs], self.steps, Size(self.size, self.size),
            out_dir=self.out / "reference" / name if self.out is not None else None, progress=False,
        )

    def compute_references(self, calibration_pairs: Pairs, holdout_pairs: Pairs) -> tuple[RolloutSet, RolloutSet]:
        """Teacher trajectories of both sets, as rollout sets with their uncached finals."""
        clock = time.perf_counter()
        self.references = {"calibration": self.reference(calibration_pairs, "calibration"),
                           "holdout": self.reference(holdout_pairs, "holdout")}
        self.references["single"] = self.references["calibration"].subset([0])
        self.timings["reference_seconds"] = time.perf_counter() - clock
        sets = tuple(RolloutSet.from_reference(self.adapter, self.references[k]) for k in ("calibration", "holdout"))
        self.progress(f"references: {len(sets[0])} calibration and {len(sets[1])} held-out pairs, {self.steps} steps")
        return sets

    def timed(self, name: str, work: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """`work(*args, **kwargs)`, its wall time recorded under `name`."""
        clock = time.perf_counter()
        result = work(*args, **kwargs)
        self.timings[name] = time.perf_counter() - clock
        return result

    def plot(self, table: Any, searches: dict[int, dict[str, Any]], finals: dict[tuple[str, int], torch.Tensor],
             quality: QualityMetrics) -> None:
        """The bench's figures (Pareto, masks, convergence, sample grids) when it has a folder."""
        if self.out is None:
            return
        from budcache_pipeline.reporting import plot_quality_bench

        plot_quality_bench(self.out, table, {b: e["multi"]["result"].mask for b, e in searches.items()},
                           {b: e["multi"]["result"].history for b, e in searches.items()}, finals, quality.decode,
                           self.steps)

    def search(self, label: str, budget: int, config: SearchConfig, extra: dict[str, Any]) -> dict[str, Any]:
        """The search on the calibration set (`multi`) or its first pair (`single`), timed."""
        clock, cpu_clock = time.perf_counter(), time.process_time()
        objective = MaskObjective(self.adapter, self.references["single" if label == "single" else "calibration"],
                                  forecast=self.forecast)
        result = search_policy(objective, budget, config, extra_starts=extra)
        seconds = time.perf_counter() - clock
        self.progress(
            f"search ({label}) B={budget}: loss {result.loss:.4g} in {seconds:.1f} s, "
            f"{result.cost['block_stack_calls']:.0f}/{result.cost['block_stack_calls_naive']:.0f} "
            f"block-stack calls ({result.cost['calibration_rollouts']:.2f} calibration rollouts), "
            f"mask {mask_key(result.mask)}"
        )
        return {"result": result, "seconds": seconds, "cpu_seconds": time.process_time() - cpu_clock}

    def align(self, budget: int, mask: Sequence[bool], iterations: int) -> tuple[Any, dict[str, Any]]:
        """The better of the full and the segment-only alignment (schedule and gains) on the calibration set."""
        clock = time.perf_counter()
        results = [align_schedule(self.adapter, self.references["calibration"], mask, variant=variant,
                                  iterations=iterations, progress=False, forecast=self.forecast,
                                  gain_channels=self.gain_channels) for variant in ("full", "segment")]
        aligned = min(results, key=lambda a: a.loss_after)
        report = {"variant": aligned.variant, "calibration_loss_before": aligned.loss_before,
                  "calibration_loss_after": aligned.loss_after, "seconds": time.perf_counter() - clock,
                  "calibration_rollouts": sum(r.cost["calibration_rollouts"] for r in results)}
        self.progress(f"alignment B={budget}: {aligned.variant} {aligned.loss_before:.4g} -> {aligned.loss_after:.4g}")
        return aligned, report


def _checked_budgets(budgets: Sequence[int], steps: int, fid_samples: int) -> list[int]:
    budgets = sorted({int(b) for b in budgets}, reverse=True)
    if not budgets or not all(1 <= b < steps for b in budgets):
        raise ValueError(f"budgets must lie between 1 and steps - 1 = {steps - 1}, got {budgets}")
    if fid_samples < 0 or fid_samples == 1:
        raise ValueError(f"fid_samples must be 0 (no FID comparison) or at least 2, got {fid_samples}")
    return budgets


def _checked_pairs(prompt_sets: tuple[Pairs, Pairs]) -> tuple[Pairs, Pairs]:
    calibration_pairs, holdout_pairs = prompt_sets
    if {p for p, _, _ in calibration_pairs} & {p for p, _, _ in holdout_pairs} or {
        s for _, _, s in calibration_pairs
    } & {s for _, _, s in holdout_pairs}:
        raise ValueError("calibration and held-out pairs must share no prompt and no seed")
    return calibration_pairs, holdout_pairs


def _adapter_and_label(adapter: Any) -> tuple[Any, str]:
    """The adapter to bench (the shipped default model when None) and how the summary names it."""
    if adapter is not None:
        return adapter, type(adapter.pipe).__name__
    from budcache_pipeline.models.spec import load_adapter

    return load_adapter({}), "default model"


def _search_methods(
    bench: _Bench,
    budgets: Sequence[int],
    calibration: RolloutSet,
    calibrations: Sequence[Calibration],
    search: SearchConfig,
    budget_settings: Mapping[int, Mapping[str, Any]],
    align_iterations: int | None,
) -> tuple[dict[int, dict[str, Any]], list[EvalMethod]]:
    """Per budget the searches (TeaCache's mask as an extra start), the alignment at tight budgets, and
    the searched methods to evaluate (the aligned one only when alignment lowered the calibration loss)."""
    searches: dict[int, dict[str, Any]] = {}
    methods: list[EvalMethod] = []
    tea_by_budget = {c.budget: c.method for c in calibrations if c.name == "teacache"}
    for budget in budgets:
        entry: dict[str, Any] = {}
        for label, data in (("multi", calibration), ("single", calibration.subset(slice(0, 1)))):
            extra = {"teacache": teacache_mask(tea_by_budget[budget], data, budget)} if budget in tea_by_budget else {}
            entry[label] = bench.search(label, budget, replace(search, **budget_settings.get(budget, {})), extra)
        multi, single = entry["multi"]["result"], entry["single"]["result"]
        methods.append(EvalMethod("budcache", budget, FixedPolicy(multi.mask, forecast=bench.forecast),
                                  {"calibration_loss": multi.loss}))
        methods.append(EvalMethod("budcache_single", budget, FixedPolicy(single.mask, forecast=bench.forecast),
                                  {"calibration_loss": single.loss}))
        if align_iterations is not None and budget / bench.steps <= ALIGN_MAX_BUDGET_FRACTION:
            aligned, entry["alignment"] = bench.align(budget, multi.mask, align_iterations)
            if aligned.improved:
                methods.append(EvalMethod("budcache_aligned", budget,
                                          FixedPolicy(multi.mask, aligned.sigmas, bench.forecast, aligned.gains),
                                          {"calibration_loss": aligned.loss_after, "variant": aligned.variant}))
        searches[budget] = entry
    return searches, methods


def bench_quality(
    budgets: Sequence[int] = QUALITY_BUDGETS,
    steps: int = QUALITY_STEPS,
    calibration_size: int = 32,
    holdout_size: int = 64,
    *,
    adapter: Any = None,
    prompt_sets: tuple[Pairs, Pairs] | None = None,
    size: int = 16,
    baselines: Sequence[str] = QUALITY_BASELINES,
    search: SearchConfig = QUALITY_SEARCH,
    budget_settings: Mapping[int, Mapping[str, Any]] = QUALITY_BUDGET_SETTINGS,
    align: bool = True,
    align_iterations: int = 40,
    align_gain_channels: int = ALIGN_GAIN_CHANNELS,
    forecast: str = "linear",
    timing_images: int = 8,
    image_metrics: bool = True,
    fid_samples: int = 0,
    fid_budgets: Sequence[int] = FID_BUDGETS,
    out_dir: str | None = None,
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Searched policies against every heuristic at matched budgets, judged on held-out prompts and seeds.

    `baselines` are evaluate-pipeline entries (`name` or `name@blocks`). `adapter` defaults to
    the shipped default model; image metrics come from its quality plug-in. `search` is the
    BudCache search's settings, `budget_settings` replacements for single budgets, and `forecast`
    the searched policies' forecast ("reuse" is the paper's plain reuse); `align_gain_channels` the
    forecast-gain groups alignment learns (0: sigmas only). `fid_samples` > 0 adds the FID
    comparison of `bench_fid` at `fid_budgets` on that many more held-out pairs.
    """
    started = time.perf_counter()
    budgets = _checked_budgets(budgets, steps, fid_samples)
    adapter, model = _adapter_and_label(adapter)
    calibration_pairs, holdout_pairs = _checked_pairs(prompt_sets or default_prompt_sets(calibration_size, holdout_size))
    bench = _Bench(adapter, model, steps, size, forecast, progress, pathlib.Path(out_dir) if out_dir else None,
                   align_gain_channels)
    calibration, holdout = bench.compute_references(calibration_pairs, holdout_pairs)
    calibrator = BaselineCalibrator(calibration)
    calibrations, unreachable = bench.timed("baseline_calibration_seconds", calibrate_baselines,
                                            calibrator, baselines, budgets, progress)
    searches, methods = _search_methods(bench, budgets, calibration, calibrations, search, budget_settings,
                                        align_iterations if align else None)
    methods += [EvalMethod(c.name, c.budget, c.method, c.info()) for c in calibrations]
    quality = adapter.quality_metrics(bench.references["holdout"], [str(c) for _, c, _ in holdout_pairs]) \
        if image_metrics else QualityMetrics()
    finals: dict[tuple[str, int], torch.Tensor] = {}
    table = bench.timed("evaluation_seconds", evaluate_methods, holdout, methods, quality,
                        timing_images=timing_images, collect=finals, progress=progress)
    fid = bench.timed("fid_seconds", bench_fid_comparison, adapter, table, methods, quality,
                      default_prompt_sets(calibration_size, fid_samples)[1], fid_budgets, steps, Size(size, size),
                      progress) if fid_samples else None
    bench.plot(table, searches, finals, quality)
    bench.timings["total_seconds"] = time.perf_counter() - started
    settings = _settings(bench, calibration_pairs, holdout_pairs, search, budget_settings, baselines, align_iterations)
    summary = quality_summary(table, searches, calibrations, budgets, _per_sample_mse(finals, holdout))
    summary.update(run_record(adapter.transformer, calibrator, calibrations, unreachable, bench.timings, settings,
                              table))
    if fid is not None:
        summary["fid"] = fid
        summary["goals"]["fid_shift_ratio_met"] = all(r.get("shift_ratio_met", False) for r in fid["budgets"].values())
    return summary


def _per_sample_mse(finals: dict[tuple[str, int], torch.Tensor], holdout: RolloutSet) -> dict[tuple[str, int], Any]:
    """Each (method, budget)'s held-out MSE per pair, for the paired intervals."""
    return {key: latent_mse(final, holdout.reference, per_sample=True).numpy() for key, final in finals.items()}


def _settings(
    bench: _Bench, calibration_pairs: Pairs, holdout_pairs: Pairs, search: SearchConfig,
    budget_settings: Mapping[int, Mapping[str, Any]], baselines: Sequence[str], align_iterations: int,
) -> dict[str, Any]:
    """What the bench ran with, so that a reader can reproduce it."""
    return {
        "model": bench.model,
        "model_fingerprint": bench.references["calibration"].manifest.get("model_fingerprint"),
        "weights_sha256": _weights_sha256(bench.adapter.transformer),
        "calibration_pairs": len(calibration_pairs),
        "holdout_pairs": len(holdout_pairs),
        "steps": bench.steps,
        "size": bench.size,
        "threads": torch.get_num_threads(),
        "search_options": search.to_dict(),
        "search_budget_settings": {str(b): dict(o) for b, o in budget_settings.items()},
        "baselines": list(baselines),
        "calibration_prompts": [p for p, _, _ in calibration_pairs],
        "holdout_prompts": [p for p, _, _ in holdout_pairs],
        "align_iterations": align_iterations,
        "align_gain_channels": bench.gain_channels,
        "forecast": bench.forecast,
    }


def _weights_sha256(module: torch.nn.Module) -> str:
    """Hash of the weights themselves: the fingerprint names the architecture, this the trained model."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]
