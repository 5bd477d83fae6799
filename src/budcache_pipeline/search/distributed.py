"""Calibration rows sharded over processes: process-group set-up, row blocks and exact sums.

Under `torchrun --nproc-per-node K` each rank holds a contiguous block of the
calibration rows, and every loss is a sum of per-row errors and a row count summed
over the ranks, so the mean is the one-process mean up to the order of a float sum.
Every rank then takes the same decisions from the same numbers and the same seeds;
only rank 0 writes. Outside torchrun (`WORLD_SIZE` unset or 1) all of this is a no-op.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

# How long a rank waits at a collective for a peer before it gives up (a dead peer
# usually shows sooner: torchrun's agent stops the group when one rank exits).
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)


class ShardLostError(RuntimeError):
    """A peer process of the group died or stopped answering; the message says how to resume."""


@dataclass(frozen=True)
class Shard:
    """This process's place in the group: rank `rank` of `world_size`."""

    rank: int = 0
    world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Whether this process writes outputs (rank 0 alone, so files are written once)."""
        return self.rank == 0

    def block(self, total: int, allow_empty: bool = False) -> range:
        """The contiguous items of `total` this rank holds (blocks differ in size by at most one).

        Contiguous, not strided, so that a strided screening subset of the rows spreads over the ranks.
        `allow_empty`: a rank may get none (work items such as reference batches, not calibration rows).
        """
        if total < self.world_size and not allow_empty:
            raise ValueError(
                f"{total} calibration rows cannot be shared by {self.world_size} processes: "
                "use at most as many processes as rows"
            )
        return range(self.rank * total // self.world_size, (self.rank + 1) * total // self.world_size)

    def sum(self, values: Sequence[float], what: str = "losses") -> list[float]:
        """Element-wise float64 sum of `values` over all ranks (every rank passes as many, in the same order)."""
        if not self.distributed:
            return [float(v) for v in values]
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
        tensor = torch.tensor(list(values), dtype=torch.float64, device=device)
        try:
            dist.all_reduce(tensor)
        except RuntimeError as error:
            raise self._lost(what, error) from error
        return tensor.cpu().tolist()

    def barrier(self, what: str = "a write") -> None:
        """Wait for every rank (the others wait while rank 0 writes)."""
        if not self.distributed:
            return
        try:
            dist.barrier()
        except RuntimeError as error:
            raise self._lost(what, error) from error

    def _lost(self, what: str, error: Exception) -> ShardLostError:
        return ShardLostError(
            f"rank {self.rank} of {self.world_size} lost its peers while summing {what} ({type(error).__name__}): "
            "another process of the group died or was killed. Rerun the same command: the search resumes from "
            "its checkpoint and a sharded reference from the shards it saved"
        )


def init_shard(backend: str | None = None) -> Shard:
    """Join the process group torchrun describes in the environment, or the one-process no-op shard.

    gloo on CPU, nccl when CUDA is present (each rank on GPU `LOCAL_RANK`), unless `backend` says otherwise.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Shard()
    if not dist.is_initialized():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend, timeout=COLLECTIVE_TIMEOUT)
    return Shard(dist.get_rank(), dist.get_world_size())


def close_shard(shard: Shard) -> None:
    """Leave the process group (after the last collective)."""
    if shard.distributed and dist.is_initialized():
        dist.destroy_process_group()


def run_worker(
    module: str,
    argv: list[str] | None,
    run_job: Callable[[dict[str, Any], Shard], object],
    on_start: Callable[[dict[str, Any], Shard], None] | None = None,
) -> int:
    """The body of a torchrun entry point: read the job file, set threads, join the group, run, leave."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(f"usage: torchrun --nproc-per-node K -m {module} JOB.json", file=sys.stderr)
        return 2
    job = json.loads(Path(args[0]).read_text())
    if job.get("torch_threads"):
        torch.set_num_threads(int(job["torch_threads"]))
    shard = init_shard(job.get("backend"))
    if on_start is not None:
        on_start(job, shard)
    try:
        run_job(job, shard)
    finally:
        close_shard(shard)
    return 0


def launch_torchrun(module: str, job: Path, processes: int) -> None:
    """Run `python -m module job` under `torchrun --standalone --nproc-per-node processes` and wait.

    The venv's own torchrun, so the ranks import this same installation; a failed run is an
    error that quotes the end of torchrun's report (which names the failed rank).
    """
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--standalone", f"--nproc-per-node={processes}", "-m", module, str(job)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise ShardLostError(
            f"{module} under torchrun with {processes} processes failed (exit {done.returncode}); "
            f"rerun to resume from what the ranks saved. torchrun's report ends:\n{done.stderr[-4000:]}"
        )
