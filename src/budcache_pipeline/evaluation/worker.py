"""Held-out runs as a torchrun entry point: `torchrun --nproc-per-node K -m budcache_pipeline.evaluation.worker JOB.json`.

The job file names the model block, a saved held-out reference, the methods (kind and
parameters), the batch size and the folder the batches go to. Each rank runs its block of
every method's batches into that folder (`evaluation.shards`), so a killed rank's batches
are the only ones a rerun computes, and the evaluate node reads the folder back.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from budcache_pipeline.evaluation.rollouts import RolloutSet
from budcache_pipeline.baselines import method_from_json
from budcache_pipeline.evaluation.shards import run_methods_batches
from budcache_pipeline.models.spec import load_adapter
from budcache_pipeline.search.distributed import Shard, run_worker
from budcache_pipeline.search.reference import load_reference

MODULE = "budcache_pipeline.evaluation.worker"


def run_evaluation_job(job: dict[str, Any], shard: Shard) -> None:
    """Run this rank's batches of every method in the job into `job["out_dir"]`."""
    adapter = load_adapter(job["model"])
    data = RolloutSet.from_reference(adapter, load_reference(job["reference"]))
    methods = [method_from_json(m) for m in job["methods"]]
    run_methods_batches(methods, data, Path(job["out_dir"]), job.get("batch_size"), shard)
    shard.barrier("the last batch")


def main(argv: list[str] | None = None) -> int:
    return run_worker(MODULE, argv, run_evaluation_job)


if __name__ == "__main__":
    sys.exit(main())
