"""Held-out runs of every method in fixed batches saved to a folder, so they can be shared by processes.

A method's run over a held-out set is cut into batches of `batch_size` rows; each
batch's finals and per-image costs go to one file named by the method's digest and the
batch index, written atomically. A rerun skips the files already there, so a killed
process loses only the batch it was in, and K torchrun ranks (`evaluation.worker`) can
each fill their block of batches. Loading the folder afterwards gives the run one
process makes with the same batches, bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save

from budcache_pipeline.atomic import write_bytes_atomic
from budcache_pipeline.baselines import CacheMethod
from budcache_pipeline.evaluation.rollouts import MethodRun, RolloutSet, run_method
from budcache_pipeline.search.distributed import Shard

_BATCH_FILE = "{method}-batch_{index:05d}.safetensors"


def method_digest(method: CacheMethod) -> str:
    """A short name for a method's files: the same kind and parameters always give the same name."""
    return hashlib.sha256(json.dumps(method.to_json(), sort_keys=True).encode()).hexdigest()[:16]


def batch_slices(rows: int, batch_size: int | None) -> list[slice]:
    """The batches a held-out set of `rows` is run in (None: one batch of all rows)."""
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"evaluate.batch_size must be a positive integer or null (one batch), got {batch_size!r}")
    size = rows if batch_size is None else batch_size
    return [slice(start, min(start + size, rows)) for start in range(0, rows, max(size, 1))]


def _path(out_dir: Path, method: CacheMethod, index: int) -> Path:
    return out_dir / _BATCH_FILE.format(method=method_digest(method), index=index)


def _save(path: Path, run: MethodRun) -> None:
    tensors = {
        "final": run.final.detach().to("cpu").contiguous(),
        "compute_steps": torch.as_tensor(np.asarray(run.compute_steps, dtype=np.float64)),
        "block_stack_runs": torch.as_tensor(np.asarray(run.block_stack_runs, dtype=np.float64)),
        "block_evaluations": torch.as_tensor(np.asarray(run.block_evaluations, dtype=np.float64)),
    }
    metadata = {"seconds": repr(run.seconds), "cpu_seconds": repr(run.cpu_seconds), "per_image": str(run.per_image)}
    write_bytes_atomic(path, save(tensors, metadata=metadata))


def _load(path: Path) -> MethodRun:
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    return MethodRun(
        final=tensors["final"],
        compute_steps=tensors["compute_steps"].numpy(),
        block_stack_runs=tensors["block_stack_runs"].numpy(),
        block_evaluations=tensors["block_evaluations"].numpy(),
        seconds=float(metadata["seconds"]),
        per_image=metadata["per_image"] == "True",
        cpu_seconds=float(metadata["cpu_seconds"]),
    )


def _integral(values: np.ndarray) -> np.ndarray:
    """Costs back in the dtype `run_method` gives them (whole counts as integers)."""
    return values.astype(np.int64) if np.all(values == np.round(values)) else values


def run_method_batches(
    method: CacheMethod, data: RolloutSet, out_dir: Path, batch_size: int | None, shard: Shard = Shard()
) -> None:
    """Run this process's block of `method`'s batches into `out_dir`, skipping the batches saved there."""
    out_dir.mkdir(parents=True, exist_ok=True)
    batches = batch_slices(len(data), batch_size)
    for index in shard.block(len(batches), allow_empty=True):
        path = _path(out_dir, method, index)
        if not path.is_file():
            _save(path, run_method(method, data.subset(batches[index])))


def saved_method_run(method: CacheMethod, data: RolloutSet, out_dir: Path, batch_size: int | None) -> MethodRun:
    """`method`'s run over all of `data`: the saved batches read back, the missing ones computed and saved first."""
    run_method_batches(method, data, out_dir, batch_size)
    runs = [_load(_path(out_dir, method, i)) for i in range(len(batch_slices(len(data), batch_size)))]
    return MethodRun(
        final=torch.cat([r.final for r in runs]).to(data.noise.device),
        compute_steps=_integral(np.concatenate([r.compute_steps for r in runs])),
        block_stack_runs=_integral(np.concatenate([r.block_stack_runs for r in runs])),
        block_evaluations=_integral(np.concatenate([r.block_evaluations for r in runs])),
        seconds=math.fsum(r.seconds for r in runs),
        per_image=runs[0].per_image,
        cpu_seconds=math.fsum(r.cpu_seconds for r in runs),
    )


def run_methods_batches(
    methods: Sequence[CacheMethod], data: RolloutSet, out_dir: Path, batch_size: int | None, shard: Shard = Shard()
) -> None:
    """Every method's block of batches for this process (the no-cache run is one of `methods` when wanted)."""
    for method in methods:
        run_method_batches(method, data, out_dir, batch_size, shard)
