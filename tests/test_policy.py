"""Policy files are the deployment contract: byte-stable and strict about what they accept."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from budcache_pipeline import CachePolicy, PolicyError, load_policy, model_fingerprint
from budcache_pipeline.forecast_gains import ForecastGains
from budcache_pipeline.policy import policy_schema, uniform_mask, weights_digest
from tests.conftest import tiny_flux_pipeline, tiny_sd3_transformer

SIGMAS = [1.0, 0.75, 0.5, 0.25, 0.0]
GAINS = ForecastGains(((1.0, 1.0), (0.5, 1.25), (1.0, 1.0), (2.0, 0.0)), ((1.0, 1.0), (0.0, 3.0), (1.0, 1.0), (1.5, 1.0)))


def valid() -> dict:
    policy = CachePolicy(
        mask=(True, False, True, False),
        model_name="tiny",
        model_fingerprint="abc",
        sigmas=SIGMAS,
        provenance={"scores": {"holdout_mse": 0.1234567891234}},
    )
    return json.loads(policy.to_json())


def write(tmp_path, data) -> str:
    path = tmp_path / "policy.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_json_round_trip_is_byte_stable(tmp_path):
    policy = CachePolicy.from_dict(valid())
    path = policy.save(tmp_path / "p.json")
    again = load_policy(path)
    assert again == policy
    assert again.to_json() == path.read_text()
    assert again.budget == 2 and again.steps == 4 and again.compute_steps == [0, 2]


def test_shipped_json_schema_accepts_a_saved_policy():
    jsonschema.validate(valid(), policy_schema())


def test_linear_forecast_round_trips_and_matches_the_schema(tmp_path):
    policy = CachePolicy.from_dict({**valid(), "forecast": "linear"})
    assert policy.forecast == "linear"
    again = load_policy(policy.save(tmp_path / "p.json"))
    assert again == policy and again.to_json() == policy.to_json()
    jsonschema.validate(json.loads(policy.to_json()), policy_schema())


def test_forecast_gains_make_a_version_3_policy_that_round_trips_and_matches_the_schema(tmp_path):
    policy = CachePolicy.from_dict({**valid(), "forecast": "linear"})
    gained = CachePolicy(policy.mask, "tiny", "abc", SIGMAS, forecast="linear", forecast_gains=GAINS)
    assert policy.schema_version == 2 and gained.schema_version == 3, "only a policy with gains needs version 3"
    again = load_policy(gained.save(tmp_path / "p.json"))
    assert again == gained and again.forecast_gains == GAINS and again.to_json() == gained.to_json()
    jsonschema.validate(json.loads(gained.to_json()), policy_schema())
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**json.loads(policy.to_json()), "forecast_gains": GAINS.to_dict()}, policy_schema())
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**json.loads(gained.to_json()), "forecast_gains": None}, policy_schema())


def test_version_1_files_still_load_as_reuse_and_round_trip_unchanged(tmp_path):
    old = {key: value for key, value in valid().items() if key != "forecast"} | {"schema_version": 1}
    jsonschema.validate(old, policy_schema())
    policy = load_policy(write(tmp_path, old))
    assert policy.forecast == "reuse" and policy.schema_version == 1
    assert json.loads(policy.to_json()) == old
    with pytest.raises(PolicyError, match="for schema version 1"):
        CachePolicy(mask=(True,), model_name="m", model_fingerprint="f", schema_version=1, forecast="linear")


def test_uniform_mask_spreads_the_budget_and_includes_step_zero():
    mask = uniform_mask(28, 7)
    assert sum(mask) == 7 and mask[0]
    assert [i for i, m in enumerate(mask) if m] == [0, 4, 8, 12, 16, 20, 24]
    with pytest.raises(PolicyError, match="budget must be between 1 and steps=28"):
        uniform_mask(28, 0)


def mutate(**changes):
    data = valid()
    for key, value in changes.items():
        if value is KeyError:
            del data[key]
        else:
            data[key] = value
    return data


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (mutate(schema_version=4), "'schema_version' is 4, this version of budcache reads \\[1, 2, 3\\]"),
        (mutate(schema_version=3), "missing field\\(s\\) \\['forecast_gains'\\]"),
        (mutate(forecast_gains=GAINS.to_dict()), "unknown field\\(s\\) \\['forecast_gains'\\] for schema version 2"),
        (mutate(schema_version=3, forecast_gains=None), "'forecast_gains': forecast gains must be an object"),
        (mutate(schema_version=3, forecast_gains={"residual": GAINS.to_dict()["residual"]}),
         "exactly the keys \\['residual', 'slope'\\]"),
        (mutate(schema_version=3, forecast_gains={**GAINS.to_dict(), "slope": [[1.0]] * 3}),
         "'residual' has 4 rows and 'slope' 3"),
        (mutate(schema_version=3, forecast_gains=ForecastGains.identity(3, 2).to_dict()),
         "'forecast_gains' has 3 rows but 'steps' is 4"),
        (mutate(schema_version=3, forecast_gains={**GAINS.to_dict(), "slope": [[1.0, 1.0]] * 3 + [[1.0]]}),
         "'slope' rows have different lengths \\[1, 2\\]"),
        (mutate(schema_version=3, forecast_gains={**GAINS.to_dict(), "residual": [[1.0, True]] * 4}),
         "'residual' row 0 must be a non-empty list of numbers"),
        (mutate(forecast="quadratic"), "'forecast' is 'quadratic': use one of \\['reuse', 'linear'\\]"),
        (mutate(forecast=KeyError), "missing field\\(s\\) \\['forecast'\\]"),
        (mutate(schema_version=1), "unknown field\\(s\\) \\['forecast'\\] for schema version 1"),
        (mutate(mask=[True, False, True]), "'mask' has 3 entries but 'steps' is 4"),
        (mutate(budget=3), "'budget' is 3 but 'mask' has 2 compute steps: set budget to the count of true"),
        (mutate(mask=[False, True, True, False]), "caches step 0.*set mask\\[0\\] to true"),
        (mutate(sigmas=[1.0, 0.5, 0.75, 0.25, 0.0]), "'sigmas' must be strictly decreasing"),
        (mutate(sigmas=[1.0, 0.75, 0.5, 0.25, 0.1]), "'sigmas' must end at 0"),
        (mutate(sigmas=[1.0, 0.75, 0.5, 0.0]), "'sigmas' has 4 values, expected steps \\+ 1 = 5"),
        (mutate(sigmas=KeyError), "missing field\\(s\\) \\['sigmas'\\]"),
        (mutate(extra=1), "unknown field\\(s\\) \\['extra'\\]"),
        (mutate(steps="4"), "'steps' must be an integer, got str"),
        (mutate(mask=[1, 0, 1, 0]), "'mask' must be a non-empty list of true/false"),
        (mutate(model={"name": "tiny"}), "'model' must have the keys \\['fingerprint', 'name'\\]"),
        (mutate(model={"name": "t", "fingerprint": "f", "weights": "w"}), "optionally \\['weights_digest'\\]"),
        (mutate(model={"name": "t", "fingerprint": "f", "weights_digest": 3}), "'model.weights_digest' must be a string"),
        (mutate(provenance=[]), "'provenance' must be an object"),
        ([1, 2], "policy must be a JSON object"),
    ],
)
def test_load_policy_rejects_bad_files_naming_the_field(tmp_path, data, message):
    with pytest.raises(PolicyError, match=message):
        load_policy(write(tmp_path, data))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "policy is not valid JSON"),
        (json.dumps(valid()).replace("0.75", "NaN"), "non-finite number NaN"),
        (json.dumps(valid()).replace("0.75", "Infinity"), "non-finite number Infinity"),
    ],
)
def test_load_policy_rejects_non_json_and_non_finite_numbers(tmp_path, text, message):
    with pytest.raises(PolicyError, match=message):
        load_policy(write(tmp_path, text))


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(PolicyError, match="does not exist"):
        load_policy(tmp_path / "nope.json")


def test_non_finite_provenance_cannot_be_saved():
    with pytest.raises(PolicyError, match="non-finite number nan"):
        CachePolicy(mask=(True,), model_name="m", model_fingerprint="f", provenance={"loss": float("nan")})


def test_load_policy_refuses_another_architecture_and_warns_on_other_weights(tmp_path):
    transformer = tiny_flux_pipeline().transformer
    policy = CachePolicy(
        mask=[True, False, True, False],
        model_name="tiny",
        model_fingerprint=model_fingerprint(transformer),
        model_weights=weights_digest(transformer),
    )
    path = policy.save(tmp_path / "policy.json")
    assert load_policy(path, transformer) == policy
    with pytest.raises(PolicyError, match="fingerprint"):
        load_policy(path, tiny_sd3_transformer())
    with torch.no_grad():
        transformer.proj_out.weight.mul_(1.01)
    with pytest.warns(UserWarning, match="fine-tune or a fused LoRA"):
        load_policy(path, transformer)


def test_policy_size_and_nesting_are_bounded_before_parsing(tmp_path):
    from budcache_pipeline.policy import MAX_POLICY_CHARS, MAX_POLICY_DEPTH

    valid = CachePolicy.uniform(10, 4, "m", "f")
    huge = valid.to_json().replace('"provenance": {}', f'"provenance": {{"pad": "{"x" * MAX_POLICY_CHARS}"}}')
    with pytest.raises(PolicyError, match="over the 1,000,000 a policy may have"):
        CachePolicy.from_json(huge)
    deep = valid.to_json().replace('"provenance": {}', '"provenance": ' + "[" * 100_000 + "]" * 100_000)
    with pytest.raises(PolicyError, match=f"nests 100001 levels deep, over the {MAX_POLICY_DEPTH}"):
        CachePolicy.from_json(deep)
    quoted = {"note": '[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[ \\" {{{{{{{{{{{{{{{{{{{{{{{{'}
    assert CachePolicy.from_json(valid.with_provenance(**quoted).to_json()).provenance == quoted
    binary = tmp_path / "budget_4.json"
    binary.write_bytes(b"\x80\x04\x95 a pickle, not JSON")
    with pytest.raises(PolicyError, match="not UTF-8 text"):
        load_policy(binary)


def test_a_constructed_policy_with_wrong_types_raises_policy_error():
    for mask in ([None], 5, [1, 0], []):
        with pytest.raises(PolicyError, match="mask"):
            CachePolicy(mask=mask, model_name="m", model_fingerprint="f")
    with pytest.raises(PolicyError, match="sigmas"):
        CachePolicy(mask=[True, False], model_name="m", model_fingerprint="f", sigmas=[1.0, {"a": 1}, 0.0])
