"""Budgets side by side: `kedro run --runner ThreadRunner` registers what the sequential run registers.

The budget namespaces only meet at the reference (before) and the evaluation (after), so Kedro's
ThreadRunner runs their searches and alignments at once; each worker thread loads its own model
(the catalog's `model`, a `pipelines.common.ModelHandle`). Compared with the session's sequential run of the same copy
(`tiny_runs`): the policies byte for byte, and the MLflow run's parameters, metrics and artifacts,
leaving out only what measures time.
"""

from __future__ import annotations

import pytest

from tests.reduced_project import TINY_BUDGETS, environment, kedro, tiny_project
from tests.run_records import ladder_files, run_record

pytestmark = pytest.mark.slow  # end to end: `make test-fast` leaves it out


def test_the_thread_runner_registers_the_sequential_ladder_and_run(tiny_runs, tmp_path):
    sequential, _ = tiny_runs("flux")
    threaded = tiny_project(tmp_path / "project")
    env = {**environment(threaded, budgets=TINY_BUDGETS), "COLUMNS": "400"}
    result = kedro(threaded, "run", "--env", "tiny_flux", "--runner", "ThreadRunner", env=env)
    log = " ".join((result.stdout + result.stderr).split())
    first_search_done = log.index("Completed node: budget_")
    assert log[:first_search_done].count("Running node: search_policy") == 2, "both budgets searched at once"
    assert ladder_files(threaded, "tiny_flux") == ladder_files(sequential, "tiny_flux")
    assert run_record(threaded, "tiny_flux") == run_record(sequential, "tiny_flux")
