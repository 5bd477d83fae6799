"""The Airflow DAG `make airflow` writes, loaded and run in a real Airflow (the `.venv-airflow` environment).

Airflow lives in its own virtual environment (`make test` builds it), so the DAG is exported with
the project's kedro-airflow and inspected (or run with `dag.test()`) by `inspect_dag.py` run with
Airflow's Python.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.reduced_project import TINY_BUDGETS, environment, tiny_project
from tests.run_records import ladder_files, run_record

pytestmark = pytest.mark.slow  # end to end: `make test-fast` leaves it out

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


KEDRO = Path(sys.executable).with_name("kedro")


def export(target: Path, budgets: str, project: Path = ROOT, *options: str) -> Path:
    """`kedro airflow create` as `make airflow` runs it (plus `options`), for the ladder `budgets`."""
    env = {**os.environ, "BUDCACHE_BUDGETS": budgets, "KEDRO_DISABLE_TELEMETRY": "true"}
    command = [str(KEDRO), "airflow", "create", "--group-by", "memory",
               "--jinja-file", "conf/airflow/budcache_dag.j2", "--target-dir", str(target), *options]
    subprocess.run(command, cwd=project, env=env, check=True, capture_output=True, text=True)
    return target


def inspect(folder: Path, tmp_path: Path, *options: str, env: dict[str, str] | None = None) -> dict:
    env = {**(env or os.environ), "AIRFLOW_HOME": str(tmp_path / "airflow-home"),
           "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "AIRFLOW__CORE__DAGS_FOLDER": str(folder)}
    result = subprocess.run(
        [str(AIRFLOW_PYTHON), str(INSPECT), str(folder), *options], env=env, capture_output=True, text=True
    )
    if result.returncode != 0:
        raise AssertionError(f"inspect_dag.py failed ({result.returncode})\n{result.stdout[-6000:]}\n{result.stderr[-6000:]}")
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


def test_dag_test_runs_the_tiny_environment_and_registers_what_kedro_run_registers(tiny_runs, tmp_path):
    sequential, _ = tiny_runs("flux")
    project = tiny_project(tmp_path / "project")
    env = {**environment(project, budgets=TINY_BUDGETS), "BUDCACHE_PROJECT_DIR": str(project), "BUDCACHE_KEDRO": str(KEDRO)}
    folder = export(tmp_path / "dags", TINY_BUDGETS, project, "--env", "tiny_flux")
    report = inspect(folder, tmp_path, "--test", DAG_ID, env=env)
    tasks = report["dags"][DAG_ID]
    assert report["states"] == {task: "success" for task in tasks}
    assert all("--env tiny_flux" in task["command"] for task in tasks.values())
    assert ladder_files(project, "tiny_flux") == ladder_files(sequential, "tiny_flux")
    assert run_record(project, "tiny_flux") == run_record(sequential, "tiny_flux")
