"""Reference generation as a torchrun entry point: `torchrun --nproc-per-node K -m budcache_pipeline.search.reference_worker JOB.json`.

The job file names the model block, the prompts and seeds, the steps, the batch size and
the folder the batches go to. Each rank computes its block of batches into that folder
(`compute_reference` with a shard), so a killed rank's batches are the only ones a rerun
computes, and loading the folder afterwards gives the one-process reference.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from budcache_pipeline.models.spec import ModelSpec, load_adapter
from budcache_pipeline.search.distributed import Shard, run_worker
from budcache_pipeline.search.reference import compute_reference

MODULE = "budcache_pipeline.search.reference_worker"


def run_reference_job(job: dict[str, Any], shard: Shard) -> None:
    """Compute this rank's batches of the job's reference into `job["out_dir"]`."""
    adapter = load_adapter(job["model"])
    if hasattr(adapter.pipe, "set_progress_bar_config"):
        adapter.pipe.set_progress_bar_config(disable=True)
    size = ModelSpec.from_params(job["model"]).output_size(adapter)
    compute_reference(
        adapter,
        job["prompts"],
        [int(s) for s in job["seeds"]],
        int(job["steps"]),
        size,
        out_dir=Path(job["out_dir"]),
        batch_size=int(job["batch_size"]),
        progress=bool(job.get("progress", False)) and shard.is_main,
        shard=shard,
    )


def main(argv: list[str] | None = None) -> int:
    return run_worker(MODULE, argv, run_reference_job)


if __name__ == "__main__":
    sys.exit(main())
