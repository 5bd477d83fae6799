"""A copy of the project with a reduced configuration, and the commands that run it.

The copy keeps the checkout untouched: data, the MLflow database and DVC's cache all
live in a temporary folder. The package itself is imported from the installed
(editable) source, so the copy's `src/` only serves as DVC's code dependencies.
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

PROJECT = Path(__file__).resolve().parents[1]
COPIED = ("pyproject.toml", "conf", "data", "src", "notebooks", "dvc.yaml", ".dvc", ".dvcignore")
IGNORED = shutil.ignore_patterns("__pycache__", "*.egg-info", "cache", "tmp", "credentials*")
BUDGETS = "5,3"
PROMPTS = 16

REDUCED: dict[str, dict[str, Any]] = {
    "model": {"steps": 10},
    "reference": {"batch_size": 8},
    "search": {
        "calibration_size": 6,
        "starts": ["dp", "uniform"],
        "sa_iterations": 8,
        "hc_rounds": 2,
        "dp_samples": 2,
    },
    "align": {"iterations": 2, "calibration_size": 4},
    "evaluate": {
        "baselines": ["uniform", "teacache"],
        "calibration_size": 4,
        "max_calibration_evaluations": 4,
        "timing_images": 1,
        "grid_images": 4,
    },
}
"""Parameters that make a full run take seconds: 10 steps, budgets 5 and 3 (3/10 is aligned), few iterations."""


def copy_project(destination: Path) -> Path:
    """The project's files (no generated data, no MLflow database, no DVC cache) under `destination`."""
    destination.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        source = PROJECT / name
        if source.is_dir():
            shutil.copytree(source, destination / name, ignore=IGNORED)
        elif source.exists():
            shutil.copy2(source, destination / name)
    for generated in (destination / "data").iterdir():
        for item in generated.iterdir():
            if item.name != ".gitkeep" and not (generated.name == "01_raw" and item.name == "prompts.csv"):
                shutil.rmtree(item) if item.is_dir() else item.unlink()
    (destination / "dvc.lock").unlink(missing_ok=True)
    return destination


def reduce_configuration(project: Path, prompts: int = PROMPTS, overrides: dict[str, dict[str, Any]] = REDUCED) -> None:
    """Keep the first `prompts` prompts and apply `overrides` to conf/base/parameters_<section>.yml
    (the model block lives in parameters.yml)."""
    raw = project / "data" / "01_raw" / "prompts.csv"
    with raw.open(newline="") as handle:
        rows = list(csv.reader(handle))
    with raw.open("w", newline="") as handle:
        csv.writer(handle).writerows(rows[: prompts + 1])
    for section, values in overrides.items():
        name = "parameters.yml" if section == "model" else f"parameters_{section}.yml"
        path = project / "conf" / "base" / name
        params = yaml.safe_load(path.read_text())
        params[section].update(values)
        path.write_text(yaml.safe_dump(params, sort_keys=False))


def reduced_project(destination: Path) -> Path:
    """A copy of the project configured by `REDUCED`."""
    project = copy_project(destination)
    reduce_configuration(project)
    return project


def environment(project: Path, budgets: str = BUDGETS) -> dict[str, str]:
    """Offline, telemetry off, a registry inside the copy, the reduced budgets, the venv's tools first on PATH."""
    env = dict(os.environ)
    env.update(
        KEDRO_DISABLE_TELEMETRY="true",
        DO_NOT_TRACK="1",
        HF_HUB_OFFLINE="1",
        MLFLOW_TRACKING_URI=f"sqlite:///{project / 'mlflow.db'}",
        BUDCACHE_BUDGETS=budgets,
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
    )
    env.pop("MLFLOW_REGISTRY_URI", None)
    return env


def run(
    project: Path, *command: str, env: dict[str, str] | None = None, check: bool = True
) -> subprocess.CompletedProcess:
    """Run a command (e.g. `kedro run`) in the copy; on failure the error carries its output."""
    result = subprocess.run(
        list(command), cwd=project, env=env or environment(project), capture_output=True, text=True
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(command)} failed ({result.returncode})\n--- stdout\n{result.stdout[-6000:]}\n"
            f"--- stderr\n{result.stderr[-6000:]}"
        )
    return result


def kedro(
    project: Path, *args: str, env: dict[str, str] | None = None, check: bool = True
) -> subprocess.CompletedProcess:
    return run(project, str(Path(sys.executable).parent / "kedro"), *args, env=env, check=check)


TINY_BUDGETS = "7,3"
TINY_PROMPTS = 16


def tiny_project(destination: Path) -> Path:
    """A copy for `kedro run --env tiny_<adapter>`: the first `TINY_PROMPTS` prompts, the environment's settings."""
    project = copy_project(destination)
    reduce_configuration(project, prompts=TINY_PROMPTS, overrides={})
    return project
