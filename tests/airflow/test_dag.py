"""The Airflow DAG `make airflow` writes, loaded in a real Airflow (the `.venv-airflow` environment).

Airflow lives in its own virtual environment (`make test` builds it), so the DAG is exported with
the project's kedro-airflow and inspected by `inspect_dag.py` run with Airflow's Python.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
AIRFLOW_PYTHON = ROOT / ".venv-airflow" / "bin" / "python"
INSPECT = Path(__file__).with_name("inspect_dag.py")
DAG_ID = "budcache-pipeline"


@pytest.fixture(scope="module", autouse=True)
def airflow_environment():
    if not AIRFLOW_PYTHON.is_file():
        if os.environ.get("CI"):
            pytest.fail(".venv-airflow is missing: `make test` builds it before the suite")
        pytest.skip(".venv-airflow is missing: run `make airflow-venv` (or `make test`)")


def export(target: Path, budgets: str) -> Path:
    """`kedro airflow create` as `make airflow` runs it, for the ladder `budgets`."""
    env = {**os.environ, "BUDCACHE_BUDGETS": budgets, "KEDRO_DISABLE_TELEMETRY": "true"}
    kedro = Path(sys.executable).with_name("kedro")
    command = [str(kedro), "airflow", "create", "--group-by", "namespace",
               "--jinja-file", "conf/airflow/budcache_dag.j2", "--target-dir", str(target)]
    subprocess.run(command, cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    return target


def inspect(folder: Path, tmp_path: Path) -> dict:
    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path / "airflow-home"), "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}
    result = subprocess.run(
        [str(AIRFLOW_PYTHON), str(INSPECT), str(folder)], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_the_dag_loads_with_one_task_per_budget_between_reference_and_evaluation(tmp_path):
    report = inspect(export(tmp_path / "dags", "14,10,7,5"), tmp_path)
    assert report["import_errors"] == {}
    tasks = report["dags"][DAG_ID]
    budgets = sorted(t for t in tasks if t.startswith("budget-"))
    assert budgets == ["budget-10", "budget-14", "budget-5", "budget-7"]
    for task in budgets:
        assert {"compute-calibration-reference", "split-prompts"} <= set(tasks[task]["upstream"])
        assert {"collect-searched-ladder", "collect-aligned-ladder"} <= set(tasks[task]["downstream"])
        assert tasks[task]["pool"] == "budcache_gpus"
        assert tasks[task]["command"].endswith(f"run --env local --pipelines __default__ --namespaces budget_{task[7:]}")
    assert tasks["clean-prompts"]["upstream"] == [] and tasks["clean-prompts"]["pool"] == "default_pool"
    assert tasks["register-ladder"]["downstream"] == []
    assert {"collect-final-ladder", "collect-plots", "collect-tables"} <= set(tasks["register-ladder"]["upstream"])


def test_adding_a_budget_and_exporting_again_adds_one_task(tmp_path):
    before = inspect(export(tmp_path / "before", "14,10,7,5"), tmp_path)["dags"][DAG_ID]
    after = inspect(export(tmp_path / "after", "14,10,7,5,4"), tmp_path)["dags"][DAG_ID]
    assert set(after) - set(before) == {"budget-4"}
    assert set(before) <= set(after)
