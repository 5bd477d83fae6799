"""Atomic writes: a failed or killed write leaves the previous file whole and no temporary file behind."""

import json
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
from kedro.io import DatasetError
from kedro_datasets.json import JSONDataset

from budcache_pipeline.atomic import atomic_folder, atomic_path, write_text_atomic
from budcache_pipeline.datasets import AtomicDataset, FigureDataset, PolicyDataset
from budcache_pipeline.policy import CachePolicy


class Unserialisable:
    pass


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = write_text_atomic(tmp_path / "report.json", '{"old": true}\n')
    with pytest.raises(RuntimeError), atomic_path(target) as temporary:
        temporary.write_text('{"new": ')
        raise RuntimeError("killed mid-write")
    assert target.read_text() == '{"old": true}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]
    write_text_atomic(target, '{"new": true}\n')
    assert target.read_text() == '{"new": true}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_a_failed_folder_write_keeps_the_old_folder(tmp_path):
    with atomic_folder(tmp_path / "plots") as staging:
        (staging / "a.png").write_bytes(b"a")
    with pytest.raises(RuntimeError), atomic_folder(tmp_path / "plots") as staging:
        (staging / "b.png").write_bytes(b"b")
        raise RuntimeError("killed mid-write")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.png", "plots"]


def test_kedro_json_dataset_truncates_in_place_and_the_wrapper_does_not(tmp_path):
    """What kedro-datasets does on a failed save (found in its source: fsspec opens the target for
    writing), and what AtomicDataset does instead."""
    plain = JSONDataset(filepath=str(tmp_path / "plain.json"))
    wrapped = AtomicDataset(dataset="json.JSONDataset", filepath=str(tmp_path / "wrapped.json"))
    for dataset in (plain, wrapped):
        dataset.save({"budget": 5})
        with pytest.raises(DatasetError):
            dataset.save({"budget": 3, "bad": Unserialisable()})
    with pytest.raises(json.JSONDecodeError):
        json.loads((tmp_path / "plain.json").read_text())
    assert wrapped.load() == {"budget": 5}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.json", "wrapped.json"]


def test_figure_dataset_replaces_a_folder_whole_and_loads_as_its_files(tmp_path):
    dataset = FigureDataset(filepath=str(tmp_path / "convergence"))
    dataset.save({"budget_5.png": plt.figure(), "budget_3.png": plt.figure()})
    dataset.save({"budget_4.png": plt.figure()})
    assert dataset.load() == [tmp_path / "convergence" / "budget_4.png"]
    assert (tmp_path / "convergence" / "budget_4.png").read_bytes().startswith(b"\x89PNG")
    single = FigureDataset(filepath=str(tmp_path / "pareto.png"))
    single.save(plt.figure())
    assert single.load() == [tmp_path / "pareto.png"]
    plt.close("all")


def test_a_policy_save_that_dies_half_way_leaves_the_previous_policy(tmp_path, monkeypatch):
    dataset = PolicyDataset(filepath=str(tmp_path / "budget_4.json"))
    policy = CachePolicy.uniform(10, 4, "digits", "abc")
    dataset.save(policy)
    write_bytes = Path.write_bytes

    def dies_half_way(self, data):
        write_bytes(self, data[: len(data) // 2])
        raise OSError("no space left on device")

    monkeypatch.setattr(Path, "write_bytes", dies_half_way)
    with pytest.raises(DatasetError, match="no space left"):
        dataset.save(CachePolicy.uniform(10, 4, "digits", "def"))
    monkeypatch.undo()
    assert dataset.load() == policy
    assert [p.name for p in tmp_path.iterdir()] == ["budget_4.json"]
