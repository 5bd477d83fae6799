"""The evaluate node with `evaluate.processes: 2`: torchrun ranks share the held-out batches, the table is the one-process one."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from budcache_pipeline.baselines import FixedPolicy, Uncached
from budcache_pipeline.evaluation import RolloutSet
from budcache_pipeline.evaluation.shards import run_methods_batches, saved_method_run
from budcache_pipeline.evaluation.worker import MODULE as EVALUATION_WORKER
from budcache_pipeline.pipelines.common import ModelHandle
from budcache_pipeline.pipelines.evaluate.nodes import evaluate_ladder
from budcache_pipeline.policy import CachePolicy, model_fingerprint
from budcache_pipeline.search import compute_reference
from budcache_pipeline.search.distributed import launch_torchrun
from budcache_pipeline.search.reference import save_reference

pytestmark = pytest.mark.slow  # end to end: `make test-fast` leaves it out

MODEL = {"adapter": "flux", "weights": "tiny", "height": 16, "width": 16, "steps": 6, "torch_threads": 1}
CLOCK = ["seconds_per_image", "speedup", "cpu_seconds_per_image", "cpu_speedup"]


def _prompts(count: int, offset: int) -> pd.DataFrame:
    return pd.DataFrame({"prompt": [f"prompt {i}" for i in range(offset, offset + count)],
                         "seed": list(range(offset, offset + count)), "category": ["a", "b"] * (count // 2)})


@pytest.fixture(scope="module")
def references():
    model = ModelHandle(MODEL)
    adapter, size = model.adapter, model.size
    made = {}
    for split, prompts in (("calibration", _prompts(4, 0)), ("holdout", _prompts(6, 100))):
        made[split] = (prompts, compute_reference(adapter, prompts["prompt"].tolist(), prompts["seed"].tolist(), 6,
                                                  size, progress=False))
    return model, made


def test_two_processes_give_the_one_process_table_with_the_same_batch_size(references, tmp_path):
    model, made = references
    (calibration_prompts, calibration), (holdout_prompts, holdout) = made["calibration"], made["holdout"]
    policy = CachePolicy(mask=(True, False, True, False, True, False), model_name="tiny",
                         model_fingerprint=model_fingerprint(model.adapter.transformer))
    params = {"baselines": ["uniform", "teacache"], "calibration_size": 4, "max_calibration_evaluations": 3,
              "timing_images": 1, "quality": "images", "grid_images": 2, "batch_size": 2}
    tables = {}
    for processes in (1, 2):
        run_params = {**params, "processes": processes, "resume_dir": str(tmp_path / f"partial{processes}")}
        table, *_ = evaluate_ladder({3: policy}, {3: policy}, calibration, holdout, calibration_prompts,
                                    holdout_prompts, model, run_params)
        tables[processes] = table
        assert not any((tmp_path / f"partial{processes}").iterdir())  # scratch removed once the table exists
    one, two = (tables[k].drop(columns=CLOCK) for k in (1, 2))
    assert list(one["method"]) == ["uncached", "budcache", "uniform", "teacache"]
    pd.testing.assert_frame_equal(two, one)


def test_a_lost_batch_alone_is_rerun_and_the_runs_equal_the_one_process_runs(references, tmp_path):
    model, made = references
    _, holdout = made["holdout"]
    data = RolloutSet.from_reference(model.adapter, holdout)
    methods = [Uncached(), FixedPolicy.uniform(6, 3)]
    expected = {m.kind: saved_method_run(m, data, tmp_path / "one", 2) for m in methods}
    out = tmp_path / "shards"
    run_methods_batches(methods, data, out, 2)
    lost = sorted(out.glob("*-batch_00001.safetensors"))[0]
    lost.unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("*.safetensors")}
    save_reference(holdout, tmp_path / "reference")
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"model": MODEL, "reference": str(tmp_path / "reference"), "batch_size": 2,
                               "methods": [m.to_json() for m in methods], "out_dir": str(out)}))
    launch_torchrun(EVALUATION_WORKER, job, 2)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.safetensors") if p.name in kept} == kept
    assert lost.is_file()
    for method in methods:
        got, want = saved_method_run(method, data, out, 2), expected[method.kind]
        assert got.final.equal(want.final)
        assert (got.compute_steps == want.compute_steps).all() and (got.block_evaluations == want.block_evaluations).all()


def test_processes_without_a_batch_size_or_not_a_positive_integer_are_refused(references, tmp_path):
    model, made = references
    (calibration_prompts, calibration), (holdout_prompts, holdout) = made["calibration"], made["holdout"]
    policy = CachePolicy(mask=(True,) * 6, model_name="tiny", model_fingerprint=model_fingerprint(model.adapter.transformer))
    params = {"baselines": [], "calibration_size": 4, "max_calibration_evaluations": 3, "timing_images": 1,
              "quality": "images", "grid_images": 0, "resume_dir": str(tmp_path)}
    for extra, message in (({"processes": 2, "batch_size": None}, "evaluate.processes 2 needs evaluate.batch_size"),
                           ({"processes": 0, "batch_size": 2}, "evaluate.processes must be a positive integer"),
                           ({"processes": 1, "batch_size": 0}, "evaluate.batch_size must be a positive integer")):
        with pytest.raises(ValueError, match=message):
            evaluate_ladder({6: policy}, {6: policy}, calibration, holdout, calibration_prompts, holdout_prompts,
                            model, {**params, **extra})
