"""The notebooks run top to bottom on a project's outputs (the reduced run's)."""

import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from tests.reduced_project import PROJECT, environment

pytestmark = pytest.mark.slow  # end to end: `make test-fast` leaves it out

NOTEBOOKS = PROJECT / "notebooks"


def execute(notebook: str, project: Path, monkeypatch) -> nbformat.NotebookNode:
    """Run a notebook of the checkout as if it sat in `project/notebooks` (the kernel inherits the env)."""
    for key, value in environment(project).items():
        monkeypatch.setenv(key, value)
    nb = nbformat.read(NOTEBOOKS / notebook, as_version=4)
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(project / "notebooks")}}
    ).execute()
    return nb


def outputs(nb: nbformat.NotebookNode, kind: str) -> list:
    return [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs if kind in o.get("data", {})]


def text(nb: nbformat.NotebookNode) -> str:
    return "".join(o.get("text", "") for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs)


@pytest.mark.parametrize("notebook", sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")))
def test_notebooks_are_committed_without_outputs(notebook):
    nb = nbformat.read(NOTEBOOKS / notebook, as_version=4)
    nbformat.validate(nb)
    assert all(not cell.get("outputs") for cell in nb.cells if cell.cell_type == "code")


def test_pareto_and_masks_notebook_shows_both_plots(reduced_run, monkeypatch):
    nb = execute("pareto_and_masks.ipynb", reduced_run, monkeypatch)
    assert len(outputs(nb, "image/png")) == 2
    assert "budgets: [5, 3]" in text(nb)


def test_deploy_notebook_serves_the_production_policy(reduced_run, monkeypatch):
    nb = execute("deploy_production_policy.ipynb", reduced_run, monkeypatch)
    served = re.search(r"served B=(\d+) for a request of 7", text(nb))
    assert served and int(served.group(1)) in (5, 3)
    assert len(outputs(nb, "image/png")) == 1
    deployed = reduced_run / "data" / "07_model_output" / "deployment"
    assert list(deployed.glob(f"*_budget{served.group(1)}_seed0.png"))
