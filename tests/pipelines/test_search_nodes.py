"""The search node: its calibration subset (balanced over categories, bad sizes named) and its torchrun ranks."""

import json
import logging

import pandas as pd
import pytest

from budcache_pipeline.pipelines import common
from budcache_pipeline.pipelines.common import ModelHandle
from budcache_pipeline.pipelines.search import nodes
from budcache_pipeline.pipelines.search.nodes import calibration_subset, search_budget
from budcache_pipeline.search import SearchSetupError, compute_reference
from budcache_pipeline.search.distributed import Shard
from budcache_pipeline.search.search_worker import run_search_job
from budcache_pipeline.search.tolerance import LOSS_RELATIVE_TOLERANCE


class _Reference:
    prompts = ["a one", "a two", "b one", "b two"]
    seeds = [1, 2, 3, 4]


PROMPTS = pd.DataFrame({"prompt": _Reference.prompts, "seed": _Reference.seeds, "category": ["a", "a", "b", "b"]})


def test_a_subset_takes_prompts_round_robin_over_categories():
    assert calibration_subset(PROMPTS, _Reference(), 2) == [0, 2]
    assert calibration_subset(PROMPTS, _Reference(), None) == [0, 1, 2, 3]


def test_a_calibration_size_larger_than_the_set_uses_all_and_says_so(caplog):
    with caplog.at_level(logging.WARNING):
        assert calibration_subset(PROMPTS, _Reference(), 10) == [0, 1, 2, 3]
    assert "calibration_size 10 is more than the 4 calibration prompts: searching on all of them" in caplog.text


@pytest.mark.parametrize("size", [0, -3, 2.5, "8", True])
def test_a_calibration_size_that_is_not_a_positive_integer_is_refused(size):
    with pytest.raises(ValueError, match="calibration_size must be a positive integer or null"):
        calibration_subset(PROMPTS, _Reference(), size)


def test_prompts_without_a_teacher_are_refused_naming_the_fix():
    extra = pd.concat([PROMPTS, pd.DataFrame({"prompt": ["c new"], "seed": [9], "category": ["c"]})])
    with pytest.raises(ValueError, match="1 calibration prompt\\(s\\) have no teacher .*kedro run --pipelines reference"):
        calibration_subset(extra, _Reference(), None)


MODEL = {"adapter": "flux", "weights": "tiny", "height": 16, "width": 16, "steps": 8, "torch_threads": 2}
SEARCH = {"calibration_size": None, "starts": ["dp", "uniform"], "forced": [0], "seed": 0, "sa_iterations": 12,
          "hc_rounds": 2, "screen_samples": 4, "dp_samples": 4, "forecast": "reuse", "max_cached_states": 64}


def _reference(model: ModelHandle, pairs: int):
    """`pairs` prompts (one seed each) and their uncached reference on the tiny model."""
    prompts = pd.DataFrame({"prompt": [f"prompt {i}" for i in range(pairs)], "seed": list(range(pairs))})
    reference = compute_reference(model.adapter, prompts["prompt"].tolist(), prompts["seed"].tolist(), model.steps,
                                  model.size, progress=False)
    return prompts, reference


def _no_load_here(monkeypatch) -> list[str]:
    """Make any model load through a `ModelHandle` in this process fail the test; returns the loads attempted."""
    loads: list[str] = []

    def refuse(spec):
        loads.append(spec.adapter)
        raise AssertionError("the node loaded the model in its own process")

    monkeypatch.setattr(common, "load_adapter", refuse)
    return loads


@pytest.mark.slow
def test_the_node_on_two_torchrun_processes_finds_the_one_process_policy(tmp_path, monkeypatch):
    model = ModelHandle(MODEL)
    prompts, reference = _reference(model, 8)

    def params(processes: int) -> dict:
        return {**SEARCH, "processes": processes, "checkpoint_dir": str(tmp_path / f"checkpoints{processes}")}

    one, one_history, one_summary = search_budget(reference, prompts, model, params(1), 4)
    loads = _no_load_here(monkeypatch)
    two, two_history, two_summary = search_budget(reference, prompts, ModelHandle(MODEL), params(2), 4)
    assert loads == [], "the ranks load the model, the node's process never does"
    assert (one_summary["processes"], two_summary["processes"]) == (1, 2)
    assert two.mask == one.mask
    assert (two.model_name, two.model_fingerprint, two.model_weights) == (one.model_name, one.model_fingerprint, one.model_weights)
    assert two.provenance["cost"] == one.provenance["cost"] and two.provenance["search"] == one.provenance["search"]
    assert two.provenance["scores"]["calibration_mse"] == pytest.approx(
        one.provenance["scores"]["calibration_mse"], rel=LOSS_RELATIVE_TOLERANCE)
    assert len(two_history) == len(one_history)
    assert two_summary["prefix_states"].keys() == one_summary["prefix_states"].keys()
    assert not any((tmp_path / "checkpoints2").glob("*.json"))  # removed once the policy exists


@pytest.mark.parametrize("processes", [0, -1, 1.5, "2", True])
def test_a_process_count_that_is_not_a_positive_integer_is_refused(processes):
    reference = type("Reference", (), {"steps": 8})()
    with pytest.raises(ValueError, match="search.processes must be a positive integer"):
        search_budget(reference, PROMPTS, ModelHandle(MODEL), {**SEARCH, "processes": processes}, 4)


def test_a_search_on_torchrun_ranks_never_loads_the_model_in_the_nodes_process(tmp_path, monkeypatch):
    """The ranks' work is done in this process by the worker's own function (it loads the model through
    `models.spec`, as each rank does); the node's handle must not load it beside them."""
    prompts, reference = _reference(ModelHandle(MODEL), 4)
    launched = []

    def ranks(module, job_path, processes):
        job = json.loads(job_path.read_text())
        launched.append((module, processes, job["model"]["torch_threads"]))
        run_search_job(job, Shard())

    monkeypatch.setattr(nodes, "launch_torchrun", ranks)
    loads = _no_load_here(monkeypatch)
    model = ModelHandle(MODEL)
    policy, _, summary = search_budget(reference, prompts, model, {**SEARCH, "processes": 2}, 4)
    assert loads == [] and launched == [("budcache_pipeline.search.search_worker", 2, 1)]
    assert (summary["processes"], policy.budget, policy.model_name) == (2, 4, "flux")


def test_tight_budgets_search_from_the_tight_starts_and_the_policy_says_so(tmp_path):
    model = ModelHandle(MODEL)
    prompts, reference = _reference(model, 4)
    params = {**SEARCH, "starts": ["dp"], "tight_starts": ["uniform"], "tight_budget_fraction": 0.3,
              "checkpoint_dir": str(tmp_path)}
    tight, _, tight_summary = search_budget(reference, prompts, model, params, 2)
    loose, _, _ = search_budget(reference, prompts, model, params, 4)
    assert tight.provenance["search"]["starts"] == ["uniform"] and loose.provenance["search"]["starts"] == ["dp"]
    assert [s["start"] for s in tight_summary["starts"]] == ["uniform"]
    with pytest.raises(ValueError, match="tight_budget_fraction must be a number in \\(0, 1\\)"):
        search_budget(reference, prompts, model, {**params, "tight_budget_fraction": 1.5}, 2)


def test_an_unknown_search_parameter_is_refused_by_name_before_any_search(tmp_path):
    model = ModelHandle(MODEL)
    prompts, reference = _reference(model, 4)
    with pytest.raises(SearchSetupError, match=r"unknown search parameter\(s\) \['sa_iteration'\]"):
        search_budget(reference, prompts, model, {**SEARCH, "sa_iteration": 3, "checkpoint_dir": str(tmp_path)}, 4)
    assert not any(tmp_path.iterdir()), "no checkpoint was started"
