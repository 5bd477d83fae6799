"""The model as the catalog entry `model`: built by `ModelHooks` from the `model:` parameters, loaded at
most once per run and per thread, torch's thread count set once, bad blocks refused naming the setting."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project
from kedro.io import DataCatalog, DatasetError
from kedro.pipeline import Node, Pipeline
from kedro.runner import SequentialRunner, ThreadRunner

from budcache_pipeline.datasets import ModelDataset
from budcache_pipeline.hooks import MODEL, ModelHooks
from budcache_pipeline.models.adapter import ModelSpecError, Size
from budcache_pipeline.pipelines import common
from budcache_pipeline.pipelines.common import ModelHandle

PROJECT = Path(__file__).resolve().parents[2]
BLOCK = {"adapter": "digits", "weights": None, "name": "digits", "height": 16, "width": 16, "steps": 10,
         "torch_threads": 2}


@pytest.fixture
def loads(monkeypatch) -> list[str]:
    """Every adapter load, by thread name; the adapters are stand-ins (no weights are read)."""
    made: list[str] = []

    def load(spec):
        made.append(threading.current_thread().name)
        return SimpleNamespace(pipe=SimpleNamespace(), device="cpu", spec=spec)

    monkeypatch.setattr(common, "load_adapter", load)
    return made


@pytest.fixture
def thread_counts(monkeypatch) -> list[int]:
    """Every `torch.set_num_threads` call's value (the calls still happen)."""
    calls: list[int] = []
    real = torch.set_num_threads

    def count(threads: int) -> None:
        calls.append(threads)
        real(threads)

    monkeypatch.setattr(torch, "set_num_threads", count)
    return calls


def _catalog_for(pipeline: Pipeline, block: dict) -> DataCatalog:
    """A catalog as a Kedro session makes it: parameters added, then the hooks run."""
    catalog = DataCatalog()
    ModelHooks().after_catalog_created(catalog=catalog, parameters={"params:model": block})
    ModelHooks().before_pipeline_run(pipeline=pipeline, catalog=catalog)
    return catalog


def _uses_model(name: str, seen: dict[str, tuple[object, str]], wait: threading.Barrier | None = None) -> Node:
    """A node that computes with the model: records the adapter it got and its thread in `seen[name]`."""

    def compute(model: ModelHandle) -> None:
        if wait is not None:
            wait.wait()
        seen[name] = (model.adapter, threading.current_thread().name)

    return Node(compute, inputs=MODEL, outputs=None, name=name)


def test_nodes_run_one_after_another_share_one_load_and_the_thread_count_is_set_once(loads, thread_counts):
    seen: dict[str, tuple[object, str]] = {}
    pipeline = Pipeline([_uses_model(f"node_{i}", seen) for i in range(3)])
    SequentialRunner().run(pipeline, _catalog_for(pipeline, BLOCK))
    assert len(seen) == 3 and len(loads) == 1
    assert len({id(adapter) for adapter, _ in seen.values()}) == 1
    assert thread_counts == [2] and torch.get_num_threads() == 2


def test_side_by_side_threads_each_load_their_own_model_once(loads, thread_counts):
    seen: dict[str, tuple[object, str]] = {}
    meet = threading.Barrier(2, timeout=60)
    pipeline = Pipeline([_uses_model("budget_a", seen, meet), _uses_model("budget_b", seen, meet)])
    ThreadRunner(max_workers=2).run(pipeline, _catalog_for(pipeline, BLOCK))
    (adapter_a, thread_a), (adapter_b, thread_b) = seen["budget_a"], seen["budget_b"]
    assert thread_a != thread_b
    assert adapter_a is not adapter_b, "a search's hooks must never reach another budget's model"
    assert sorted(loads) == sorted([thread_a, thread_b])
    assert thread_counts == [2], "set once, before the worker threads start"


def test_the_real_loader_leaves_the_thread_count_to_the_handle(thread_counts):
    model = ModelHandle(BLOCK)
    adapter = model.adapter
    assert model.adapter is adapter and thread_counts == [2]
    assert model.size == Size(16, 16) and model.steps == 10


def test_the_spec_size_and_steps_need_no_load_and_a_run_without_the_model_sets_no_threads(loads, thread_counts):
    model = ModelHandle({**BLOCK, "adapter": "flux", "weights": "tiny", "height": None, "width": None})
    assert (model.spec.registered_name, model.steps, model.size) == ("digits", 10, Size(16, 16))
    assert model.params["adapter"] == "flux"
    _catalog_for(Pipeline([Node(lambda: 1, None, "x", name="no_model")]), BLOCK)
    assert loads == [] and thread_counts == []


def test_the_dataset_is_load_only_and_describes_its_block():
    dataset = ModelDataset(model=BLOCK)
    assert dataset.load() is dataset.load() and dataset.exists()
    assert "digits" in str(dataset)
    with pytest.raises(DatasetError, match="configured by the `model:` parameters"):
        dataset.save({"adapter": "flux"})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"stepz": 10}, r"unknown model settings \['stepz'\]"),
        ({"steps": "ten"}, "model.steps must be a positive integer or null, got 'ten'"),
        ({"steps": 0}, "model.steps must be a positive integer or null, got 0"),
        ({"steps": None}, "model.steps is not set"),
        ({"height": 16.5}, "model.height must be a positive integer or null, got 16.5"),
        ({"torch_threads": True}, "model.torch_threads must be a positive integer or null, got True"),
        ({"adapter": "fluxx"}, "unknown model adapter 'fluxx'"),
        ({"offload": "gpu"}, "model.offload 'gpu' is not one of"),
    ],
)
def test_a_bad_model_block_stops_the_catalog_naming_the_setting(change, message):
    with pytest.raises(ModelSpecError, match=message):
        ModelHooks().after_catalog_created(catalog=DataCatalog(), parameters={"params:model": {**BLOCK, **change}})


def test_a_missing_or_malformed_model_block_is_named():
    with pytest.raises(ModelSpecError, match="no `model:` block"):
        ModelHooks().after_catalog_created(catalog=DataCatalog(), parameters={"params:search": {}})
    with pytest.raises(ModelSpecError, match="must be a block of settings .* got str"):
        ModelHandle("flux")


def test_a_session_builds_the_model_from_the_environment_and_runtime_params(tmp_path, monkeypatch):
    """What `kedro run --env tiny_flux --params model.steps=12` gives the nodes: the environment's block,
    the override on top, nothing loaded yet."""
    monkeypatch.setenv("KEDRO_DISABLE_TELEMETRY", "true")
    shutil.copy(PROJECT / "pyproject.toml", tmp_path)
    shutil.copytree(PROJECT / "conf", tmp_path / "conf", ignore=shutil.ignore_patterns("credentials*"))
    (tmp_path / "conf" / "local").mkdir(exist_ok=True)
    (tmp_path / "src").mkdir()
    bootstrap_project(tmp_path)
    override = {"model": {"steps": 12}}
    with KedroSession.create(project_path=tmp_path, env="tiny_flux", runtime_params=override) as session:
        model = session.load_context().catalog.load(MODEL)
    assert isinstance(model, ModelHandle)
    assert (model.spec.adapter, model.spec.weights, model.steps, model.size) == ("flux", "tiny", 12, Size(16, 16))
