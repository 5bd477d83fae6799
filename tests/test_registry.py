import json
from pathlib import Path
from urllib.parse import urlparse

import pandas as pd
import pytest

mlflow = pytest.importorskip("mlflow")

from budcache_pipeline import registry  # noqa: E402
from budcache_pipeline.policy import CachePolicy  # noqa: E402
from budcache_pipeline.registry import RegistryError  # noqa: E402

STEPS = 20
FINGERPRINT = "0123456789abcdef"


def ladder(losses: dict[int, float], model: str = "digits", fingerprint: str = FINGERPRINT) -> dict[int, CachePolicy]:
    return {
        budget: CachePolicy.uniform(STEPS, budget, model, fingerprint).with_provenance(scores={"holdout_mse": loss})
        for budget, loss in losses.items()
    }


@pytest.fixture(scope="module")
def uri(tmp_path_factory):
    """One sqlite registry for the module: MLflow's database setup is the slow part."""
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        patch.delenv("MLFLOW_REGISTRY_URI", raising=False)
        patch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        yield f"sqlite:///{tmp_path_factory.mktemp('registry') / 'mlflow.db'}"


@pytest.fixture(scope="module")
def baseline(uri):
    """A registered ladder `digits` at 20 steps, promoted to production."""
    policies = ladder({5: 0.30, 10: 0.10, 14: 0.05})
    run_id = registry.log_run({"search": {"iterations": 200}}, {"holdout_mse": 0.1}, policies=policies, tracking_uri=uri)
    registered = registry.register_ladder(
        policies, code_version="0.1.0+gabc", data_hash="md5:feed", run_id=run_id, tracking_uri=uri
    )
    assert registry.promote(registered.name, registered.version, tracking_uri=uri).promoted
    return registered, policies


def register(uri, losses, model="digits", fingerprint=FINGERPRINT):
    return registry.register_ladder(
        ladder(losses, model, fingerprint), code_version="0.1.0", data_hash="md5:feed", tracking_uri=uri
    )


def client(uri):
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def test_registered_model_is_named_after_model_and_steps():
    assert registry.registered_model_name("FLUX.1 dev", 28) == "budcache-flux.1-dev-28steps"


def test_default_tracking_uri_is_sqlite_at_the_project_root(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "pyproject.toml").write_text("[tool.kedro]\npackage_name = 'x'\n")
    (tmp_path / "conf").mkdir()
    monkeypatch.chdir(tmp_path / "conf")
    assert registry.resolve_tracking_uri() == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    assert registry.resolve_tracking_uri() == "http://mlflow.internal:5000"


def test_log_run_records_params_metrics_artifacts_and_policies(uri, tmp_path):
    plot = tmp_path / "pareto.png"
    plot.write_bytes(b"\x89PNG fake")
    run_id = registry.log_run(
        {"search": {"iterations": 200, "budgets": [5, 10]}},
        {"holdout_mse.budget_5": 0.3},
        artifacts=[plot],
        policies=ladder({5: 0.3}),
        tracking_uri=uri,
    )
    run = client(uri).get_run(run_id)
    assert run.data.params == {"search.iterations": "200", "search.budgets": "[5, 10]"}
    assert run.data.metrics == {"holdout_mse.budget_5": 0.3}
    assert run.info.status == "FINISHED"
    listed = {a.path for a in client(uri).list_artifacts(run_id)} | {
        a.path for a in client(uri).list_artifacts(run_id, "policies")
    }
    assert {"pareto.png", "policies/budget_5.json", "policies/SHA256SUMS"} <= listed
    database = Path(uri.removeprefix("sqlite:///"))
    assert (database.parent / "mlartifacts" / "budcache" / run_id / "artifacts" / "pareto.png").is_file()


def test_registration_tags_the_version_and_sets_candidate(uri):
    """A model of its own: other tests register `digits` versions, and each moves `candidate`."""
    registered = registry.register_ladder(
        ladder({5: 0.30, 10: 0.10}, model="tagged"), code_version="0.1.0+gabc", data_hash="md5:feed", tracking_uri=uri
    )
    version = client(uri).get_model_version(registered.name, registered.version)
    assert registered.name == "budcache-tagged-20steps"
    assert version.tags["code_version"] == "0.1.0+gabc"
    assert version.tags["dvc_data_hash"] == "md5:feed"
    assert version.tags["model_fingerprint"] == FINGERPRINT
    assert version.tags["holdout_mse.budget_10"] == "0.1"
    assert client(uri).get_model_version_by_alias(registered.name, "candidate").version == int(registered.version)


def test_registered_model_is_code_and_json_without_pickle(uri, baseline, tmp_path):
    registered, _ = baseline
    source = client(uri).get_model_version_download_uri(registered.name, registered.version)
    files = sorted(p.relative_to(urlparse(source).path).as_posix() for p in Path(urlparse(source).path).rglob("*"))
    assert "policy_ladder_model.py" in files
    assert "artifacts/ladder/SHA256SUMS" in files
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".cloudpickle"))]
    assert "model_code_path" in (Path(urlparse(source).path) / "MLmodel").read_text()


def test_pyfunc_predict_serves_the_best_policy_that_fits(uri, baseline):
    registered, _ = baseline
    model = mlflow.pyfunc.load_model(f"models:/{registered.name}/{registered.version}")
    assert json.loads(model.predict(12))["budget"] == 10
    assert json.loads(model.predict(14))["budget"] == 14
    assert [json.loads(t)["budget"] for t in model.predict(pd.DataFrame({"budget": [5, 9, 20]}))] == [5, 5, 14]
    with pytest.raises(ValueError, match="no policy fits a budget of 4"):
        model.predict(4)


def test_pull_round_trip_is_byte_identical(uri, baseline, tmp_path):
    registered, policies = baseline
    (tmp_path / "budget_99.json").write_text("stale")
    paths = registry.pull(
        registered.name, "production", tmp_path, expect_fingerprint=FINGERPRINT, expect_steps=STEPS, tracking_uri=uri
    )
    assert [p.name for p in paths] == ["budget_5.json", "budget_10.json", "budget_14.json"]
    for path in paths:
        assert path.read_bytes() == policies[int(path.stem.split("_")[1])].to_json().encode()
    assert not (tmp_path / "budget_99.json").exists()
    assert registry.load_ladder(tmp_path) == policies


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"expect_fingerprint": "ffffffffffffffff"}, "searched on model fingerprint 0123456789abcdef, not ffff"),
        ({"expect_steps": 28}, "has 20 steps, the model runs 28: pull 'budcache-digits-28steps'"),
    ],
)
def test_pull_refuses_another_model(uri, baseline, tmp_path, kwargs, match):
    registered, _ = baseline
    with pytest.raises(RegistryError, match=match):
        registry.pull(registered.name, "production", tmp_path / "out", tracking_uri=uri, **kwargs)
    assert not (tmp_path / "out").exists(), "a refused pull writes nothing"


def test_pull_refuses_a_tampered_policy(uri, tmp_path):
    registered = register(uri, {5: 0.3, 10: 0.1}, model="tampered")
    source = Path(urlparse(client(uri).get_model_version_download_uri(registered.name, registered.version)).path)
    policy_file = source / "artifacts" / "ladder" / "budget_10.json"
    policy_file.write_text(policy_file.read_text().replace("false", "true", 1))
    with pytest.raises(RegistryError, match="budget_10.json does not match its sha256"):
        registry.pull(registered.name, "candidate", tmp_path, tracking_uri=uri)


def test_pull_of_a_missing_alias_says_what_to_do(uri, tmp_path):
    registered = register(uri, {5: 0.3}, model="unpromoted")
    with pytest.raises(RegistryError, match="has no alias 'production': promote a version first"):
        registry.pull(registered.name, "production", tmp_path, tracking_uri=uri)
    with pytest.raises(RegistryError, match="no registered model named 'budcache-nothing-20steps'"):
        registry.pull("budcache-nothing-20steps", "production", tmp_path, tracking_uri=uri)


def test_promotion_gate_refuses_a_worse_version_and_shows_why(uri, baseline):
    registered, _ = baseline
    worse = register(uri, {5: 0.35, 10: 0.05, 7: 0.2})
    result = registry.promote(worse.name, worse.version, tracking_uri=uri)
    assert not result.promoted
    assert client(uri).get_model_version_by_alias(worse.name, "production").version == int(registered.version)
    verdicts = dict(zip(result.comparison["budget"], result.comparison["verdict"]))
    assert verdicts == {5: "worse", 7: "new budget", 10: "better", 14: "dropped"}
    report = registry.format_promotion(result)
    assert report.startswith("REFUSED") and "not lower at budget(s) [5]" in report and "0.35" in report


def test_promotion_gate_promotes_a_better_version_and_force_is_recorded(uri):
    first = register(uri, {5: 0.3, 10: 0.1}, model="gate")
    assert registry.promote(first.name, first.version, tracking_uri=uri).previous_version is None
    better = register(uri, {5: 0.2, 10: 0.09}, model="gate")
    result = registry.promote(better.name, better.version, tracking_uri=uri)
    assert result.promoted and result.previous_version == first.version
    assert result.comparison["verdict"].tolist() == ["better", "better"]

    worse = register(uri, {5: 0.25, 10: 0.2}, model="gate")
    with pytest.raises(RegistryError, match="needs a reason"):
        registry.promote(worse.name, worse.version, force=True, tracking_uri=uri)
    forced = registry.promote(worse.name, worse.version, force=True, reason="rollback test", tracking_uri=uri)
    assert forced.promoted and forced.forced
    assert registry.format_promotion(forced).startswith("PROMOTED: forced promotion")
    version = client(uri).get_model_version(worse.name, worse.version)
    assert version.tags["promotion_forced"] == "true"
    assert version.tags["promotion_reason"] == "rollback test"
    assert client(uri).get_model_version_by_alias(worse.name, "production").version == int(worse.version)


def test_promotion_refuses_a_ladder_of_another_model(uri):
    first = register(uri, {5: 0.3}, model="refit")
    registry.promote(first.name, first.version, tracking_uri=uri)
    other = register(uri, {5: 0.01}, model="refit", fingerprint="ffffffffffffffff")
    result = registry.promote(other.name, other.version, tracking_uri=uri)
    assert not result.promoted and "fingerprints differ" in result.message


def test_register_refuses_an_unscored_or_mixed_ladder(uri):
    unscored = {5: CachePolicy.uniform(STEPS, 5, "digits", FINGERPRINT)}
    with pytest.raises(RegistryError, match="no finite provenance\\['scores'\\]\\['holdout_mse'\\]"):
        registry.register_ladder(unscored, code_version="x", data_hash="y", tracking_uri=uri)
    mixed = {**ladder({5: 0.3}), **ladder({10: 0.1}, fingerprint="ffffffffffffffff")}
    with pytest.raises(RegistryError, match="mixes models or step counts"):
        registry.register_ladder(mixed, code_version="x", data_hash="y", tracking_uri=uri)
    with pytest.raises(RegistryError, match="ladder key 7 holds a policy with budget 5"):
        registry.register_ladder({7: ladder({5: 0.3})[5]}, code_version="x", data_hash="y", tracking_uri=uri)


def test_pick_policy_takes_the_best_that_fits():
    policies = ladder({5: 0.30, 7: 0.12, 10: 0.15, 14: 0.05})
    assert registry.pick_policy(policies, 12).budget == 7, "budget 10 fits but scored worse than 7"
    assert registry.pick_policy(list(policies.values()), 100).budget == 14
    unscored = [CachePolicy.uniform(STEPS, b, "digits", FINGERPRINT) for b in (5, 10)]
    assert registry.pick_policy(unscored, 12).budget == 10
    with pytest.raises(RegistryError, match="smallest budget available is 5"):
        registry.pick_policy(policies, 3)


def test_load_ladder_refuses_unlisted_and_renamed_files(tmp_path):
    registry.write_ladder(ladder({5: 0.3, 10: 0.1}), tmp_path)
    (tmp_path / "budget_7.json").write_text("{}")
    with pytest.raises(RegistryError, match=r"\['budget_7.json'\] .* not listed"):
        registry.load_ladder(tmp_path)
    (tmp_path / "budget_7.json").unlink()
    (tmp_path / "SHA256SUMS").unlink()
    with pytest.raises(RegistryError, match="SHA256SUMS is missing"):
        registry.load_ladder(tmp_path)


def test_code_version_names_the_package_version():
    assert registry.code_version().startswith("0.1.0")
