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
    command = [str(kedro), "airflow", "create", "--group-by", "memory",
               "--jinja-file", "conf/airflow/budcache_dag.j2", "--target-dir", str(target)]
    subprocess.run(command, cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    return target


def inspect(folder: Path, tmp_path: Path) -> dict:
    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path / "airflow-home"), "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}
    result = subprocess.run(
        [str(AIRFLOW_PYTHON), str(INSPECT), str(folder)], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_the_dag_loads_with_one_task_group_per_budget_between_reference_and_evaluation(tmp_path):
    report = inspect(export(tmp_path / "dags", "14,10,7,5"), tmp_path)
    assert report["import_errors"] == {}
    tasks = report["dags"][DAG_ID]
    for budget in (14, 10, 7, 5):
        search, align = f"budget_{budget}.budget-{budget}-search-policy", f"budget_{budget}.budget-{budget}-align-schedule"
        assert sorted(t for t in tasks if t.startswith(f"budget_{budget}.")) == sorted([align, search])
        assert {"compute-calibration-reference", "split-prompts"} <= set(tasks[search]["upstream"])
        assert search in tasks[align]["upstream"]
        assert tasks[search]["command"].endswith(f"run --env local --pipelines __default__ --nodes budget_{budget}.search_policy")
        assert tasks[search]["pool"] == tasks[align]["pool"] == "budcache_gpus"
    evaluate = next(t for t in tasks if "evaluate-ladder" in t)
    register = next(t for t in tasks if t.endswith("register-ladder"))
    assert all(f"budget_{b}.budget-{b}-align-schedule" in tasks[evaluate]["upstream"] for b in (14, 10, 7, 5))
    assert evaluate in tasks[register]["upstream"] and tasks[register]["downstream"] == []
    assert tasks["clean-prompts"]["upstream"] == [] and tasks["clean-prompts"]["pool"] == "default_pool"


def test_adding_a_budget_and_exporting_again_adds_one_group(tmp_path):
    before = inspect(export(tmp_path / "before", "14,10,7,5"), tmp_path)["dags"][DAG_ID]
    after = inspect(export(tmp_path / "after", "14,10,7,5,4"), tmp_path)["dags"][DAG_ID]
    assert set(after) - set(before) == {"budget_4.budget-4-search-policy", "budget_4.budget-4-align-schedule"}
    assert set(before) <= set(after)
