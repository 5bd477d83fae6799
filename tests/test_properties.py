"""Property-based tests (hypothesis): every generated input either loads and round-trips, or raises the module's own error.

Thousands of inputs per property in all: policies (mutations of a valid one and arbitrary JSON),
prompt files (txt, csv, jsonl with arbitrary text), and masks with budgets.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from budcache_pipeline.policy import CachePolicy, PolicyError, uniform_mask
from budcache_pipeline.prompts import PromptFileError, ingest_prompts

VALID = CachePolicy.uniform(10, 4, "digits", "0123456789abcdef").with_provenance(scores={"holdout_mse": 0.5})
FIELDS = ["schema_version", "mask", "budget", "steps", "sigmas", "model", "provenance", "forecast"]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=10), children, max_size=6),
    max_leaves=30,
)


def _round_trips(text: str) -> None:
    try:
        policy = CachePolicy.from_json(text)
    except PolicyError:
        return
    again = CachePolicy.from_json(policy.to_json())
    assert again == policy and again.to_json() == policy.to_json()


@settings(max_examples=1500, deadline=None)
@given(field=st.sampled_from(FIELDS), value=json_values)
def test_a_policy_with_any_field_replaced_loads_and_round_trips_or_raises_policy_error(field, value):
    data = VALID.to_dict()
    data[field] = value
    _round_trips(json.dumps(data))


@settings(max_examples=800, deadline=None)
@given(field=st.sampled_from(["name", "fingerprint", "weights_digest", "extra"]), value=json_values)
def test_a_policy_with_any_model_entry_replaced_loads_or_raises_policy_error(field, value):
    data = VALID.to_dict()
    data["model"][field] = value
    _round_trips(json.dumps(data))


@settings(max_examples=800, deadline=None)
@given(text=st.text(max_size=200) | json_values.map(json.dumps))
def test_any_text_is_a_policy_or_a_policy_error(text):
    _round_trips(text)


@settings(max_examples=1000, deadline=None)
@given(mask=st.lists(st.booleans() | st.integers(-2, 2) | st.none(), max_size=40), budget=st.integers(-3, 45))
def test_masks_and_budgets_are_valid_policies_or_policy_errors(mask, budget):
    try:
        policy = CachePolicy(mask=mask, model_name="m", model_fingerprint="f")
    except PolicyError:
        pass
    else:
        assert all(isinstance(m, bool) for m in policy.mask) and policy.mask[0] and policy.budget == sum(policy.mask)
    steps = len(mask)
    try:
        uniform = uniform_mask(steps, budget)
    except PolicyError:
        assert not 1 <= budget <= steps
    else:
        assert len(uniform) == steps and sum(uniform) == budget and uniform[0]


lines = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    suffix=st.sampled_from([".txt", ".csv", ".jsonl"]),
    rows=st.lists(lines | json_values.map(json.dumps), max_size=12),
    header=st.sampled_from(["prompt", "prompt,seed", "prompt,seed,category", "text"]),
)
def test_any_prompt_file_ingests_into_two_disjoint_splits_or_raises_prompt_file_error(suffix, rows, header):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "data" / f"prompts{suffix}"
        path.parent.mkdir()
        body = "\n".join(rows)
        path.write_text(f"{header}\n{body}" if suffix == ".csv" else body, encoding="utf-8")
        try:
            calibration, holdout, summary = ingest_prompts(path)
        except PromptFileError:
            return
        assert len(calibration) and len(holdout)
        assert not set(calibration["prompt"]) & set(holdout["prompt"])
        assert summary["source"] == path.name
