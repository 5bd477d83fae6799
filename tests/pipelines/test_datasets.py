"""The project's Kedro datasets: policies as JSON, teacher trajectories in `load_reference`'s layout."""

import pytest
import torch
from kedro.io import DatasetError

from budcache_pipeline.datasets import PolicyDataset, ReferenceSetDataset
from budcache_pipeline.policy import CachePolicy
from budcache_pipeline.search import ReferenceSet, load_reference


def reference_set(count: int = 5, batch_size: int = 2) -> ReferenceSet:
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(count, 64, 4, generator=generator)
    return ReferenceSet(
        [f"prompt {i}" for i in range(count)],
        list(range(count)),
        [1.0, 0.5, 0.0],
        noise,
        noise * 0.5,
        {"batch_size": batch_size, "count": count, "height": 16, "width": 16, "prompts": [], "seeds": []},
    )


def test_reference_dataset_writes_the_layout_load_reference_reads(tmp_path):
    reference = reference_set()
    dataset = ReferenceSetDataset(path=str(tmp_path / "reference"))
    assert not dataset.exists()
    dataset.save(reference)
    loaded = load_reference(tmp_path / "reference")
    assert torch.equal(loaded.noise, reference.noise) and torch.equal(loaded.final, reference.final)
    assert (loaded.prompts, loaded.seeds) == (reference.prompts, reference.seeds)
    assert len(list((tmp_path / "reference").glob("batch_*.safetensors"))) == 3
    dataset.save(reference.subset([0, 1]))
    assert len(dataset.load()) == 2
    assert len(list((tmp_path / "reference").glob("batch_*.safetensors"))) == 1


def test_missing_reference_names_the_pipeline_to_run(tmp_path):
    with pytest.raises(DatasetError, match=r"run `kedro run --pipelines reference` first"):
        ReferenceSetDataset(path=str(tmp_path / "nothing")).load()


def test_policy_dataset_round_trips_canonical_json_and_refuses_bad_files(tmp_path):
    policy = CachePolicy.uniform(10, 4, "digits", "abc").with_provenance(scores={"holdout_mse": 0.5})
    dataset = PolicyDataset(filepath=str(tmp_path / "budget_4.json"))
    dataset.save(policy)
    assert (tmp_path / "budget_4.json").read_text() == policy.to_json()
    assert dataset.load() == policy
    (tmp_path / "budget_4.json").write_text(policy.to_json().replace('"budget": 4', '"budget": 5'))
    with pytest.raises(DatasetError, match="not a valid policy"):
        dataset.load()
    with pytest.raises(DatasetError, match="run the pipeline that writes it"):
        PolicyDataset(filepath=str(tmp_path / "missing.json")).load()
