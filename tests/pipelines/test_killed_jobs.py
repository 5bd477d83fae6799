"""`kill -9` of a real `kedro run --pipelines <name>` half-way, then the same command again.

Each test starts the pipeline in a reduced copy of the project, waits until its work is
half done (a reference batch saved, a search checkpoint written, the MLflow run's files
being uploaded), sends SIGKILL, reruns the command and compares with `reduced_run`
(tests/conftest.py), the same configuration run once without interruption.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from mlflow import MlflowClient

from budcache_pipeline.policy import load_policy
from budcache_pipeline.policy_ladder_model import CHECKSUMS_FILE, checksums_text
from budcache_pipeline.registry import CANDIDATE_ALIAS, pull, verify
from budcache_pipeline.search.tolerance import LOSS_RELATIVE_TOLERANCE
from tests.reduced_project import copy_project, environment, kedro, reduce_configuration

pytestmark = pytest.mark.slow  # end to end: `make test-fast` leaves it out

BUDGETS = (5, 3)
KEDRO = str(Path(sys.executable).parent / "kedro")


def kill_when(project: Path, pipeline: str, ready: Callable[[], bool], timeout: float = 300) -> None:
    """Start `kedro run --pipelines <pipeline>` in `project` and SIGKILL it as soon as `ready()` holds.

    The run gets the lowest CPU priority, so on a machine whose cores it fills this process still
    wakes on time to see `ready()` (a reference batch of the reduced model takes tens of ms)."""
    log = (project / f"killed-{pipeline}.log").open("w")
    process = subprocess.Popen(
        [KEDRO, "run", "--pipelines", pipeline], cwd=project, env=environment(project), stdout=log, stderr=log,
        preexec_fn=lambda: os.nice(19),
    )
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            assert process.poll() is None, f"{pipeline} ended ({process.returncode}) before the kill point"
            assert time.monotonic() < deadline, f"{pipeline} did not reach the kill point in {timeout}s"
            time.sleep(0.005)
        assert process.poll() is None, f"{pipeline} finished before it could be killed"
        os.kill(process.pid, signal.SIGKILL)
        assert process.wait() == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()


def files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def ingested(tmp_path_factory) -> Path:
    """A reduced copy after `ingest`, where the reference and search runs are killed."""
    project = copy_project(tmp_path_factory.mktemp("killed") / "project")
    reduce_configuration(project)
    kedro(project, "run", "--pipelines", "ingest")
    return project


def test_reference_killed_after_its_first_batch_and_rerun_equals_an_uninterrupted_one(ingested, reduced_run):
    partial = ingested / "data" / "02_intermediate" / "reference_partial"
    reference = ingested / "data" / "03_primary" / "reference"
    kill_when(ingested, "reference", lambda: any(partial.glob("calibration-*/batch_00000.safetensors")))
    assert not (reference / "calibration" / "manifest.json").exists(), "the kill came after the reference was done"
    assert not any(p.name.endswith(".tmp") for p in reference.parent.rglob("*") if p.parent != partial)

    kedro(ingested, "run", "--pipelines", "reference")
    for split in ("calibration", "holdout"):
        rerun, uninterrupted = (root / "data" / "03_primary" / "reference" / split for root in (ingested, reduced_run))
        assert files(rerun) == files(uninterrupted), split
    assert not any(partial.iterdir()), "the resumed batches are removed once the reference is saved"


def test_search_killed_at_its_first_checkpoint_and_rerun_ends_on_the_same_masks_and_losses(ingested, reduced_run):
    if not (ingested / "data" / "03_primary" / "reference" / "calibration" / "manifest.json").is_file():
        kedro(ingested, "run", "--pipelines", "reference")
    checkpoints = ingested / "data" / "02_intermediate" / "search_checkpoints"
    searched = ingested / "data" / "06_models" / "searched"
    kill_when(ingested, "search", lambda: any(checkpoints.glob("budget_*.json")))
    assert any(not (searched / f"budget_{b}.json").exists() for b in BUDGETS), "the kill came after the search"

    kedro(ingested, "run", "--pipelines", "search")
    for budget in BUDGETS:
        rerun = load_policy(searched / f"budget_{budget}.json")
        uninterrupted = load_policy(reduced_run / "data" / "06_models" / "searched" / f"budget_{budget}.json")
        assert rerun.mask == uninterrupted.mask, budget
        assert rerun.provenance["scores"]["calibration_mse"] == pytest.approx(
            uninterrupted.provenance["scores"]["calibration_mse"], rel=LOSS_RELATIVE_TOLERANCE
        )
        finals = [
            [s["final_loss"] for s in policy.provenance["starts"]] for policy in (rerun, uninterrupted)
        ]
        assert finals[0] == pytest.approx(finals[1], rel=LOSS_RELATIVE_TOLERANCE)
    assert not any(checkpoints.glob("budget_*.json")), "finished searches remove their checkpoints"


def aliases_verify(project: Path) -> dict[str, str]:
    """Every alias of every registered model in the copy's registry, checked end to end by `verify`."""
    uri = environment(project)["MLFLOW_TRACKING_URI"]
    checked = {}
    for model in MlflowClient(tracking_uri=uri, registry_uri=uri).search_registered_models():
        for alias, version in model.aliases.items():
            result = verify(model.name, alias=alias, tracking_uri=uri)
            assert result.ok, f"alias {alias} of {model.name} points at version {version}: {result.message}"
            checked[alias] = str(version)
    return checked


@pytest.mark.parametrize(
    "kill_point",
    [
        pytest.param("mlartifacts/budcache/*/artifacts/*", id="while the run's files upload"),
        pytest.param("mlartifacts/budcache/models/*/artifacts/MLmodel", id="once the model is logged"),
    ],
)
def test_register_killed_half_way_and_rerun_leaves_no_alias_on_an_incomplete_version(
    kill_point, reduced_run, tmp_path
):
    project = copy_project(tmp_path / "project")
    reduce_configuration(project)
    shutil.copytree(reduced_run / "data", project / "data", dirs_exist_ok=True)
    registration = project / "data" / "08_reporting" / "registration.json"
    registration.unlink()
    kill_when(project, "register", lambda: any(project.glob(kill_point)))
    assert not registration.exists(), "the kill came after the registration"
    aliases_verify(project)

    kedro(project, "run", "--pipelines", "register")
    record = json.loads(registration.read_text())
    assert aliases_verify(project) == {CANDIDATE_ALIAS: record["version"]}
    uri = environment(project)["MLFLOW_TRACKING_URI"]
    pull(record["registered_model"], CANDIDATE_ALIAS, tmp_path / "pulled", tracking_uri=uri)
    pulled = files(tmp_path / "pulled")
    uninterrupted = files(reduced_run / "data" / "06_models" / "policies")
    assert {name: data for name, data in pulled.items() if name != CHECKSUMS_FILE} == uninterrupted
    assert pulled[CHECKSUMS_FILE].decode() == checksums_text(uninterrupted)
