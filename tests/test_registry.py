import hashlib
import json
import logging
import os
import re
from pathlib import Path
from urllib.parse import urlparse

import pandas as pd
import pytest

mlflow = pytest.importorskip("mlflow")
from mlflow.tracking._tracking_service.utils import _use_tracking_uri  # noqa: E402

from budcache_pipeline import registry  # noqa: E402
from budcache_pipeline.console import main  # noqa: E402
from budcache_pipeline.policy import CachePolicy  # noqa: E402
from budcache_pipeline.registry import RegistryError  # noqa: E402
from tests.conftest import model_artifacts, move_compute_step, rewrite_checksums  # noqa: E402

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


def test_registering_leaves_the_process_mlflow_settings_as_they_were(uri, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    before = mlflow.get_tracking_uri()
    register(uri, {5: 0.2}, model="settings-check")
    assert "MLFLOW_TRACKING_URI" not in os.environ and "MLFLOW_REGISTRY_URI" not in os.environ
    assert mlflow.get_tracking_uri() == before
    elsewhere = "sqlite:////nonexistent/elsewhere.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", elsewhere)
    before = mlflow.get_tracking_uri()
    registry.register_ladder(ladder({5: 0.1}, "settings-check"), code_version="0.1.0", data_hash="md5:feed",
                             tracking_uri=uri)
    assert os.environ["MLFLOW_TRACKING_URI"] == elsewhere and mlflow.get_tracking_uri() == before
    assert "MLFLOW_REGISTRY_URI" not in os.environ


def test_registering_keeps_a_process_wide_uri_that_was_set(uri, monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    own = f"sqlite:///{tmp_path / 'own.db'}"
    with _use_tracking_uri(own):  # MLflow's own scoped form of `mlflow.set_tracking_uri(own)`
        register(uri, {5: 0.3}, model="settings-check")
        assert mlflow.get_tracking_uri() == own and os.environ.get("MLFLOW_TRACKING_URI") == own


def sha256_tree(directory: Path) -> dict[str, str]:
    return {
        p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in directory.rglob("*")
        if p.is_file()
    }


def digest_tags(tags: dict[str, str]) -> dict[str, str]:
    return {k.removeprefix("sha256."): v for k, v in tags.items() if k.startswith("sha256.")}


def use_registry(monkeypatch, uri) -> None:
    """Point the `budcache` command at `uri`; MLflow exports both variables whenever a URI is set."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)


def strip_digests(uri, registered) -> None:
    """Make a version look registered before the registry recorded file digests."""
    for key in client(uri).get_model_version(registered.name, registered.version).tags:
        if key.startswith(registry.DIGEST_TAG_PREFIX):
            client(uri).delete_model_version_tag(registered.name, registered.version, key)


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


def test_an_explicit_uri_is_also_the_registry(uri, baseline, tmp_path):
    elsewhere = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    registered = register(elsewhere, {5: 0.3}, model="elsewhere")
    assert client(elsewhere).get_registered_model(registered.name).name == registered.name
    with pytest.raises(mlflow.exceptions.MlflowException, match="not found"):
        client(uri).get_registered_model(registered.name)


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


def test_registration_records_every_file_digest_in_the_database_and_the_run(uri, baseline):
    registered, _ = baseline
    recorded = digest_tags(client(uri).get_model_version(registered.name, registered.version).tags)
    stored = sha256_tree(model_artifacts(uri, registered.name, registered.version))
    stored.pop("registered_model_meta", None)  # MLflow writes it into a local store when the model is loaded
    assert recorded == stored
    assert {"artifacts/ladder/SHA256SUMS", "artifacts/ladder/budget_10.json", "policy_ladder_model.py"} <= set(recorded)
    assert digest_tags(client(uri).get_run(registered.run_id).data.tags) == recorded


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
    with _use_tracking_uri(uri):  # a serving process names its store: registering left MLflow's own unset
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
    store = model_artifacts(uri, registered.name, registered.version) / "artifacts" / "ladder"
    assert sha256_tree(tmp_path) == sha256_tree(store)
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


def edit_policy_and_checksums(ladder_dir: Path) -> None:
    """The attack of issue 17: one compute step of budget_8.json moved, its SHA256SUMS line recomputed."""
    move_compute_step(ladder_dir / "budget_8.json")
    rewrite_checksums(ladder_dir)


def edit_policy_alone(ladder_dir: Path) -> None:
    move_compute_step(ladder_dir / "budget_8.json")


def add_listed_policy(ladder_dir: Path) -> None:
    """A budget the version never had, with a tempting held-out loss, listed in SHA256SUMS."""
    (ladder_dir / "budget_7.json").write_text(ladder({7: 0.001})[7].to_json())
    rewrite_checksums(ladder_dir)


def remove_listed_policy(ladder_dir: Path) -> None:
    (ladder_dir / "budget_5.json").unlink()
    rewrite_checksums(ladder_dir)


ATTACKS = {
    "policy and SHA256SUMS edited": (
        edit_policy_and_checksums,
        "modified: ['artifacts/ladder/SHA256SUMS', 'artifacts/ladder/budget_8.json']",
    ),
    "policy edited alone": (edit_policy_alone, "modified: ['artifacts/ladder/budget_8.json']"),
    "policy added and listed": (
        add_listed_policy,
        "modified: ['artifacts/ladder/SHA256SUMS']; added: ['artifacts/ladder/budget_7.json']",
    ),
    "policy removed and unlisted": (
        remove_listed_policy,
        "modified: ['artifacts/ladder/SHA256SUMS']; removed: ['artifacts/ladder/budget_5.json']",
    ),
}


@pytest.mark.parametrize(("attack", "differences"), list(ATTACKS.values()), ids=list(ATTACKS))
def test_pull_and_verify_refuse_a_version_altered_in_the_artifact_store(
    uri, tmp_path, monkeypatch, capsys, attack, differences
):
    registered = register(uri, {5: 0.3, 8: 0.2, 10: 0.1}, model=f"attack-{attack.__name__}")
    ladder_dir = model_artifacts(uri, registered.name, registered.version) / "artifacts" / "ladder"
    attack(ladder_dir)
    if "SHA256SUMS" in differences:
        registry.load_ladder(ladder_dir)  # the files agree with the SHA256SUMS beside them: only the database knows
    refusal = (
        f"version {registered.version} of '{registered.name}' failed verification: its files in the artifact store "
        f"do not match the sha256 digests in the registry database ({differences}): do not deploy it; restore the "
        "files from a trusted copy or register the ladder again"
    )
    use_registry(monkeypatch, uri)
    capsys.readouterr()
    out = tmp_path / "deployment"
    assert main(["pull", "--model", registered.name, "--alias", "candidate", "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"budcache pull: error: {refusal}\n"
    assert not out.exists(), "a refused pull writes nothing"
    with pytest.raises(RegistryError, match=re.escape(refusal)):
        registry.pull(registered.name, "candidate", out, allow_unverified=True, tracking_uri=uri)
    assert main(["verify", "--model", registered.name, "--version", registered.version]) == 1
    assert capsys.readouterr().out == f"FAILED: {refusal}\n"


def test_verify_refuses_altered_model_code(uri, tmp_path):
    registered = register(uri, {5: 0.3}, model="codeswap")
    code = model_artifacts(uri, registered.name, registered.version) / "policy_ladder_model.py"
    code.write_text(code.read_text() + "\nimport os  # whoever loads the pyfunc model runs this file\n")
    result = registry.verify(registered.name, alias="candidate", tracking_uri=uri)
    assert not result.ok and result.version == registered.version
    assert "(modified: ['policy_ladder_model.py'])" in result.message
    with pytest.raises(RegistryError, match=re.escape("(modified: ['policy_ladder_model.py'])")):
        registry.pull(registered.name, "candidate", tmp_path, tracking_uri=uri)


def test_verify_a_good_version_writes_nothing(uri, baseline, tmp_path, monkeypatch, capsys):
    registered, _ = baseline
    store = Path(uri.removeprefix("sqlite:///")).parent
    before = sha256_tree(store)
    monkeypatch.chdir(tmp_path)
    use_registry(monkeypatch, uri)
    assert main(["verify", "--model", registered.name]) == 0
    line = capsys.readouterr().out
    assert line == (
        f"OK: version {registered.version} of '{registered.name}' (alias production): 9 files match the sha256 "
        f"digests in the registry database; policies for budgets [5, 10, 14] pass the schema and fingerprint "
        f"({FINGERPRINT}) checks\n"
    )
    by_version = registry.verify(registered.name, version=registered.version, tracking_uri=uri)
    assert by_version.ok and by_version.message.startswith(f"version {registered.version} of '{registered.name}': ")
    assert sha256_tree(store) == before and not list(tmp_path.iterdir())


def test_verify_of_nothing_fails_without_creating_a_database(uri, tmp_path, monkeypatch, capsys):
    missing = registry.verify("budcache-nothing-20steps", tracking_uri=uri)
    assert not missing.ok and missing.message.startswith("no registered model named 'budcache-nothing-20steps'")
    use_registry(monkeypatch, f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert main(["verify", "--model", "budcache-digits-20steps", "--alias", "candidate"]) == 1
    assert capsys.readouterr().out.startswith(f"FAILED: no registry database at {tmp_path / 'mlflow.db'}")
    assert not (tmp_path / "mlflow.db").exists()


def test_a_version_without_digests_is_refused_unless_allowed_and_logged(uri, tmp_path, caplog):
    registered = register(uri, {5: 0.3, 10: 0.1}, model="legacy")
    strip_digests(uri, registered)
    label = f"version {registered.version} of '{registered.name}'"
    with pytest.raises(
        RegistryError,
        match=re.escape(
            f"{label} has no file digests in the registry database (it was registered before budcache recorded "
            "them), so tampering with its artifacts cannot be detected: re-register its ladder "
            "(`kedro run --pipelines register`) and promote the new version, or pass --allow-unverified"
        ),
    ):
        registry.pull(registered.name, "candidate", tmp_path / "refused", tracking_uri=uri)
    assert not (tmp_path / "refused").exists()
    assert not registry.verify(registered.name, alias="candidate", tracking_uri=uri).ok

    with caplog.at_level(logging.WARNING, logger="budcache_pipeline.registry"):
        paths = registry.pull(
            registered.name, "candidate", tmp_path / "accepted", allow_unverified=True, tracking_uri=uri
        )
    assert [p.name for p in paths] == ["budget_5.json", "budget_10.json"]
    assert f"{label} has no file digests in the registry database: accepted unverified" in caplog.text

    ladder_dir = model_artifacts(uri, registered.name, registered.version) / "artifacts" / "ladder"
    move_compute_step(ladder_dir / "budget_10.json")
    with pytest.raises(RegistryError, match="budget_10.json does not match its sha256 in SHA256SUMS"):
        registry.pull(registered.name, "candidate", tmp_path / "edited", allow_unverified=True, tracking_uri=uri)
    rewrite_checksums(ladder_dir)
    accepted = registry.pull(
        registered.name, "candidate", tmp_path / "attacked", allow_unverified=True, tracking_uri=uri
    )
    assert accepted, "the flag's risk: without digests, an edit with its SHA256SUMS line gets through (logged)"


def test_promoting_a_re_registered_ladder_over_a_legacy_production(uri):
    legacy = register(uri, {5: 0.3, 10: 0.1}, model="reregister")
    strip_digests(uri, legacy)
    with pytest.raises(RegistryError, match="has no file digests"):
        registry.promote(legacy.name, legacy.version, tracking_uri=uri)
    assert registry.promote(legacy.name, legacy.version, allow_unverified=True, tracking_uri=uri).promoted
    again = register(uri, {5: 0.3, 10: 0.1}, model="reregister")
    with pytest.raises(RegistryError, match=f"version {legacy.version} of '{legacy.name}' has no file digests"):
        registry.promote(again.name, again.version, force=True, reason="re-registered with digests", tracking_uri=uri)
    reason = "re-registered with digests"
    result = registry.promote(
        again.name, again.version, force=True, reason=reason, allow_unverified=True, tracking_uri=uri
    )
    assert result.promoted and result.comparison["verdict"].tolist() == ["equal", "equal"]
    assert registry.verify(again.name, tracking_uri=uri).ok


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


PLANTED = {
    "a pickle": ("artifacts/ladder/policy.pkl", b"\x80\x04\x95\x00\x00\x00\x00\x00\x00\x00\x00."),
    "python code": ("artifacts/ladder/sitecustomize.py", b"import os\nos.system('echo owned')\n"),
}


@pytest.mark.parametrize(("relative", "content"), list(PLANTED.values()), ids=list(PLANTED))
def test_a_pickle_or_python_file_planted_in_a_registered_version_is_refused_unread(uri, tmp_path, relative, content):
    registered = register(uri, {5: 0.3}, model=f"planted-{Path(relative).suffix[1:]}")
    planted = model_artifacts(uri, registered.name, registered.version) / relative
    planted.write_bytes(content)
    with pytest.raises(RegistryError, match=re.escape(f"added: ['{relative}']")):
        registry.pull(registered.name, "candidate", tmp_path / "out", tracking_uri=uri)
    assert not (tmp_path / "out").exists()
    result = registry.verify(registered.name, version=registered.version, tracking_uri=uri)
    assert not result.ok and f"added: ['{relative}']" in result.message
    # Even a version accepted unverified never copies nor loads anything but listed policy JSON files.
    ladder_dir = planted.parent
    with pytest.raises(RegistryError, match="not listed"):
        registry.load_ladder(_with_file(ladder_dir, tmp_path / "copy", "budget_9.json", b"{}"))


def _with_file(source: Path, target: Path, name: str, content: bytes) -> Path:
    import shutil

    shutil.copytree(source, target)
    (target / name).write_bytes(content)
    return target


def test_a_symbolic_link_in_a_registered_version_or_a_ladder_is_refused(uri, tmp_path):
    registered = register(uri, {5: 0.3}, model="symlinked")
    ladder_dir = model_artifacts(uri, registered.name, registered.version) / "artifacts" / "ladder"
    (ladder_dir / "budget_5.json").unlink()
    (ladder_dir / "budget_5.json").symlink_to("/dev/zero")
    result = registry.verify(registered.name, version=registered.version, tracking_uri=uri)
    assert not result.ok
    with pytest.raises(RegistryError, match="symbolic link"):
        registry.load_ladder(ladder_dir)


def test_pulled_files_cannot_escape_the_output_folder(tmp_path):
    ladder_dir = tmp_path / "ladder"
    registry.write_ladder(ladder({5: 0.3}), ladder_dir)
    for name in ("../budget_5.json", "/tmp/budget_5.json", "sub/budget_5.json"):
        (ladder_dir / "SHA256SUMS").write_text(f"{'0' * 64}  {name}\n")
        with pytest.raises(RegistryError, match="is not '<sha256>  budget_<B>.json'"):
            registry.load_ladder(ladder_dir)
