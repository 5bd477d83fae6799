"""One budget's search as a torchrun entry point: `torchrun --nproc-per-node K -m budcache_pipeline.search.search_worker JOB.json`.

The job file names the model block, a saved reference, the budget, the objective's
bounds, the search's settings (`SearchConfig.to_dict`) and whether rank 0 shows a
progress bar. Every rank loads the reference and keeps its
block of rows; rank 0 writes the result (and the checkpoint while it runs), so K
processes give the one-process mask. Rerunning the same command resumes from the checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from budcache_pipeline.models.spec import load_adapter
from budcache_pipeline.policy import model_fingerprint, weights_digest
from budcache_pipeline.search.config import SearchConfig
from budcache_pipeline.search.distributed import Shard, ShardLostError, run_worker
from budcache_pipeline.search.engine import SearchResult, search_policy
from budcache_pipeline.search.objective import MaskObjective
from budcache_pipeline.search.prefix_store import PREFIX_STATE_STATS
from budcache_pipeline.search.progress import ProgressBar
from budcache_pipeline.search.reference import load_reference

MODULE = "budcache_pipeline.search.search_worker"


def search_record(objective: MaskObjective) -> dict[str, Any]:
    """What a policy and its summary keep of a search beside the result, the same in one process or K.

    The prefix store's counters (this process's share of the states) and the model's
    fingerprint and weights digest, which the policy records so it is never used on another model.
    """
    transformer = objective.adapter.transformer
    return {
        "prefix_states": {k: objective.stats.get(k, 0) for k in PREFIX_STATE_STATS},
        "model_fingerprint": model_fingerprint(transformer),
        "model_weights": weights_digest(transformer),
    }


def run_search_job(job: dict[str, Any], shard: Shard) -> SearchResult:
    """The search a job file describes, on this rank's rows; rank 0 writes `job["result"]`.

    Beside the result: the process count, rank 0's prefix-store counters (each rank holds
    its share of the states) and the model's fingerprint and weights digest for the policy.
    """
    adapter = load_adapter(job["model"])
    objective = MaskObjective(adapter, load_reference(job["reference"]), shard=shard, **job.get("objective", {}))
    config = SearchConfig.from_dict(job.get("search", {}))
    checkpoint = Path(job["checkpoint"]) if job.get("checkpoint") else None
    bar = ProgressBar() if job.get("progress") and shard.is_main else None
    result = search_policy(objective, int(job["budget"]), config, checkpoint=checkpoint, progress=bar)
    if shard.is_main:
        out = Path(job["result"])
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(out.suffix + ".tmp")
        written = {**result.to_dict(), "processes": shard.world_size, **search_record(objective)}
        tmp.write_text(json.dumps(written, indent=2))
        os.replace(tmp, out)
    shard.barrier("the result write")
    return result


def _say_stopped(job: dict[str, Any], shard: Shard, why: str) -> None:
    """Tell the user why this rank stops, where the search so far is, and how to resume."""
    where = f"checkpoint {job['checkpoint']}" if job.get("checkpoint") else "no checkpoint (none was configured)"
    print(
        f"budcache search: rank {shard.rank} of {shard.world_size} {why}. The search so far is in {where}; "
        "rerun the same command to resume.",
        file=sys.stderr,
        flush=True,
    )


def _stop_on_sigterm(job: dict[str, Any], shard: Shard) -> None:
    """Say why a rank stops when torchrun's agent ends the group (a peer died) and how to resume."""

    def stop(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        _say_stopped(job, shard, "stopped by torchrun because another rank failed (its error is torchrun's "
                                 "'Root Cause' below)")
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


def _run_or_say_why(job: dict[str, Any], shard: Shard) -> SearchResult:
    """The job; a rank whose peer died mid-sum says so with the checkpoint before it exits."""
    try:
        return run_search_job(job, shard)
    except ShardLostError:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _say_stopped(job, shard, "lost its peers: another rank died or was killed")
        raise


def main(argv: list[str] | None = None) -> int:
    return run_worker(MODULE, argv, _run_or_say_why, on_start=_stop_on_sigterm)


if __name__ == "__main__":
    sys.exit(main())
