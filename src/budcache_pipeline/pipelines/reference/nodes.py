"""Reference nodes: Kedro wrappers over `search.reference.compute_reference`."""

from __future__ import annotations

import json
import logging
import shutil
import time
from typing import Any

import pandas as pd

from budcache_pipeline.pipelines.common import ModelHandle, resume_dir
from budcache_pipeline.policy import model_fingerprint
from budcache_pipeline.search import ReferenceSet, compute_reference
from budcache_pipeline.search.distributed import launch_torchrun
from budcache_pipeline.search.reference import prompts_seeds_sha256
from budcache_pipeline.search.reference_worker import MODULE as REFERENCE_WORKER

logger = logging.getLogger(__name__)


def compute_reference_set(
    prompts: pd.DataFrame, model: ModelHandle, params: dict[str, Any], split: str
) -> ReferenceSet:
    """Uncached rollouts of every (prompt, seed) of one split, batched on the GPU when there is one.

    Batches are saved as they finish in `params.resume_dir`, so an interrupted run resumes;
    the folder is removed once the catalog holds the finished reference. With
    `params.processes` above 1 the batches are computed by that many torchrun ranks
    (one per GPU) into the same folder, and this node reads them back.
    """
    adapter = model.adapter
    size, steps = model.size, model.steps
    texts, seeds = prompts["prompt"].tolist(), [int(s) for s in prompts["seed"]]
    identity = {
        "model": model_fingerprint(adapter.transformer),
        "settings": adapter.settings(),
        "steps": steps,
        **size.to_dict(),
        "batch_size": int(params["batch_size"]),
        "pairs": prompts_seeds_sha256(texts, seeds),
    }
    resume = resume_dir(params["resume_dir"], split, identity)
    started = time.perf_counter()
    processes = int(params.get("processes", 1))
    if processes > 1:
        resume.mkdir(parents=True, exist_ok=True)
        job = resume / "job.json"
        job.write_text(json.dumps({
            "model": model.params, "prompts": texts, "seeds": seeds, "steps": steps,
            "batch_size": int(params["batch_size"]), "out_dir": str(resume),
        }))
        launch_torchrun(REFERENCE_WORKER, job, processes)
    reference = compute_reference(
        adapter,
        texts,
        seeds,
        steps=steps,
        size=size,
        out_dir=resume,
        batch_size=int(params["batch_size"]),
        progress=bool(params.get("progress", False)),
    )
    shutil.rmtree(resume, ignore_errors=True)
    logger.info("%s reference: %d pairs in %.1fs", split, len(reference), time.perf_counter() - started)
    return reference


def compute_calibration_reference(
    calibration_prompts: pd.DataFrame, model: ModelHandle, params: dict[str, Any]
) -> ReferenceSet:
    """Teachers for the prompts the policies are searched on."""
    return compute_reference_set(calibration_prompts, model, params, "calibration")


def compute_holdout_reference(
    holdout_prompts: pd.DataFrame, model: ModelHandle, params: dict[str, Any]
) -> ReferenceSet:
    """Teachers for the prompts the policies are judged on."""
    return compute_reference_set(holdout_prompts, model, params, "holdout")


def summarise_references(calibration: ReferenceSet, holdout: ReferenceSet) -> dict[str, Any]:
    """What the references are: model, schedule and sizes, for the report and the MLflow run."""
    manifest = calibration.manifest
    return {
        "model_fingerprint": manifest["model_fingerprint"],
        "model_class": manifest["model_class"],
        "steps": calibration.steps,
        **calibration.size.to_dict(),
        "adapter_settings": manifest.get("adapter_settings"),
        "dtype": manifest["dtype"],
        "sigmas": list(calibration.sigmas),
        "pairs": {"calibration": len(calibration), "holdout": len(holdout)},
    }
