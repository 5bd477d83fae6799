"""The deployment example: pull the production ladder, pick, check against the model, enable, generate."""

import json
import re

import pytest
import torch
from PIL import Image

from budcache_pipeline import deploy
from budcache_pipeline.caching import disable_budcache, enable_budcache, get_runtime
from budcache_pipeline.deploy import DeploymentError, check_policy, deploy_and_generate, generate, main
from budcache_pipeline.models.adapter import Size
from budcache_pipeline.models.spec import load_adapter
from budcache_pipeline.policy import load_policy
from budcache_pipeline.registry import RegistryError, promote, register_ladder
from tests.conftest import model_artifacts, move_compute_step, rewrite_checksums
from tests.reduced_project import environment

STEPS = 10
SIZE = Size(16, 16)
MODEL = {"adapter": "digits", "steps": STEPS}


@pytest.fixture(scope="module")
def production(reduced_run):
    """The reduced run's registered ladder, promoted to production (a first promotion always passes)."""
    registration = json.loads((reduced_run / "data" / "08_reporting" / "registration.json").read_text())
    uri = environment(reduced_run)["MLFLOW_TRACKING_URI"]
    promote(registration["registered_model"], registration["version"], tracking_uri=uri)
    return registration["registered_model"], uri


@pytest.fixture(scope="module")
def adapter():
    return load_adapter(MODEL)


def test_deploy_pulls_picks_the_best_fitting_policy_and_generates(production, tmp_path):
    name, uri = production
    path = deploy_and_generate(name, 4, "a handwritten three", tmp_path, tracking_uri=uri, model=MODEL)
    assert path.name.endswith("_budget3_seed0.png")
    assert Image.open(path).size == (16, 16)
    pulled = sorted(p.name for p in (tmp_path / "policies").iterdir())
    assert pulled == ["SHA256SUMS", "budget_3.json", "budget_5.json"]


def test_deploy_refuses_a_ladder_for_another_step_count(production, tmp_path):
    name, uri = production
    with pytest.raises(RegistryError, match="steps"):
        deploy_and_generate(name, 5, "a handwritten five", tmp_path, tracking_uri=uri, model={**MODEL, "steps": 28})
    assert not (tmp_path / "policies").exists()


def test_deploy_refuses_a_ladder_searched_on_another_model(production, tmp_path):
    name, uri = production
    with pytest.raises(RegistryError, match="fingerprint"):
        deploy_and_generate(
            name, 5, "a", tmp_path, tracking_uri=uri, model={"adapter": "flux", "weights": "tiny", "steps": STEPS}
        )


def test_deploy_refuses_an_alias_that_does_not_exist(production, tmp_path):
    name, uri = production
    with pytest.raises(RegistryError, match="no alias 'canary'"):
        deploy_and_generate(name, 5, "a", tmp_path, alias="canary", tracking_uri=uri, model=MODEL)


def test_deploy_refuses_a_production_ladder_altered_in_the_artifact_store(reduced_run, tmp_path, monkeypatch):
    """Issue 17's attack on the deployment job: a policy and its SHA256SUMS line rewritten in the store."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.setenv(key, uri)  # MLflow exports the URIs it is given: restore the reduced run's afterwards
    policies = [load_policy(p) for p in sorted((reduced_run / "data" / "06_models" / "policies").glob("budget_*.json"))]
    registered = register_ladder(
        {p.budget: p for p in policies}, code_version="test", data_hash="md5:test", tracking_uri=uri
    )
    promote(registered.name, registered.version, tracking_uri=uri)
    ladder_dir = model_artifacts(uri, registered.name, registered.version) / "artifacts" / "ladder"
    move_compute_step(ladder_dir / "budget_5.json")
    rewrite_checksums(ladder_dir)
    refusal = (
        f"version {registered.version} of '{registered.name}' failed verification: its files in the artifact store "
        "do not match the sha256 digests in the registry database "
        "(modified: ['artifacts/ladder/SHA256SUMS', 'artifacts/ladder/budget_5.json'])"
    )
    with pytest.raises(RegistryError, match=re.escape(refusal)):
        deploy_and_generate(registered.name, 5, "a", tmp_path / "out", tracking_uri=uri, model=MODEL)
    assert not (tmp_path / "out" / "policies").exists()


def test_check_policy_refuses_a_schedule_the_scheduler_cannot_run(reduced_run, adapter):
    policy = load_policy(reduced_run / "data" / "06_models" / "policies" / "budget_5.json")
    plan = check_policy(adapter, policy, STEPS, SIZE)
    assert plan.schedule_kwargs["sigmas"] is not None and not plan.aligned_schedule
    assert list(policy.sigmas) == pytest.approx(adapter.default_sigmas(STEPS, SIZE))
    stretched = type(policy)(
        policy.mask, policy.model_name, policy.model_fingerprint, sigmas=[2.0 - 0.2 * i for i in range(STEPS)] + [0.0]
    )
    with pytest.raises(DeploymentError, match="cannot be run by this pipeline's scheduler"):
        check_policy(adapter, stretched, STEPS, SIZE)
    with pytest.raises(DeploymentError, match="this job runs 28"):
        check_policy(adapter, policy, 28, SIZE)


def test_generate_matches_the_same_policy_enabled_by_hand(reduced_run, adapter):
    policy = load_policy(reduced_run / "data" / "06_models" / "policies" / "budget_3.json")
    plan = check_policy(adapter, policy, STEPS, SIZE)
    images = generate(adapter, plan, ["a handwritten eight"], seed=3)
    assert get_runtime(adapter.pipe) is None
    enable_budcache(adapter.pipe, policy)
    try:
        expected = adapter.pipe(
            "a handwritten eight",
            **plan.schedule_kwargs,
            generator=torch.Generator().manual_seed(3),
            output_type="pt",
        ).images
    finally:
        disable_budcache(adapter.pipe)
    assert torch.equal(images, expected)


def test_module_entry_point_prints_the_image_path(production, tmp_path, capsys, monkeypatch):
    name, uri = production
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    config = tmp_path / "model.yml"
    config.write_text(json.dumps({"model": MODEL}))
    assert main([name, "5", "a handwritten five", str(tmp_path), "--model-config", str(config)]) == 0
    assert capsys.readouterr().out.strip().endswith("_budget5_seed0.png")


def test_allow_unverified_reaches_the_verified_download(production, tmp_path, monkeypatch):
    name, uri = production
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    seen = []
    real_pull = deploy.pull
    monkeypatch.setattr(deploy, "pull", lambda *a, **k: seen.append(k["allow_unverified"]) or real_pull(*a, **k))
    config = tmp_path / "model.yml"
    config.write_text(json.dumps({"model": MODEL}))
    for extra in ([], ["--allow-unverified"]):
        out = str(tmp_path / f"out{len(extra)}")
        assert main([name, "5", "a handwritten five", out, "--model-config", str(config), *extra]) == 0
    assert seen == [False, True]


def test_a_policy_searched_on_other_weights_is_refused_unless_allowed(caplog):
    from budcache_pipeline.policy import CachePolicy, model_fingerprint

    tiny = load_adapter({"adapter": "flux", "weights": "tiny", "device": "cpu"})
    size, steps = tiny.tiny_size, 6
    policy = CachePolicy(
        mask=[True, False, True, False, True, False],
        model_name="tiny-flux",
        model_fingerprint=model_fingerprint(tiny.transformer),
        sigmas=tiny.default_sigmas(steps, size),
        model_weights="0123456789abcdef",
    )
    with pytest.raises(DeploymentError, match="fused LoRA.*--allow-other-weights"):
        check_policy(tiny, policy, steps, size)
    with caplog.at_level("WARNING"):
        plan = check_policy(tiny, policy, steps, size, allow_other_weights=True)
    assert plan.policy == policy and "other weights (allowed)" in caplog.text
