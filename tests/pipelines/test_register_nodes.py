"""The provenance node (git commit, DVC hashes, model fingerprint into one dataset) and the register node,
which tags and logs from its inputs alone: the provenance dataset and the files the catalog hands it."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import mlflow
import pytest
import yaml

from budcache_pipeline.pipelines.register.nodes import register_policies
from budcache_pipeline.pipelines.register.provenance import record_provenance
from budcache_pipeline.policy import CachePolicy

FINGERPRINT = "0123456789abcdef"
DATA_PATHS = ["data/01_raw/prompts.csv", "data/03_primary/reference"]


def _ladder() -> dict[int, CachePolicy]:
    return {
        budget: CachePolicy.uniform(10, budget, "digits", FINGERPRINT).with_provenance(scores={"holdout_mse": 0.1})
        for budget in (5, 3)
    }


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """A Kedro project root holding committed prompts and a reference folder; the working directory is a subfolder."""
    root = tmp_path / "project"
    (root / "data" / "01_raw").mkdir(parents=True)
    (root / "data" / "03_primary" / "reference" / "calibration").mkdir(parents=True)
    (root / "pyproject.toml").write_text('[tool.kedro]\npackage_name = "x"\n')
    (root / "data" / "01_raw" / "prompts.csv").write_text("prompt\na handwritten seven\n")
    (root / "data" / "03_primary" / "reference" / "calibration" / "batch_00000.safetensors").write_bytes(b"\0" * 64)
    (root / "data" / "03_primary" / "reference" / "reference_summary.json").write_text("{}")
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    for command in (["git", "init", "-q"], ["git", "add", "-A"], [*git, "commit", "-qm", "data"]):
        subprocess.run(command, cwd=root, check=True, capture_output=True)
    (root / "conf").mkdir()
    monkeypatch.chdir(root / "conf")
    return root


def test_provenance_records_the_commit_the_dvc_hashes_and_the_model(project):
    commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=project, capture_output=True,
                            text=True, check=True).stdout.strip()
    provenance = record_provenance(_ladder(), DATA_PATHS)
    assert provenance["code_version"].endswith(f"+g{commit}")
    assert provenance["model_fingerprint"] == FINGERPRINT
    data = provenance["data"]
    prompts = hashlib.md5((project / DATA_PATHS[0]).read_bytes()).hexdigest()
    assert data["paths"][DATA_PATHS[0]] == prompts and data["paths"][DATA_PATHS[1]].endswith(".dir")
    assert data["source"] == "computed", "no dvc.lock records these hashes"

    lock = {"stages": {"ingest": {"deps": [{"path": DATA_PATHS[0], "md5": prompts}]},
                       "reference": {"outs": [{"path": DATA_PATHS[1], "md5": data["paths"][DATA_PATHS[1]]}]}}}
    (project / "dvc.lock").write_text(yaml.safe_dump(lock))
    assert record_provenance(_ladder(), DATA_PATHS)["data"] == {**data, "source": "dvc.lock"}

    (project / "data" / "03_primary" / "reference" / "reference_summary.json").write_text('{"pairs": 1}')
    changed = record_provenance(_ladder(), DATA_PATHS)
    assert changed["data"]["source"] == "computed" and changed["data"]["hash"] != data["hash"]
    assert changed["code_version"].endswith("-dirty"), "a tracked file changed since the commit"


def test_provenance_of_missing_data_names_the_fix(project):
    with pytest.raises(FileNotFoundError, match="data/05_model_input/x.parquet does not exist: run the pipeline"):
        record_provenance(_ladder(), ["data/05_model_input/x.parquet"])


def test_register_tags_and_logs_from_its_inputs_alone(tmp_path, monkeypatch):
    """Run from a folder that is no project: everything the run records comes from the node's inputs."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    monkeypatch.chdir(tmp_path)
    files = {}
    for name in ("tables/metrics.csv", "tables/metrics.json", "plots/pareto.png", "plots/convergence/budget_5.png",
                 "out/search/budget_5_summary.json", "out/align/budget_5.json"):
        files[name] = tmp_path / name
        files[name].parent.mkdir(parents=True, exist_ok=True)
        files[name].write_text(name)
    provenance = {"code_version": "0.1.0+gfeedfacefeed", "model_fingerprint": FINGERPRINT,
                  "data": {"hash": "d" * 64, "paths": {"data/01_raw/prompts.csv": "md5p"}, "source": "dvc.lock"}}
    search = {5: {"calibration_mse": 0.1, "start_spread": {"std": 0.0, "max": 0.1},
                  "cost": {"evaluations": 3, "block_stack_calls": 9, "calibration_rollouts": 1.5, "wall_seconds": 2.0}}}
    registration = register_policies(
        {5: _ladder()[5]}, {"budget_5": {"budcache": {"latent_mse": 0.1}}}, search, {5: {"accepted": False}},
        {"pairs": {"calibration": 4, "holdout": 4}}, {"source": "prompts.csv", "splits": {"calibration": 4}},
        provenance, {"model": {"adapter": "digits", "name": "digits"}, "register": {"experiment": "test"}},
        [files["tables/metrics.csv"], files["tables/metrics.json"]],
        {"plots": [files["plots/pareto.png"], files["plots/convergence/budget_5.png"]],
         "search": [files["out/search/budget_5_summary.json"]], "align": [files["out/align/budget_5.json"]]},
    )
    assert (registration["code_version"], registration["dvc_data_hash"], registration["data_source"]) == (
        "0.1.0+gfeedfacefeed", "d" * 64, "dvc.lock")
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    version = client.get_model_version(registration["registered_model"], registration["version"])
    assert {k: version.tags[k] for k in ("code_version", "dvc_data_hash", "model_fingerprint")} == {
        "code_version": "0.1.0+gfeedfacefeed", "dvc_data_hash": "d" * 64, "model_fingerprint": FINGERPRINT}
    run = client.get_run(registration["run_id"])
    assert run.data.params["data.source"] == "dvc.lock" and run.data.params["data.data/01_raw/prompts.csv"] == "md5p"
    assert run.data.tags["code_version"] == "0.1.0+gfeedfacefeed"

    def listed(path=None):
        found = []
        for item in client.list_artifacts(run.info.run_id, path):
            found.extend(listed(item.path) if item.is_dir else [item.path])
        return found

    logged = {path for path in listed() if not path.startswith("policies/")}
    assert logged == {"metrics.csv", "metrics.json", "plots/pareto.png", "plots/convergence/budget_5.png",
                      "search/budget_5_summary.json", "align/budget_5.json"}
