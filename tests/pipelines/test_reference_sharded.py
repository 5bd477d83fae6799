"""The reference node with `reference.processes: 2`: torchrun ranks share the batches, the result is the one-process one."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from budcache_pipeline.pipelines.common import ModelHandle
from budcache_pipeline.pipelines.reference.nodes import compute_reference_set
from budcache_pipeline.search import compute_reference
from budcache_pipeline.search.distributed import launch_torchrun
from budcache_pipeline.search.reference_worker import MODULE as REFERENCE_WORKER

pytestmark = pytest.mark.slow  # end to end: `make test-fast` leaves it out

MODEL = {"adapter": "flux", "weights": "tiny", "height": 16, "width": 16, "steps": 6, "torch_threads": 1}
PROMPTS = pd.DataFrame({"prompt": [f"prompt {i}" for i in range(6)], "seed": list(range(6))})


def _same(got, expected) -> None:
    assert got.prompts == expected.prompts and got.seeds == expected.seeds and got.sigmas == expected.sigmas
    assert torch.equal(got.noise, expected.noise) and torch.equal(got.final, expected.final)
    got_tensors, expected_tensors = got.conditioning.tensors(), expected.conditioning.tensors()
    assert got_tensors.keys() == expected_tensors.keys()
    assert all(torch.equal(got_tensors[k], expected_tensors[k]) for k in expected_tensors)


def test_two_processes_give_the_one_process_reference_and_a_lost_batch_alone_is_recomputed(tmp_path):
    model = ModelHandle(MODEL)
    adapter = model.adapter
    expected = compute_reference(
        adapter, PROMPTS["prompt"].tolist(), PROMPTS["seed"].tolist(), 6, model.size,
        batch_size=2, progress=False,
    )
    params = {"batch_size": 2, "processes": 2, "resume_dir": str(tmp_path / "partial")}
    _same(compute_reference_set(PROMPTS, model, params, "calibration"), expected)
    assert not any((tmp_path / "partial").iterdir())  # the scratch folder is removed once the reference exists

    # Rank 1 (batches 1 and 2) killed before its last batch: a rerun computes only the batch it lost.
    out = tmp_path / "shards"
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"model": MODEL, "prompts": PROMPTS["prompt"].tolist(), "seeds": list(range(6)),
                               "steps": 6, "batch_size": 2, "out_dir": str(out)}))
    compute_reference(adapter, PROMPTS["prompt"].tolist(), list(range(6)), 6, model.size,
                      out_dir=out, batch_size=2, progress=False)
    (out / "batch_00002.safetensors").unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("batch_*")}
    launch_torchrun(REFERENCE_WORKER, job, 2)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("batch_*") if p.name in kept} == kept
    assert (out / "batch_00002.safetensors").is_file()
    _same(compute_reference(adapter, PROMPTS["prompt"].tolist(), list(range(6)), 6, model.size,
                            out_dir=out, batch_size=2, progress=False), expected)
