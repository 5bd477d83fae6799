"""Held-out evaluation: every method at every budget on prompts and seeds that no calibration saw.

One row per (method, budget): what it cost per image (mean and spread of full
block-stack computations, block evaluations, wall time at batch 1) and how far its
output lands from the uncached model's (final-latent MSE, PSNR and SSIM of decoded
images), plus what the model's quality plug-in adds (FID against real data, a judge's agreement).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from budcache_pipeline.baselines import CacheMethod, Uncached
from budcache_pipeline.evaluation.rollouts import MethodRun, RolloutSet, run_method

UNCACHED = "uncached"
IMAGE_QUALITY = ("psnr", "ssim", "fid", "judge_agreement")
"""What the model's quality plug-in and the decoded images add to the latent MSE, in every table."""
COLUMNS = (
    "method",
    "budget",
    "steps",
    "images",
    "compute_steps_mean",
    "compute_steps_std",
    "compute_steps_min",
    "compute_steps_max",
    "block_evaluations_mean",
    "block_stack_runs_mean",
    "latent_mse",
    "latent_mse_std",
    *IMAGE_QUALITY,
    "seconds_per_image",
    "speedup",
    "cpu_seconds_per_image",
    "cpu_speedup",
    "parameter",
    "settings",
)


@dataclass(frozen=True)
class EvalMethod:
    """A method to evaluate at a budget; `info` goes into the row's settings (e.g. its calibration)."""

    name: str
    budget: int
    method: CacheMethod
    info: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class QualityMetrics:
    """Image-space judges of a run, supplied by the model's adapter.

    `decode` turns latents into images in [0, 1] (PSNR/SSIM against the uncached images);
    `features` and `real_images` give a Fréchet distance to real data; `classify` and
    `labels` give the agreement of a classifier with what each prompt asked for.
    """

    decode: Callable[[torch.Tensor], torch.Tensor] | None = None
    features: Any = None
    real_images: torch.Tensor | None = None
    classify: Callable[[torch.Tensor], torch.Tensor] | None = None
    labels: Sequence[int] | None = None

    def image_scores(self, final: torch.Tensor, reference_images: torch.Tensor | None) -> dict[str, float]:
        from budcache_pipeline import metrics

        scores = {"psnr": math.nan, "ssim": math.nan, "fid": math.nan, "judge_agreement": math.nan}
        if self.decode is None or reference_images is None:
            return scores
        images = self.decode(final)
        scores["psnr"] = metrics.psnr(images, reference_images)
        if images.ndim == 4:
            scores["ssim"] = metrics.ssim(images, reference_images)
        if self.features is not None and self.real_images is not None and len(images) >= 2:
            scores["fid"] = metrics.frechet_distance(images, self.real_images, self.features)
        if self.classify is not None and self.labels is not None:
            labels = torch.as_tensor(list(self.labels), dtype=torch.long)
            scores["judge_agreement"] = (self.classify(images).cpu() == labels).float().mean().item()
        return scores


def _timing(method: CacheMethod, data: RolloutSet, run: MethodRun, timing_images: int) -> tuple[float, float]:
    """Wall and CPU seconds per image at batch 1: from the run when it was per image, else from a batch-1 subset.

    CPU time of this process is reported beside wall time because on a shared machine
    the wall clock also measures other people's jobs.
    """
    if not run.per_image:
        count = min(timing_images, len(data))
        run = run_method(method, data.subset(slice(0, count)), per_image=True)
        return run.seconds / count, run.cpu_seconds / count
    return run.seconds / len(data), run.cpu_seconds / len(data)


def _row(
    name: str,
    budget: int,
    method: CacheMethod,
    data: RolloutSet,
    run: MethodRun,
    seconds: tuple[float, float],
    scores: dict[str, float],
    info: Mapping[str, Any],
) -> dict[str, Any]:
    mse = run.latent_mse(data.reference)
    return {
        "method": name,
        "budget": budget,
        "steps": data.steps,
        "images": len(data),
        "compute_steps_mean": float(run.compute_steps.mean()),
        "compute_steps_std": float(run.compute_steps.std()),
        "compute_steps_min": int(run.compute_steps.min()),
        "compute_steps_max": int(run.compute_steps.max()),
        "block_evaluations_mean": float(run.block_evaluations.mean()),
        "block_stack_runs_mean": float(run.block_stack_runs.mean()),
        "latent_mse": float(mse.mean()),
        "latent_mse_std": float(mse.std()),
        **scores,
        "seconds_per_image": seconds[0],
        "speedup": math.nan,
        "cpu_seconds_per_image": seconds[1],
        "cpu_speedup": math.nan,
        "parameter": method.parameter if method.parameter is not None else math.nan,
        "settings": _settings_text({**method.settings(), **info}),
    }


def _settings_text(settings: Mapping[str, Any]) -> str:
    return "; ".join(f"{k}={_short(v)}" for k, v in settings.items())


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_short(v) for v in value) + "]"
    return str(value)


def evaluate_methods(
    data: RolloutSet,
    methods: Sequence[EvalMethod],
    quality: QualityMetrics | None = None,
    *,
    timing_images: int = 8,
    collect: dict[tuple[str, int], torch.Tensor] | None = None,
    progress: Callable[[str], None] | None = None,
    run: Callable[[CacheMethod, RolloutSet], MethodRun] = run_method,
) -> pd.DataFrame:
    """Run the uncached model and every method on `data` (a held-out set with its uncached finals).

    Wall time is per image at batch 1 for every method, so speedups compare like with
    like; threshold caches that share decisions across a batch run per image anyway.
    `collect`, when given, receives each row's final latents keyed by (method, budget).
    `run` runs one method over `data` (e.g. `evaluation.shards.saved_method_run`, batch by batch).
    """
    if data.reference is None:
        raise ValueError("the held-out set has no uncached finals: build it with RolloutSet.from_reference")
    names = [(m.name, m.budget) for m in methods]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"methods must be unique per budget, repeated: {duplicates}")
    if any(m.name == UNCACHED for m in methods):
        raise ValueError(f"'{UNCACHED}' is added by evaluate_methods itself: do not pass it")
    quality = quality or QualityMetrics()
    say = progress or (lambda _: None)
    reference_images = quality.decode(data.reference) if quality.decode is not None else None
    rows = []
    entries = [EvalMethod(UNCACHED, data.steps, Uncached()), *methods]
    for entry in entries:
        done = run(entry.method, data)
        seconds = _timing(entry.method, data, done, timing_images)
        scores = quality.image_scores(done.final, reference_images)
        rows.append(_row(entry.name, entry.budget, entry.method, data, done, seconds, scores, entry.info))
        if collect is not None:
            collect[(entry.name, entry.budget)] = done.final
        say(
            f"{entry.name} B={entry.budget}: {rows[-1]['compute_steps_mean']:.2f}±{rows[-1]['compute_steps_std']:.2f} "
            f"steps, latent MSE {rows[-1]['latent_mse']:.4g}, {seconds[0] * 1000:.1f} ms/image"
        )
    table = pd.DataFrame(rows, columns=list(COLUMNS))
    table["speedup"] = table.loc[0, "seconds_per_image"] / table["seconds_per_image"]
    table["cpu_speedup"] = table.loc[0, "cpu_seconds_per_image"] / table["cpu_seconds_per_image"]
    return table


def best_per_budget(table: pd.DataFrame, methods: Sequence[str], metric: str = "latent_mse") -> pd.DataFrame:
    """For each budget, the row of `methods` with the lowest `metric` (ties: first listed)."""
    subset = table[table["method"].isin(list(methods))].copy()
    if subset.empty:
        raise ValueError(f"none of {list(methods)} is in the table")
    subset["order"] = subset["method"].map({m: i for i, m in enumerate(methods)})
    subset = subset.sort_values(["budget", metric, "order"], ascending=[False, True, True])
    return subset.groupby("budget", sort=False).head(1).drop(columns="order").reset_index(drop=True)


def finite_or_none(value: Any) -> Any:
    """JSON-safe numbers: NaN and infinities become None."""
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value
