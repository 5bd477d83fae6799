"""The whole product on a reduced configuration: `kedro run`, pipeline order, `dvc repro`.

`dvc repro` runs each stage's `kedro run --pipelines <name>` (one budget's namespace for `search@B`
and `align@B`), so its test also shows that every pipeline runs on its own once those before it have.

`reduced_run` (tests/conftest.py) is the project after one full `kedro run` with two
budgets (5 and 3 of 10 steps) in a temporary copy with its own sqlite registry.
"""

import json
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from click.testing import CliRunner
from kedro.framework.cli.cli import KedroCLI
from mlflow import MlflowClient
from mlflow.artifacts import download_artifacts

from budcache_pipeline.pipeline_registry import BUDGETS_ENV, configured_budgets, register_pipelines
from budcache_pipeline.policy import load_policy
from budcache_pipeline.registry import CANDIDATE_ALIAS
from tests.reduced_project import copy_project, environment, reduce_configuration, run

BUDGETS = (5, 3)
STEPS = 10


def flat(text: str) -> str:
    """Kedro's rich console wraps long messages: compare text with whitespace collapsed."""
    return " ".join(text.split())


def client_for(project: Path) -> MlflowClient:
    uri = environment(project)["MLFLOW_TRACKING_URI"]
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def test_pipelines_hold_one_namespaced_search_and_align_per_budget(monkeypatch):
    monkeypatch.setenv(BUDGETS_ENV, "3,7")
    pipelines = register_pipelines()
    assert {"ingest", "reference", "search", "align", "evaluate", "register", "__default__"} <= set(pipelines)
    assert {n.name for n in pipelines["search"].nodes} == {"budget_7.search_policy", "budget_3.search_policy"}
    assert {"budget_7.policy", "budget_3.policy"} <= pipelines["search"].all_outputs()
    assert {"budget_7.aligned_policy", "budget_3.alignment_report@json"} <= pipelines["align"].all_outputs()
    assert {"budget_7.final_policy", "metrics_table", "metrics_summary@json"} <= pipelines["evaluate"].all_outputs()
    union = set().union(*(pipelines[name].nodes for name in pipelines if name != "__default__"))
    assert set(pipelines["__default__"].nodes) == union
    assert pipelines["__default__"].inputs() == {"raw_prompts", "model"} | {
        i for i in pipelines["__default__"].inputs() if i.startswith("params:") or i == "parameters"
    }
    assert "params:model" not in pipelines["__default__"].inputs(), "nodes take the model, not its parameters"


def test_budget_override_is_checked(monkeypatch):
    monkeypatch.setenv(BUDGETS_ENV, "5,x")
    with pytest.raises(ValueError, match="comma-separated integers"):
        configured_budgets()
    monkeypatch.setenv(BUDGETS_ENV, "5,5")
    with pytest.raises(ValueError, match="repeated"):
        configured_budgets()


def test_full_run_writes_a_scored_ladder_tables_metrics_and_plots(reduced_run):
    data = reduced_run / "data"
    for budget in BUDGETS:
        policy = load_policy(data / "06_models" / "policies" / f"budget_{budget}.json")
        assert (policy.budget, policy.steps) == (budget, STEPS)
        scores = policy.provenance["scores"]
        assert scores["holdout_mse"] >= 0 and scores["calibration_mse"] >= 0
        assert policy.provenance["search"]["calibration_pairs"] == 6
        history = pd.read_parquet(data / "07_model_output" / "search" / f"budget_{budget}_history.parquet")
        assert set(history["start"]) == {"dp", "uniform"}
        assert (data / "08_reporting" / "plots" / "convergence" / f"budget_{budget}.png").is_file()
        assert (data / "08_reporting" / "plots" / "samples" / f"budget_{budget}.png").is_file()

    table = pd.read_parquet(data / "08_reporting" / "metrics.parquet")
    csv = pd.read_csv(data / "08_reporting" / "metrics.csv")
    pd.testing.assert_frame_equal(
        table.drop(columns="settings"), csv.drop(columns="settings"), check_dtype=False, atol=1e-12
    )
    for budget in BUDGETS:
        methods = set(table.loc[table["budget"] == budget, "method"])
        assert {"budcache", "uniform", "teacache"} <= methods
    uniform = table[table["method"] == "uniform"]
    assert (uniform["compute_steps_mean"] == uniform["budget"]).all()

    metrics = json.loads((data / "08_reporting" / "metrics.json").read_text())
    for budget in BUDGETS:
        assert metrics[f"budget_{budget}"]["budcache"]["latent_mse"] is not None
        assert "gain_over_best_baseline" in metrics[f"budget_{budget}"]["policy"]
    headline = {f.stem: json.loads(f.read_text()) for f in (data / "08_reporting" / "headline").glob("*.json")}
    assert len(headline) == len(table)  # one file, so one `dvc metrics show` row, per (budget, method)
    for row in table.itertuples():
        entry = headline[f"budget_{row.budget:02d}-{row.method}"]
        assert entry["latent_mse_x1e6"] == pytest.approx(row.latent_mse * 1e6)
        assert entry["compute_steps"] == pytest.approx(row.compute_steps_mean)
    for budget in BUDGETS:
        policy = "budcache_aligned" if f"budget_{budget:02d}-budcache_aligned" in headline else "budcache"
        assert 0 < headline[f"budget_{budget:02d}-{policy}"]["mse_vs_best_baseline"]
    for plot in ("pareto.png", "mask_map.png", "forecast_gains.png"):
        assert (data / "08_reporting" / "plots" / plot).stat().st_size > 1000


def test_alignment_is_tried_only_under_the_budget_fraction(reduced_run):
    reports = {
        b: json.loads((reduced_run / "data" / "07_model_output" / "align" / f"budget_{b}.json").read_text())
        for b in BUDGETS
    }
    assert not reports[5]["attempted"] and "max_budget_fraction" in reports[5]["reason"]
    assert reports[3]["attempted"]
    final = load_policy(reduced_run / "data" / "06_models" / "policies" / "budget_3.json")
    assert ("alignment" in final.provenance) == reports[3]["accepted"]
    assert reports[3]["cost"]["forward_rollouts"] == 2 + 3, "2 iterations, then 3 scoring rollouts"
    assert (final.forecast_gains is not None) == (reports[3]["accepted"] and reports[3]["gain_channels"] == 64)


def test_register_logs_one_run_and_a_candidate_version_with_lineage_tags(reduced_run):
    registration = json.loads((reduced_run / "data" / "08_reporting" / "registration.json").read_text())
    client = client_for(reduced_run)
    name = registration["registered_model"]
    assert name == f"budcache-digits-{STEPS}steps"
    version = client.get_model_version_by_alias(name, CANDIDATE_ALIAS)
    assert str(version.version) == registration["version"]
    policy = load_policy(reduced_run / "data" / "06_models" / "policies" / "budget_5.json")
    assert version.tags["model_fingerprint"] == policy.model_fingerprint
    assert version.tags["dvc_data_hash"] == registration["dvc_data_hash"]
    assert version.tags["code_version"] == registration["code_version"]
    provenance = json.loads((reduced_run / "data" / "08_reporting" / "provenance.json").read_text())
    assert (provenance["code_version"], provenance["data"]["hash"], provenance["model_fingerprint"]) == (
        registration["code_version"], registration["dvc_data_hash"], registration["model_fingerprint"])
    assert set(provenance["data"]["paths"]) == {"data/01_raw/prompts.csv", "data/03_primary/reference"}
    assert version.tags["budgets"] == "3,5"

    run = client.get_run(registration["run_id"])
    assert run.data.params["search.sa_iterations"] == "8"
    assert run.data.params["budgets"] == "5,3"
    assert "budget_3.budcache.latent_mse" in run.data.metrics
    assert "search.budget_5.evaluations" in run.data.metrics
    assert run.data.metrics["search.budget_5.calibration_rollouts"] > 0
    logged = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"plots", "policies", "metrics.csv", "metrics.json"} <= logged
    assert {a.path for a in client.list_artifacts(run.info.run_id, "policies")} >= {
        "policies/budget_5.json",
        "policies/budget_3.json",
        "policies/SHA256SUMS",
    }


@pytest.fixture(scope="module")
def fresh_project(tmp_path_factory):
    """A copy on which nothing has run yet."""
    project = copy_project(tmp_path_factory.mktemp("fresh") / "project")
    reduce_configuration(project)
    return project


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Option '--pipeline' is deprecated")
@pytest.mark.parametrize("flag", ["--pipelines", "--pipeline"])
def test_search_before_reference_says_what_to_run_first(fresh_project, flag, monkeypatch):
    """The `kedro` command, invoked in-process: a new interpreter per flag would only add start-up time."""
    for key, value in environment(fresh_project).items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(fresh_project)
    result = CliRunner().invoke(KedroCLI(project_path=fresh_project), ["run", flag, "search"])
    assert result.exit_code != 0
    assert "run `kedro run --pipelines reference` first" in str(result.exception)


def _set_ladder(project: Path, budgets: tuple[int, ...]) -> None:
    """Edit `settings.BUDGETS` in the copy, as a user adds a budget (DVC reads the ladder from there)."""
    settings = project / "src" / "budcache_pipeline" / "settings.py"
    text = settings.read_text()
    start = text.index("BUDGETS: list[int] = [")
    end = text.index("]", start + len("BUDGETS: list[int] = [")) + 1
    settings.write_text(text[:start] + f"BUDGETS: list[int] = {list(budgets)}" + text[end:])


def _timed(project: Path, *command: str, env: dict[str, str]) -> tuple[str, float]:
    started = time.perf_counter()
    out = run(project, *command, env=env).stdout
    return out, time.perf_counter() - started


@pytest.mark.slow
def test_dvc_repro_runs_one_stage_per_budget_then_nothing_and_a_new_budget_runs_alone(tmp_path):
    project = copy_project(tmp_path / "project")
    reduce_configuration(project)
    _set_ladder(project, BUDGETS)
    env = {**environment(project, budgets=""), "DVC_NO_ANALYTICS": "1"}
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    for command in (["git", "init", "-q"], ["git", "add", "-A"], [*git, "commit", "-qm", "project"]):
        subprocess.run(command, cwd=project, check=True, capture_output=True)
    dvc = str(Path(env["PATH"].split(":")[0]) / "dvc")

    first = run(project, dvc, "repro", env=env).stdout
    stages = ("ingest", "reference", "search@5", "search@3", "align@5", "align@3", "evaluate", "register")
    assert all(f"Running stage '{stage}'" in first for stage in stages)
    registration = json.loads((project / "data" / "08_reporting" / "registration.json").read_text())
    assert registration["data_source"] == "dvc.lock"
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert set(lock["stages"]) == set(stages)
    shown = run(project, dvc, "metrics", "show", env=env).stdout.strip().splitlines()
    print("\n".join(shown))
    assert set(shown[0].split()) == {"Path", "compute_steps", "fid", "latent_mse_x1e6", "mse_vs_best_baseline", "speedup"}
    rows = {line.split()[0]: line.split()[1:] for line in shown[1:]}
    assert "data/08_reporting/headline/budget_10-uncached.json" in rows
    assert {f"data/08_reporting/headline/budget_0{b}-uniform.json" for b in BUDGETS} <= rows.keys()

    second, no_op_seconds = _timed(project, dvc, "repro", env=env)
    assert "Running stage" not in second
    assert all(f"Stage '{stage}' didn't change" in second for stage in stages)
    print(f"unchanged dvc repro: {no_op_seconds:.1f} s")

    _set_ladder(project, (5, 4, 3))
    third, added_seconds = _timed(project, dvc, "repro", env=env)
    ran = {stage for stage in (*stages, "search@4", "align@4") if f"Running stage '{stage}'" in third}
    assert ran == {"search@4", "align@4", "evaluate", "register"}, third
    policies = sorted(p.name for p in (project / "data" / "06_models" / "policies").glob("budget_*.json"))
    assert policies == ["budget_3.json", "budget_4.json", "budget_5.json"]
    print(f"dvc repro after adding budget 4: {added_seconds:.1f} s")

    parameters = project / "conf" / "base" / "parameters_search.yml"
    params = yaml.safe_load(parameters.read_text())
    params["search"]["sa_iterations"] += 1
    parameters.write_text(yaml.safe_dump(params, sort_keys=False))
    planned = run(project, dvc, "repro", "--dry", env=env).stdout
    assert all(f"Running stage 'search@{b}'" in planned for b in (5, 4, 3))
    assert all(f"Stage '{stage}' didn't change" in planned for stage in ("ingest", "reference"))
    status = run(project, dvc, "status", env=env).stdout
    assert "search.sa_iterations" in status and "reference:" not in status


def test_register_takes_plots_tables_and_calibrations_from_the_catalog_and_runs_after_their_writers(monkeypatch):
    monkeypatch.setenv(BUDGETS_ENV, "5,3")
    pipelines = register_pipelines()
    files = {"pareto_plot", "mask_map_plot", "forecast_gains_plot", "convergence_plots", "sample_grid_plots"}
    files |= {"metrics_table_csv@file", "baseline_calibrations@file", "metrics_summary@file", "ingest_summary@file"}
    files |= {"reference_summary@file", "budget_3.search_history@file", "budget_5.search_summary@file"}
    files |= {"budget_3.alignment_report@file"}
    assert files <= pipelines["register"].inputs()
    order = [node.name for node in pipelines["__default__"].nodes]
    writers = ("evaluate_ladder", "plot_pareto", "plot_mask_map", "plot_forecast_gains", "plot_convergence",
               "plot_sample_grids",
               "summarise_metrics", "summarise_references", "clean_prompts", "budget_3.search_policy",
               "budget_5.align_schedule", "record_provenance")
    assert all(order.index(writer) < order.index("register_ladder") for writer in writers)
    register = next(node for node in pipelines["register"].nodes if node.name == "register_ladder")
    assert "provenance" in register.inputs and not any("params:" in i for i in register.inputs)


def test_the_run_logs_the_plots_tables_and_calibrations_the_pipeline_wrote(reduced_run, tmp_path):
    registration = json.loads((reduced_run / "data" / "08_reporting" / "registration.json").read_text())
    uri = environment(reduced_run)["MLFLOW_TRACKING_URI"]
    logged = Path(download_artifacts(run_id=registration["run_id"], dst_path=str(tmp_path), tracking_uri=uri))
    plots = reduced_run / "data" / "08_reporting" / "plots"
    data = reduced_run / "data"
    written = {
        **{f"plots/{p.relative_to(plots).as_posix()}": p for p in plots.rglob("*.png")},
        "metrics.csv": data / "08_reporting" / "metrics.csv",
        "baseline_calibrations.json": data / "07_model_output" / "baseline_calibrations.json",
        "metrics.json": data / "08_reporting" / "metrics.json",
        "ingest_summary.json": data / "08_reporting" / "ingest_summary.json",
        "reference_summary.json": data / "03_primary" / "reference" / "reference_summary.json",
        **{f"search/{p.name}": p for p in (data / "07_model_output" / "search").iterdir()},
        **{f"align/{p.name}": p for p in (data / "07_model_output" / "align").iterdir()},
    }
    assert {"search/budget_5_summary.json", "search/budget_3_history.parquet", "align/budget_3.json"} <= set(written)
    assert {"plots/pareto.png", "plots/mask_map.png", "plots/forecast_gains.png",
            "plots/convergence/budget_5.png"} <= set(written)
    for folder in ("plots", "search", "align"):
        uploaded = {p.relative_to(logged).as_posix() for p in (logged / folder).rglob("*") if p.is_file()}
        assert uploaded == {name for name in written if name.startswith(f"{folder}/")}
    for name, path in written.items():
        assert (logged / name).read_bytes() == path.read_bytes(), name
