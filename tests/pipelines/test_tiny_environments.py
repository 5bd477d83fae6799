"""`kedro run --env tiny_<adapter>`: the whole project, ingest to register, on tiny models of the real classes.

Each run registers a ladder whose policies carry that model's fingerprint and weights digest;
they are refused for another model, and the deployment job pulls the ladder and runs the stock
pipeline with it.
"""

from __future__ import annotations

import json

import pytest
from PIL import Image

from budcache_pipeline.deploy import deploy_and_generate
from budcache_pipeline.models.spec import load_adapter
from budcache_pipeline.policy import PolicyError, load_policy, model_fingerprint, weights_digest
from budcache_pipeline.registry import promote
from tests.reduced_project import TINY_BUDGETS

pytestmark = pytest.mark.slow  # end to end: `make test-fast` leaves it out

SIZES = {"flux": {"height": 16, "width": 16}, "wan": {"height": 32, "width": 32, "num_frames": 5},
         "sd3": {"height": 16, "width": 16}}


@pytest.fixture(scope="module", params=sorted(SIZES))
def tiny_run(request, tiny_runs):
    name = request.param
    return name, *tiny_runs(name)


def model_block(name: str) -> dict:
    return {"adapter": name, "weights": "tiny", "device": "cpu", "steps": 28, **SIZES[name]}


def test_the_tiny_run_registers_a_ladder_for_that_model(tiny_run):
    name, project, _ = tiny_run
    data = project / "data" / f"tiny_{name}"
    registration = json.loads((data / "08_reporting" / "registration.json").read_text())
    assert registration["registered_model"] == f"budcache-tiny-{name}-28steps"
    adapter = load_adapter(model_block(name))
    for budget in map(int, TINY_BUDGETS.split(",")):
        policy = load_policy(data / "06_models" / "policies" / f"budget_{budget}.json", adapter.transformer)
        assert policy.budget == budget and policy.steps == 28
        assert policy.model_fingerprint == model_fingerprint(adapter.transformer)
        assert policy.model_weights == weights_digest(adapter.transformer)
    assert not any((project / "data" / "06_models" / "policies").glob("*.json")), "outputs stay in the env's folder"
    other = load_adapter(model_block("sd3" if name != "sd3" else "flux"))
    with pytest.raises(PolicyError, match="fingerprint"):
        load_policy(data / "06_models" / "policies" / "budget_7.json", other.transformer)


def test_the_deployment_job_pulls_the_tiny_ladder_and_runs_the_stock_pipeline(tiny_run, tmp_path):
    name, project, env = tiny_run
    registration = json.loads((project / "data" / f"tiny_{name}" / "08_reporting" / "registration.json").read_text())
    uri = env["MLFLOW_TRACKING_URI"]
    promote(registration["registered_model"], registration["version"], tracking_uri=uri)
    path = deploy_and_generate(
        registration["registered_model"], 5, "a lighthouse", tmp_path, tracking_uri=uri, model=model_block(name)
    )
    assert path.name.endswith("_budget3_seed0.png")
    width = SIZES[name]["width"] * SIZES[name].get("num_frames", 1)
    assert Image.open(path).size == (width, SIZES[name]["height"])
