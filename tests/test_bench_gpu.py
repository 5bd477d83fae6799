"""`budcache bench gpu` end to end on tiny_flux on this CPU, and the inputs it refuses."""

from __future__ import annotations

import json
import math
import re
import sys

import pandas as pd
import pytest
import yaml

from budcache_pipeline.bench_gpu import CPU_NOTE, BenchGpuError, check_environment
from budcache_pipeline.known_models import FLUX_1_DEV
from budcache_pipeline.console import main
from tests.reduced_project import TINY_BUDGETS, copy_project, environment, run, tiny_project

HEADER = ["budget", "s/image", "speedup", "ideal", "peak GPU mem", "search CPU-min", "rollouts", "held-out MSE",
          "best baseline", "baseline MSE", "MSE ratio"]


def _bench(project, out, *extra):
    env = environment(project, budgets=TINY_BUDGETS)
    command = [sys.executable, "-m", "budcache_pipeline.console", "bench", "gpu", "--env", "tiny_flux",
               "--project", str(project), "--json", str(out), *extra]
    result = run(project, *command, env=env)
    return result.stdout, json.loads(out.read_text())


@pytest.fixture(scope="module")
def benched(tmp_path_factory):
    """The bench run twice on one tiny_flux copy: running the project, then reading its outputs (--reuse)."""
    root = tmp_path_factory.mktemp("bench_gpu")
    project = tiny_project(root / "project")
    fresh = _bench(project, root / "fresh.json")
    reused = _bench(project, root / "reused.json", "--reuse", "--images", "1")
    return project, fresh, reused


@pytest.mark.slow
def test_the_table_says_it_ran_on_cpu_and_has_every_column(benched):
    _, (stdout, result), _ = benched
    assert f"NOTE: {CPU_NOTE}." in stdout
    lines = stdout.splitlines()
    header = next(k for k, line in enumerate(lines) if line.split()[:2] == ["budget", "s/image"])
    assert re.split(r"\s{2,}", lines[header].strip()) == HEADER
    budgets = sorted((int(b) for b in TINY_BUDGETS.split(",")), reverse=True)
    rows = lines[header + 1: header + 2 + len(budgets)]
    assert rows[0].split()[0] == "none"
    assert [r.split()[0] for r in rows[1:]] == [f"{b}/{result['steps']}" for b in budgets]
    assert all("n/a (CPU)" in r for r in rows)
    assert "cost model, FLUX.1-dev" in stdout and "measured on an H200" in stdout
    assert result["cuda"] is False and result["device"] == "cpu"


@pytest.mark.slow
def test_figures_come_from_the_run_and_the_hooks(benched):
    project, (_, result), _ = benched
    data = project / "data" / "tiny_flux"
    table = pd.read_csv(data / "08_reporting" / "metrics.csv")
    for row in result["rows"]:
        budget = row["budget"]
        assert row["computed_steps"] == budget  # counted by the cache hooks on the stock pipeline
        assert row["s_per_image"] > 0 and row["speedup"] == pytest.approx(
            result["uncached"]["s_per_image"] / row["s_per_image"]
        )
        summary = json.loads((data / "07_model_output" / "search" / f"budget_{budget}_summary.json").read_text())
        assert row["search_minutes"] == pytest.approx(summary["cost"]["wall_seconds"] / 60)
        assert row["search_rollouts"] == pytest.approx(summary["cost"]["block_stack_calls"] / summary["steps"])
        at_budget = table[table["budget"] == budget]
        own = at_budget[at_budget["method"] == row["method"]].iloc[0]
        assert row["holdout_mse"] == pytest.approx(own["latent_mse"])
        baselines = at_budget[~at_budget["method"].isin(["uncached", "budcache", "budcache_aligned"])]
        assert row["baseline_mse"] == pytest.approx(baselines["latent_mse"].min())
        assert row["best_baseline"] == baselines.sort_values("latent_mse").iloc[0]["method"]
    assert result["uncached"]["per_call_seconds"] > 0
    prediction = result["flux_dev_prediction"]
    assert prediction["per_call_seconds"] == FLUX_1_DEV.per_call_seconds
    assert prediction["per_call_source"].startswith("measured on an H200")
    one, eight = prediction["by_gpus"]["1"], prediction["by_gpus"]["8"]
    assert eight["search_wall_minutes"] == pytest.approx(one["search_wall_minutes"] / 8)


@pytest.mark.slow
def test_reuse_reads_the_same_outputs_without_running(benched):
    _, (_, fresh), (stdout, reused) = benched
    assert reused["reused"] is True and reused["run_seconds"] is None and fresh["run_seconds"] > 0
    assert "running the project" not in stdout and reused["images_timed"] == 1
    for a, b in zip(fresh["rows"], reused["rows"]):
        assert (a["budget"], a["holdout_mse"], a["search_minutes"]) == (b["budget"], b["holdout_mse"], b["search_minutes"])
        assert math.isfinite(b["s_per_image"])


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)


def test_unknown_environment_is_refused_with_the_known_ones(tmp_path, capsys, no_cuda):
    project = copy_project(tmp_path / "project")
    assert main(["bench", "gpu", "--env", "tiny_fluxx", "--project", str(project)]) == 2
    error = capsys.readouterr().err
    assert "unknown environment 'tiny_fluxx'" in error and "tiny_flux" in error


def test_a_real_model_environment_is_refused_on_cpu(tmp_path, capsys, no_cuda):
    project = copy_project(tmp_path / "project")
    (project / "conf" / "gpu_flux").mkdir()
    with pytest.raises(BenchGpuError, match="no CUDA device here"):
        check_environment(project, "gpu_flux", cuda=False)
    check_environment(project, "gpu_flux", cuda=True)
    model = {"model": {"adapter": "flux", "weights": "/models/FLUX.1-dev", "name": "flux-dev"}}
    (project / "conf" / "local" / "parameters.yml").write_text(yaml.safe_dump(model))
    assert main(["bench", "gpu", "--project", str(project), "--reuse"]) == 2
    assert "no CUDA device here" in capsys.readouterr().err


def test_reuse_without_a_run_says_what_to_run(tmp_path, capsys, no_cuda):
    project = copy_project(tmp_path / "project")
    assert main(["bench", "gpu", "--env", "tiny_flux", "--project", str(project), "--reuse"]) == 2
    assert "kedro run --env tiny_flux" in capsys.readouterr().err


def test_bad_numbers_and_folders_are_refused(tmp_path, capsys, no_cuda):
    with pytest.raises(SystemExit):
        main(["bench", "gpu", "--env", "tiny_flux", "--images", "0"])
    assert "must be at least 1" in capsys.readouterr().err
    assert main(["bench", "gpu", "--env", "tiny_flux", "--project", str(tmp_path)]) == 2
    assert "not a Kedro project" in capsys.readouterr().err
