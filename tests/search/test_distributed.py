"""The search sharded over processes: torchrun with gloo at K = 1 and K = 2 gives the same search; a killed rank resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from budcache_pipeline.models.spec import ModelSpec, load_adapter
from budcache_pipeline.search import MaskObjective, SearchConfig, compute_reference, search_policy
from budcache_pipeline.search.distributed import Shard
from budcache_pipeline.search.reference import save_reference
from budcache_pipeline.search.tolerance import LOSS_RELATIVE_TOLERANCE

MODEL = {"adapter": "flux", "weights": "tiny", "height": 16, "width": 16, "steps": 10, "torch_threads": 1}
SEARCH = SearchConfig(starts=("dp", "uniform"), seed=0, sa_iterations=20, hc_rounds=2, screen_samples=4, dp_samples=4)
TORCHRUN = Path(sys.executable).with_name("torchrun")


def test_blocks_cover_the_rows_once_and_refuse_more_processes_than_rows():
    assert [list(Shard(r, 3).block(8)) for r in range(3)] == [[0, 1], [2, 3, 4], [5, 6, 7]]
    with pytest.raises(ValueError, match="3 calibration rows cannot be shared by 4 processes"):
        Shard(0, 4).block(3)


def _run(job: Path, processes: int) -> subprocess.CompletedProcess:
    command = [str(TORCHRUN), "--standalone", f"--nproc-per-node={processes}",
               "-m", "budcache_pipeline.search.search_worker", str(job)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.slow
def test_two_processes_find_the_one_process_mask_with_losses_within_rounding(tmp_path):
    # Under the linear forecast both DP starts run: their segment errors are sums over the ranks' rows.
    search = replace(SEARCH, starts=("dp", "dp_linear"))
    adapter = load_adapter(MODEL)
    size = ModelSpec.from_params(MODEL).output_size(adapter)
    prompts = [f"prompt {i}" for i in range(8)]
    save_reference(compute_reference(adapter, prompts, list(range(8)), 10, size, progress=False), tmp_path / "ref")
    results = {}
    for k in (1, 2):
        job = tmp_path / f"job{k}.json"
        job.write_text(json.dumps({"model": MODEL, "reference": str(tmp_path / "ref"), "budget": 4,
                                   "torch_threads": 1, "search": search.to_dict(), "objective": {"forecast": "linear"},
                                   "result": str(tmp_path / f"result{k}.json"),
                                   "checkpoint": str(tmp_path / f"checkpoint{k}.json")}))
        done = _run(job, k)
        assert done.returncode == 0, done.stderr[-3000:]
        results[k] = json.loads((tmp_path / f"result{k}.json").read_text())
    one, two = results[1], results[2]
    assert two["processes"] == 2
    assert two["mask"] == one["mask"]
    assert [s["mask"] for s in two["starts"]] == [s["mask"] for s in one["starts"]]
    # Sums over two ranks differ from one sum by float rounding only: within LOSS_RELATIVE_TOLERANCE (1e-4).
    assert two["loss"] == pytest.approx(one["loss"], rel=LOSS_RELATIVE_TOLERANCE)
    for a, b in zip(two["history"], one["history"]):
        assert (a["phase"], a["start"], a["iteration"]) == (b["phase"], b["start"], b["iteration"])
        assert a["current_loss"] == pytest.approx(b["current_loss"], rel=LOSS_RELATIVE_TOLERANCE)
    for key in ("block_stack_calls", "start_block_stack_calls", "evaluations", "calibration_pairs"):
        assert two["cost"][key] == one["cost"][key], key


def _rank_pid(agent: int, rank: int) -> int | None:
    """The pid of torchrun worker `rank` among the agent's children (its environment names the rank)."""
    for child in Path(f"/proc/{agent}/task/{agent}/children").read_text().split():
        try:
            environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        except (FileNotFoundError, ProcessLookupError):
            continue
        if f"RANK={rank}".encode() in environ:
            return int(child)
    return None


@pytest.mark.slow
def test_a_killed_rank_ends_the_run_with_a_clear_message_and_a_rerun_resumes_to_the_same_mask(tmp_path):
    adapter = load_adapter(MODEL)
    size = ModelSpec.from_params(MODEL).output_size(adapter)
    prompts = [f"prompt {i}" for i in range(8)]
    reference = compute_reference(adapter, prompts, list(range(8)), 10, size, progress=False)
    save_reference(reference, tmp_path / "ref")
    search = replace(SEARCH, sa_iterations=120)
    expected = search_policy(MaskObjective(adapter, reference), 4, search)
    checkpoint, result = tmp_path / "checkpoint.json", tmp_path / "result.json"
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"model": MODEL, "reference": str(tmp_path / "ref"), "budget": 4, "torch_threads": 1,
                               "search": search.to_dict(), "result": str(result), "checkpoint": str(checkpoint)}))
    command = [str(TORCHRUN), "--standalone", "--nproc-per-node=2",
               "-m", "budcache_pipeline.search.search_worker", str(job)]
    # The lowest CPU priority, so that this process wakes in time to kill rank 1 mid-search.
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"}, preexec_fn=lambda: os.nice(19))
    deadline = time.monotonic() + 240
    while not checkpoint.exists():
        assert run.poll() is None, f"the search ended ({run.returncode}) before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint within 240 s"
        time.sleep(0.01)
    victim = _rank_pid(run.pid, 1)
    assert victim is not None and run.poll() is None, "the search finished before rank 1 could be killed"
    os.kill(victim, signal.SIGKILL)
    _, stderr = run.communicate(timeout=120)
    assert run.returncode != 0
    # Rank 0 learns of the loss from torchrun's SIGTERM, or first from its collective failing: either says so.
    said = ("rank 0 of 2 stopped by torchrun because another rank failed", "rank 0 of 2 lost its peers")
    assert any(reason in stderr for reason in said), stderr[-3000:]
    assert f"The search so far is in checkpoint {checkpoint}; rerun the same command to resume" in stderr
    assert not result.exists() and checkpoint.exists()
    saved = json.loads(checkpoint.read_text())
    assert saved["chains"], "the checkpoint holds the search up to the kill"

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    resumed = json.loads(result.read_text())
    assert resumed["mask"] == expected.mask
    assert resumed["loss"] == pytest.approx(expected.loss, rel=LOSS_RELATIVE_TOLERANCE)
    assert [s["mask"] for s in resumed["starts"]] == [s["mask"] for s in expected.starts]
