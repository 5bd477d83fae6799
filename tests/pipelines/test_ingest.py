import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner

from budcache_pipeline import settings
from budcache_pipeline.pipeline_registry import configured_budgets, register_pipelines
from budcache_pipeline.pipelines.ingest import create_pipeline

PROJECT = Path(__file__).resolve().parents[2]


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A copy of the project's configuration and raw data, so runs never touch the checkout."""
    monkeypatch.setenv("KEDRO_DISABLE_TELEMETRY", "true")
    shutil.copy(PROJECT / "pyproject.toml", tmp_path)
    shutil.copytree(PROJECT / "conf", tmp_path / "conf", ignore=shutil.ignore_patterns("credentials*"))
    (tmp_path / "conf" / "local").mkdir(exist_ok=True)
    (tmp_path / "src").mkdir()
    (tmp_path / "data" / "01_raw").mkdir(parents=True)
    shutil.copy(PROJECT / "data" / "01_raw" / "prompts.csv", tmp_path / "data" / "01_raw")
    bootstrap_project(tmp_path)
    return tmp_path


def run_ingest(project: Path) -> None:
    with KedroSession.create(project_path=project) as session:
        session.run(pipeline_names=["ingest"])


def test_ingest_pipeline_writes_the_catalogued_sets_and_summary(project):
    run_ingest(project)
    calibration = pd.read_parquet(project / "data" / "05_model_input" / "calibration_prompts.parquet")
    holdout = pd.read_parquet(project / "data" / "05_model_input" / "holdout_prompts.parquet")
    summary = json.loads((project / "data" / "08_reporting" / "ingest_summary.json").read_text())
    assert list(calibration.columns) == ["prompt_id", "prompt", "seed", "category"]
    assert summary["splits"] == {"calibration": len(calibration), "holdout": len(holdout)}
    assert len(calibration) + len(holdout) == summary["prompts"] >= 60
    assert summary["holdout_fraction"] == 0.25
    assert (project / "data" / "02_intermediate" / "prompts.parquet").is_file()


def test_ingest_is_deterministic_across_runs(project):
    run_ingest(project)
    first = (project / "data" / "05_model_input" / "holdout_prompts.parquet").read_bytes()
    run_ingest(project)
    assert (project / "data" / "05_model_input" / "holdout_prompts.parquet").read_bytes() == first


def test_raw_prompts_can_be_a_jsonl_file_through_the_catalog(project):
    raw = project / "data" / "01_raw" / "prompts.jsonl"
    raw.write_text("".join(json.dumps({"prompt": f"a handwritten {w}"}) + "\n" for w in ["one", "One ", "two"]))
    (project / "conf" / "local" / "catalog.yml").write_text(
        "raw_prompts:\n  type: budcache_pipeline.datasets.PromptFileDataset\n  filepath: data/01_raw/prompts.jsonl\n"
    )
    run_ingest(project)
    summary = json.loads((project / "data" / "08_reporting" / "ingest_summary.json").read_text())
    assert summary["prompts"] == 2 and summary["duplicates_dropped"] == 1 and summary["seeds_derived"] == 2


def test_bad_prompt_file_fails_the_run_with_the_reason(project):
    (project / "data" / "01_raw" / "prompts.csv").write_text("text\na handwritten seven\n")
    with pytest.raises(Exception, match="no 'prompt' column"):
        run_ingest(project)


def test_ingest_nodes_run_with_an_in_memory_catalog():
    raw = pd.DataFrame({"prompt": ["the digit 1", "the digit 2", "THE DIGIT 1"], "seed": [1, 2, 3]})
    catalog = DataCatalog(
        {"raw_prompts": MemoryDataset(raw), "params:ingest": MemoryDataset({"holdout_fraction": 0.5})}
    )
    SequentialRunner().run(create_pipeline(), catalog)
    assert catalog["ingest_summary@json"].load()["duplicates_dropped"] == 1
    assert len(catalog["calibration_prompts"].load()) + len(catalog["holdout_prompts"].load()) == 2


def test_registry_lists_ingest_and_default_with_explicit_node_names():
    pipelines = register_pipelines()
    assert {"ingest", "__default__"} <= set(pipelines)
    assert {n.name for n in pipelines["ingest"].nodes} == {"clean_prompts", "split_prompts"}


def test_budgets_come_from_settings_and_are_checked(monkeypatch):
    assert configured_budgets() == (14, 10, 7, 5, 4, 3)
    monkeypatch.setattr(settings, "BUDGETS", (5, 10))
    assert configured_budgets() == (10, 5)
    monkeypatch.setattr(settings, "BUDGETS", (5, 5))
    with pytest.raises(ValueError, match="repeated"):
        register_pipelines()
    monkeypatch.setattr(settings, "BUDGETS", (0, 3))
    with pytest.raises(ValueError, match="positive integers"):
        configured_budgets()


def test_a_prompt_file_of_one_distinct_prompt_fails_the_run_naming_the_file(project):
    (project / "data" / "01_raw" / "prompts.csv").write_text("prompt\na handwritten seven\nA handwritten seven\n")
    with pytest.raises(Exception, match=r"01_raw/prompts.csv has 1 distinct prompt .*need at least 2 distinct"):
        run_ingest(project)
    assert not (project / "data" / "05_model_input" / "holdout_prompts.parquet").exists()
