"""The baseline registry: every method survives a job file, unknown names are refused by name,
and a baseline added by one registry line is calibrated and run like the shipped ones."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import yaml

from budcache_pipeline.baselines import (
    BASELINES,
    UNIFORM,
    BaselineError,
    FirstBlockCache,
    FixedPolicy,
    MagCache,
    PublishedTeaCache,
    TaylorSeer,
    TeaCache,
    Uncached,
    baseline_class,
    method_from_json,
)
from budcache_pipeline.bench_quality import QUALITY_BASELINES
from budcache_pipeline.evaluation import BaselineCalibrator, parse_entry, run_method
from budcache_pipeline.evaluation.shards import method_digest
from budcache_pipeline.forecast_gains import ForecastGains
from tests.fakes import flux_rollout_set

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = (
    Uncached(),
    FixedPolicy([True, False, True, False]),
    FixedPolicy([True, False, True, False], sigmas=[1.0, 0.7, 0.4, 0.2, 0.0], forecast="linear"),
    FixedPolicy([True, False, True, False], forecast="linear",
                gains=ForecastGains(((1.0, 1.0), (0.5, 2.0), (1.0, 1.0), (1.5, 0.25)), ((1.0, 1.0),) * 4)),
    TeaCache(0.4),
    PublishedTeaCache(0.2),
    FirstBlockCache(0.05),
    MagCache(0.06, [1.0, 0.99, 0.98, 0.97], 0.25, 3),
    TaylorSeer(3, 1, 2),
)


@pytest.mark.parametrize("method", EXAMPLES, ids=lambda m: m.kind)
def test_every_method_survives_a_job_file(method):
    back = method_from_json(json.loads(json.dumps(method.to_json())))
    assert back == method and type(back) is type(method)
    assert method_digest(back) == method_digest(method)


def test_every_registered_name_builds_its_own_class_and_digests_differ():
    assert set(BASELINES) == {"teacache", "teacache_flux", "first_block_cache", "mag_cache", "taylorseer"}
    assert all(baseline_class(name).kind == name for name in BASELINES)
    assert len({method_digest(m) for m in EXAMPLES}) == len(EXAMPLES)


def test_unknown_names_are_refused_with_the_names_there_are():
    with pytest.raises(BaselineError, match=r"unknown baseline 'deepcache': choose one of \['uniform', 'teacache'"):
        baseline_class("deepcache")
    with pytest.raises(BaselineError, match="unknown cache method 'fastercache'"):
        method_from_json({"kind": "fastercache", "params": {}})


def test_the_configured_and_benched_entries_are_all_known():
    configured = yaml.safe_load((ROOT / "conf/base/parameters_evaluate.yml").read_text())["evaluate"]["baselines"]
    for entry in (*configured, *QUALITY_BASELINES):
        name, match = parse_entry(entry)
        assert name == UNIFORM or name in BASELINES, entry
        assert match in ("compute", "blocks")


@dataclass(frozen=True)
class StrictFirstBlockCache(FirstBlockCache):
    """A new baseline: FirstBlockCache whose calibration starts from a lower threshold."""

    kind: ClassVar[str] = "strict_first_block_cache"
    start_threshold: ClassVar[float] = 0.02


def test_a_baseline_added_by_one_registry_line_is_calibrated_and_run(monkeypatch):
    monkeypatch.setitem(BASELINES, StrictFirstBlockCache.kind, StrictFirstBlockCache)
    data = flux_rollout_set([f"prompt {i}" for i in range(4)], list(range(4)), 12, 64)
    calibration = BaselineCalibrator(data, max_evaluations=8).calibrate("strict_first_block_cache", 6)
    assert isinstance(calibration.method, StrictFirstBlockCache)
    assert calibration.mean_compute_steps == pytest.approx(6, abs=0.5)
    assert method_from_json(calibration.method.to_json()) == calibration.method
    run = run_method(calibration.method, data)
    assert run.per_image and run.compute_steps.mean() == pytest.approx(calibration.mean_compute_steps)


def test_only_caches_that_share_one_decision_across_a_batch_run_image_by_image():
    assert {name for name, cls in BASELINES.items() if cls.per_image} == {"first_block_cache", "mag_cache"}
    assert not FixedPolicy.per_image and not Uncached.per_image
