"""`budcache bench gpu`: what a ladder costs and gives on this machine, from one Kedro run of an environment.

Runs the project for `--env` in-process (`KedroSession`), or with `reuse` reads the outputs an
earlier `kedro run --env ENV` left, then, per registered budget: seconds per image of the stock
pipeline under the ladder's policy and without a cache (the `budcache generate` path: prompt
encoding, the denoising loop and decoding, batch 1), the speedup, peak GPU memory, the search's
GPU-minutes (its wall seconds x processes) and its cost in calibration-rollout equivalents, and
held-out quality against the best baseline at that budget (the evaluate pipeline's table). Ends
with the cost model's prediction for FLUX.1-dev at 1024², from the per-call time measured here
when this run is FLUX.1-dev at 1024² on a GPU, else from the assumed figure, and says which.
Without CUDA only the tiny environments and the embedded default model run, and the output
says that its figures are not real-model figures.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from budcache_pipeline.call_timer import CallTimer, synchronize

TINY_ENVIRONMENTS = ("tiny_flux", "tiny_wan", "tiny_sd3")
DEFAULT_ENVIRONMENT = "local"
"""Kedro's default run environment (settings.CONFIG_LOADER_ARGS): `--env local` is the same as no `--env`."""
CPU_NOTE = (
    "ran on CPU with tiny random-weight models (no CUDA device): these figures exercise the pipeline, "
    "they are NOT real-model figures"
)
COLUMNS = (
    "budget", "s_per_image", "speedup", "ideal", "peak_gpu_memory", "search_minutes", "search_rollouts",
    "holdout_mse", "best_baseline", "baseline_mse", "mse_vs_baseline",
)


class BenchGpuError(ValueError):
    """The bench cannot run as asked; the message says what to change."""


def check_environment(project: Path, env: str | None, cuda: bool) -> None:
    """An environment that exists, and on a machine without CUDA one of the small ones."""
    conf = project / "conf"
    if not conf.is_dir():
        raise BenchGpuError(f"{project} is not a Kedro project of this package (no conf/): pass --project")
    known = sorted(p.name for p in conf.iterdir() if p.is_dir() and p.name not in ("base", "airflow"))
    if env is not None and env not in known:
        raise BenchGpuError(f"unknown environment {env!r}: choose one of {known} (or leave --env out for the default)")
    if not cuda and env not in (None, DEFAULT_ENVIRONMENT, *TINY_ENVIRONMENTS):
        raise BenchGpuError(
            f"no CUDA device here: on a CPU only {list(TINY_ENVIRONMENTS)} or the default environment run, got {env!r}"
        )


def _check_small_model(model: dict[str, Any], env: str | None) -> None:
    small = model.get("weights") == "tiny" or (model.get("adapter") == "digits" and model.get("weights") is None)
    if not small:
        raise BenchGpuError(
            f"no CUDA device here, and environment {env or 'default'!r} runs {model.get('adapter')!r} with weights "
            f"{model.get('weights')!r}: on a CPU use {list(TINY_ENVIRONMENTS)} or the embedded default model"
        )


def _time_images(
    adapter: Any, pairs: Sequence[tuple[str, int]], size: Any, schedule: dict[str, Any], policy: Any, timer_calls: bool
) -> dict[str, Any]:
    """Mean seconds per image at batch 1 after one warm-up image, peak GPU bytes, and per-call seconds."""
    from budcache_pipeline.deploy import run_pipeline

    device = adapter.device
    run_pipeline(adapter, [pairs[0][0]], [pairs[0][1]], size, schedule, policy)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timer = CallTimer(adapter.transformer, device, label="calls") if timer_calls else None
    seconds, computed = [], 0
    try:
        for prompt, seed in pairs:
            synchronize(device)
            started = time.perf_counter()
            _, computed = run_pipeline(adapter, [prompt], [seed], size, schedule, policy)
            synchronize(device)
            seconds.append(time.perf_counter() - started)
    finally:
        if timer is not None:
            timer.remove()
    return {
        "seconds_per_image": sum(seconds) / len(seconds),
        "computed_steps": computed,
        "peak_gpu_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "per_call_seconds": (timer.percentile("calls", 0.5) if timer else None),
    }


def _quality(table: Any, budget: int, method: str) -> dict[str, Any]:
    """The ladder's row at `budget` and the baseline with the lowest held-out latent MSE there."""
    from budcache_pipeline.pipelines.evaluate.nodes import ALIGNED, SEARCHED

    rows = table[table["budget"] == budget]
    own = rows[rows["method"] == method]
    if own.empty:
        raise BenchGpuError(f"the metrics table has no {method!r} row at budget {budget}: rerun the evaluate pipeline")
    others = rows[~rows["method"].isin(["uncached", SEARCHED, ALIGNED])].sort_values("latent_mse")
    best = others.iloc[0] if not others.empty else None
    mse = float(own.iloc[0]["latent_mse"])
    baseline = float(best["latent_mse"]) if best is not None else math.nan
    return {
        "method": method,
        "holdout_mse": mse,
        "holdout_psnr": float(own.iloc[0]["psnr"]),
        "best_baseline": str(best["method"]) if best is not None else None,
        "baseline_mse": baseline,
        "mse_vs_baseline": mse / baseline if baseline and math.isfinite(baseline) else math.nan,
    }


def _flux_prediction(measured: float | None, measured_here: bool, gpus: Sequence[int]) -> dict[str, Any]:
    from budcache_pipeline.known_models import FLUX_1_DEV, known_inputs, plan

    per_call = measured if measured_here and measured is not None else FLUX_1_DEV.per_call_seconds
    source = (
        "measured by this run" if measured_here and measured is not None else FLUX_1_DEV.sources["per_call_seconds"]
    )
    inputs = known_inputs(FLUX_1_DEV, per_call_seconds=per_call)
    plans = {k: plan(inputs, k) for k in gpus}
    return {
        "model": FLUX_1_DEV.name,
        "per_call_seconds": per_call,
        "per_call_source": source,
        "inputs": dict(vars(inputs)),
        "max_state_bytes": {k: bound for k, (bound, _) in plans.items()},
        "by_gpus": {k: prediction.to_dict() for k, (_, prediction) in plans.items()},
    }


def _is_flux_dev_1024(model: dict[str, Any], adapter: Any, size: Any) -> bool:
    from budcache_pipeline.cost import transformer_shape
    from budcache_pipeline.known_models import FLUX_1_DEV

    if model.get("adapter") != "flux" or model.get("weights") in (None, "tiny") or (size.height, size.width) != (1024, 1024):
        return False
    config = {"_class_name": type(adapter.transformer).__name__, **adapter.transformer.config}
    return transformer_shape(config, 1024, 1024) == transformer_shape(FLUX_1_DEV.transformer, 1024, 1024)


@dataclass(frozen=True)
class _RunOutputs:
    """What the bench reads from a Kedro run of the environment."""

    model: dict[str, Any]
    run_seconds: float | None
    table: Any
    budgets: list[int]
    policies: dict[int, Any]
    summaries: dict[int, Any]
    holdout: Any


def _kedro_outputs(
    project: Path, env: str | None, reuse: bool, cuda: bool, progress: Callable[[str], None]
) -> _RunOutputs:
    """Run the project for `env` in a Kedro session (unless `reuse`); load the metrics and every budget's outputs."""
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project
    from kedro.io import DatasetError

    from budcache_pipeline.pipelines.evaluate.nodes import ALIGNED, SEARCHED

    bootstrap_project(project)
    with KedroSession.create(project_path=project, env=env) as session:
        model = dict(session.load_context().params["model"])
        if not cuda:
            _check_small_model(model, env)
        started = time.perf_counter()
        if not reuse:
            progress(f"running the project for environment {env or 'default'} ...")
            session.run()
        run_seconds = time.perf_counter() - started if not reuse else None
        catalog = session.load_context().catalog
        try:
            table = catalog.load("metrics_table")
        except DatasetError as exc:
            raise BenchGpuError(
                f"no evaluation outputs for environment {env or 'default'!r} ({type(exc).__name__}): "
                f"run `kedro run --env {env or 'local'}` first, or leave out --reuse"
            ) from exc
        budgets = sorted({int(b) for b in table[table["method"].isin([SEARCHED, ALIGNED])]["budget"]}, reverse=True)
        return _RunOutputs(
            model=model,
            run_seconds=run_seconds,
            table=table,
            budgets=budgets,
            policies={b: catalog.load(f"budget_{b}.final_policy") for b in budgets},
            summaries={b: catalog.load(f"budget_{b}.search_summary@json") for b in budgets},
            holdout=catalog.load("reference_holdout"),
        )


def _ladder_rows(
    adapter: Any, pairs: Sequence[tuple[str, int]], size: Any, steps: int, outputs: _RunOutputs, uncached_seconds: float
) -> list[dict[str, Any]]:
    """Per budget: time under the policy, speedup, the search's cost and held-out quality against the best baseline."""
    from budcache_pipeline.cost import search_rollouts
    from budcache_pipeline.deploy import check_policy
    from budcache_pipeline.pipelines.evaluate.nodes import ALIGNED, SEARCHED, is_aligned

    rows = []
    for budget in outputs.budgets:
        policy = outputs.policies[budget]
        plan = check_policy(adapter, policy, steps, size)
        timed = _time_images(adapter, pairs, size, plan.schedule_kwargs, plan.policy, timer_calls=False)
        summary = outputs.summaries[budget]
        processes = int(summary.get("settings", {}).get("processes", 1))
        rows.append({
            "budget": budget,
            "steps": steps,
            "computed_steps": timed["computed_steps"],
            "s_per_image": timed["seconds_per_image"],
            "speedup": uncached_seconds / timed["seconds_per_image"],
            "ideal": steps / budget,
            "peak_gpu_bytes": timed["peak_gpu_bytes"],
            "search_minutes": float(summary["cost"]["wall_seconds"]) * processes / 60,
            "search_processes": processes,
            "search_rollouts": search_rollouts(summary["cost"], steps),
            **_quality(outputs.table, budget, ALIGNED if is_aligned(policy) else SEARCHED),
        })
    return rows


def bench_gpu(
    project: str | Path = ".",
    env: str | None = None,
    *,
    reuse: bool = False,
    images: int = 2,
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run (or with `reuse`, read) the project for `env` and measure every budget of its ladder; see the module doc."""
    from budcache_pipeline.pipelines.common import ModelHandle

    if images < 1:
        raise BenchGpuError(f"images must be at least 1, got {images}")
    project = Path(project).resolve()
    cuda = torch.cuda.is_available()
    check_environment(project, env, cuda)
    outputs = _kedro_outputs(project, env, reuse, cuda, progress)
    model = outputs.model
    handle = ModelHandle(model)
    adapter, size, steps = handle.adapter, handle.size, handle.steps
    pairs = list(zip(outputs.holdout.prompts, outputs.holdout.seeds))[:images]
    progress(f"timing {len(pairs)} held-out image(s) per method on {adapter.device} ...")
    uncached_schedule = adapter.schedule_kwargs(adapter.default_sigmas(steps, size), size)
    uncached = _time_images(adapter, pairs, size, uncached_schedule, None, timer_calls=True)
    per_call = uncached["per_call_seconds"]
    rows = _ladder_rows(adapter, pairs, size, steps, outputs, uncached["seconds_per_image"])
    measured_here = cuda and _is_flux_dev_1024(model, adapter, size)
    return {
        "environment": env or "default",
        "device": torch.cuda.get_device_name(adapter.device) if adapter.device.type == "cuda" else "cpu",
        "cuda": cuda,
        "note": None if cuda else CPU_NOTE,
        "model": {k: model.get(k) for k in ("adapter", "weights", "name", "dtype")},
        "size": size.to_dict(),
        "steps": steps,
        "images_timed": len(pairs),
        "reused": reuse,
        "run_seconds": outputs.run_seconds,
        "uncached": {
            "s_per_image": uncached["seconds_per_image"],
            "peak_gpu_bytes": uncached["peak_gpu_bytes"],
            "per_call_seconds": per_call,
            "calls_per_step": adapter.calls_per_step,
        },
        "rows": rows,
        "flux_dev_prediction": _flux_prediction(per_call, measured_here, gpus=(1, 8)),
    }


def _memory(value: int | None, cuda: bool) -> str:
    from budcache_pipeline.cost import format_bytes

    return format_bytes(value) if cuda and value is not None else "n/a (CPU)"


def format_bench_gpu(result: dict[str, Any]) -> str:
    """The result as the table `budcache bench gpu` prints, with its notes."""
    cuda = result["cuda"]
    device_minutes = "search GPU-min" if cuda else "search CPU-min"
    lines = []
    if result["note"]:
        lines.append(f"NOTE: {result['note']}.")
    size = "x".join(str(result["size"][k]) for k in ("height", "width", "num_frames") if k in result["size"])
    lines.append(
        f"environment {result['environment']}: {result['model']['adapter']} ({result['model']['weights'] or 'embedded'}) "
        f"at {size}, {result['steps']} steps, on {result['device']}; {result['images_timed']} held-out image(s) per method"
    )
    header = ["budget", "s/image", "speedup", "ideal", "peak GPU mem", device_minutes, "rollouts", "held-out MSE",
              "best baseline", "baseline MSE", "MSE ratio"]
    body = [[
        "none", f"{result['uncached']['s_per_image']:.4f}", "1.00", "1.00",
        _memory(result["uncached"]["peak_gpu_bytes"], cuda), "-", "-", "0", "-", "-", "-",
    ]]
    for row in result["rows"]:
        body.append([
            f"{row['budget']}/{row['steps']}", f"{row['s_per_image']:.4f}", f"{row['speedup']:.2f}",
            f"{row['ideal']:.2f}", _memory(row["peak_gpu_bytes"], cuda), f"{row['search_minutes']:.2f}",
            f"{row['search_rollouts']:.2f}", f"{row['holdout_mse']:.4g}", str(row["best_baseline"] or "-"),
            f"{row['baseline_mse']:.4g}", f"{row['mse_vs_baseline']:.3f}",
        ])
    widths = [max(len(r[k]) for r in [header, *body]) for k in range(len(header))]
    for line in [header, *body]:
        lines.append("  ".join(cell.rjust(width) for cell, width in zip(line, widths)))
    per_call = result["uncached"]["per_call_seconds"]
    if per_call is not None:
        lines.append(
            f"per transformer call (median, batch 1): {per_call * 1000:.2f} ms, "
            f"{result['uncached']['calls_per_step']} call(s) per step"
        )
    lines.append(
        f"{device_minutes}: the search's wall seconds x its processes; rollouts: its block-stack calls over the "
        "calibration batch / steps; MSE ratio < 1: the ladder beats the best baseline on held-out pairs"
    )
    lines.extend(_prediction_lines(result["flux_dev_prediction"]))
    return "\n".join(lines)


def _prediction_lines(prediction: dict[str, Any]) -> list[str]:
    from budcache_pipeline.cost import format_bytes

    inputs = prediction["inputs"]
    lines = [
        f"cost model, {prediction['model']}, budget {inputs['budget']}, {inputs['calibration_prompts']} calibration "
        f"prompts, {inputs['search_rollouts']:.1f} search rollouts; per call {prediction['per_call_seconds']:.3f} s "
        f"({prediction['per_call_source']}):"
    ]
    for gpus, p in prediction["by_gpus"].items():
        lines.append(
            f"  {gpus} GPU(s): reference {p['reference_gpu_minutes']:.1f} GPU-min ({p['reference_wall_minutes']:.1f} min wall, "
            f"{format_bytes(p['reference_peak_bytes_per_gpu'])}/GPU), search {p['search_gpu_minutes']:.1f} GPU-min "
            f"({p['search_wall_minutes']:.1f} min wall, {format_bytes(p['search_peak_bytes_per_gpu'])}/GPU of which "
            f"states {format_bytes(p['search_state_bytes_per_gpu'])} under max_state_bytes "
            f"{format_bytes(prediction['max_state_bytes'][gpus])})"
        )
    return lines
