"""Cache policies: which steps of a sampler compute the transformer's block stack.

A policy is the product's unit of deployment: it is searched offline, registered,
pulled by a deployment job and applied to a stock diffusers pipeline. It therefore
has a strict, versioned JSON form that is byte-stable and rejects anything that
could make a deployment behave differently from the search.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from budcache_pipeline.atomic import write_text_atomic
from budcache_pipeline.forecast_gains import ForecastGains, ForecastGainsError
from budcache_pipeline.model_identity import model_fingerprint, weights_digest

SCHEMA_VERSION = 2
GAINS_SCHEMA_VERSION = 3
READABLE_SCHEMA_VERSIONS = (1, 2, 3)
_FLOAT_DIGITS = 9
_V1_FIELDS = {"schema_version", "mask", "budget", "steps", "sigmas", "model", "provenance"}
_TOP_LEVEL_FIELDS = {
    1: _V1_FIELDS,
    2: _V1_FIELDS | {"forecast"},
    GAINS_SCHEMA_VERSION: _V1_FIELDS | {"forecast", "forecast_gains"},
}
FORECASTS = ("reuse", "linear")
_MODEL_FIELDS = {"name", "fingerprint"}
_OPTIONAL_MODEL_FIELDS = {"weights_digest"}


class PolicyError(ValueError):
    """A policy file or object that must not be deployed; the message names the field and the fix."""


def check_forecast(forecast: str) -> str:
    """`forecast` itself when it is one the runtime knows; PolicyError otherwise."""
    if forecast not in FORECASTS:
        raise PolicyError(f"unknown forecast {forecast!r}: use one of {list(FORECASTS)}")
    return forecast


def _round_floats(value: Any) -> Any:
    """Round floats so that a save/load/save cycle writes identical bytes."""
    if isinstance(value, float):
        if not math.isfinite(value):
            raise PolicyError(f"non-finite number {value!r} in policy: replace it with a finite value")
        return float(f"{value:.{_FLOAT_DIGITS}g}")
    if isinstance(value, dict):
        return {k: _round_floats(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_round_floats(v) for v in value]
    return value


@dataclass(frozen=True)
class CachePolicy:
    """A fixed-budget step mask: `mask[i]` is True when step i computes the block stack.

    `forecast` says what a cached step adds to the stack's input: "reuse" (the paper's
    method) adds the last computed residual; "linear" extrapolates it in sigma from the
    last two computed residuals (TaylorSeer's idea at the level of the whole stack), at
    the same budget. Schema version 1 files predate `forecast` and read as "reuse".
    `forecast_gains` (`forecast_gains.ForecastGains`, learned by schedule alignment) scale
    that forecast per step and channel group; a policy that carries them is written as
    schema version 3, so a budcache that cannot apply them refuses it instead of running
    another forecast than the one evaluated.
    """

    mask: tuple[bool, ...]
    model_name: str
    model_fingerprint: str
    sigmas: tuple[float, ...] | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    forecast: str = "reuse"
    model_weights: str | None = None
    forecast_gains: ForecastGains | None = None

    def __post_init__(self) -> None:
        if self.forecast_gains is not None:
            if not isinstance(self.forecast_gains, ForecastGains):
                raise PolicyError("field 'forecast_gains' must be a ForecastGains (or null)")
            object.__setattr__(self, "schema_version", max(self.schema_version, GAINS_SCHEMA_VERSION))
        if not isinstance(self.mask, (list, tuple)):
            raise PolicyError(f"field 'mask' is {type(self.mask).__name__}: give a list of true/false values")
        object.__setattr__(self, "mask", tuple(self.mask))
        _check_mask_entries(self.mask)
        if isinstance(self.provenance, dict):
            object.__setattr__(self, "provenance", _round_floats(self.provenance))
        if self.sigmas is not None:
            _check_sigma_entries(self.sigmas)
            object.__setattr__(self, "sigmas", tuple(float(s) for s in self.sigmas))
        _validate(self.to_dict())

    @property
    def steps(self) -> int:
        return len(self.mask)

    @property
    def budget(self) -> int:
        return sum(self.mask)

    @property
    def compute_steps(self) -> list[int]:
        return [i for i, m in enumerate(self.mask) if m]

    @classmethod
    def uniform(
        cls,
        steps: int,
        budget: int,
        model_name: str = "unknown",
        model_fingerprint: str = "unknown",
        sigmas: list[float] | None = None,
    ) -> CachePolicy:
        """Evenly spaced compute steps, step 0 included: the simplest policy at a budget."""
        return cls(
            mask=tuple(uniform_mask(steps, budget)),
            model_name=model_name,
            model_fingerprint=model_fingerprint,
            sigmas=tuple(sigmas) if sigmas is not None else None,
        )

    def with_provenance(self, **entries: Any) -> CachePolicy:
        """A copy with provenance entries added (scores, search settings, ...)."""
        return replace(self, provenance={**self.provenance, **entries})

    def to_dict(self) -> dict[str, Any]:
        data = {
            "schema_version": self.schema_version,
            "mask": list(self.mask),
            "budget": self.budget,
            "steps": self.steps,
            "sigmas": list(self.sigmas) if self.sigmas is not None else None,
            "model": {
                "name": self.model_name,
                "fingerprint": self.model_fingerprint,
                **({"weights_digest": self.model_weights} if self.model_weights is not None else {}),
            },
            "provenance": self.provenance,
        }
        if self.schema_version >= 2 or self.forecast != "reuse":
            data["forecast"] = self.forecast
        if self.schema_version >= GAINS_SCHEMA_VERSION:
            data["forecast_gains"] = self.forecast_gains.to_dict() if self.forecast_gains is not None else None
        return data

    def to_json(self) -> str:
        """Canonical JSON: sorted keys, fixed float precision, trailing newline."""
        return json.dumps(_round_floats(self.to_dict()), sort_keys=True, indent=2) + "\n"

    def save(self, path: str | Path) -> Path:
        """Write the canonical JSON atomically: a killed job never leaves a truncated policy behind."""
        return write_text_atomic(path, self.to_json())

    @classmethod
    def from_dict(cls, data: Any) -> CachePolicy:
        _validate(data)
        return cls(
            mask=tuple(data["mask"]),
            model_name=data["model"]["name"],
            model_fingerprint=data["model"]["fingerprint"],
            sigmas=tuple(data["sigmas"]) if data["sigmas"] is not None else None,
            provenance=data["provenance"],
            schema_version=data["schema_version"],
            forecast=data.get("forecast", "reuse"),
            model_weights=data["model"].get("weights_digest"),
            forecast_gains=ForecastGains.from_dict(data["forecast_gains"]) if "forecast_gains" in data else None,
        )

    @classmethod
    def from_json(cls, text: str) -> CachePolicy:
        """Parse a policy; text over MAX_POLICY_CHARS or nested deeper than MAX_POLICY_DEPTH is refused unparsed."""
        if len(text) > MAX_POLICY_CHARS:
            raise PolicyError(
                f"policy is {len(text):,} characters, over the {MAX_POLICY_CHARS:,} a policy may have: "
                "it is not a policy written by CachePolicy.save"
            )
        depth = _nesting_depth(text)
        if depth > MAX_POLICY_DEPTH:
            raise PolicyError(f"policy JSON nests {depth} levels deep, over the {MAX_POLICY_DEPTH} a policy may use")
        try:
            data = json.loads(text, parse_constant=_reject_constant)
        except json.JSONDecodeError as exc:
            raise PolicyError(f"policy is not valid JSON ({exc}): write it with CachePolicy.save") from exc
        return cls.from_dict(data)


MAX_POLICY_CHARS = 1_000_000
"""A policy of 10,000 steps with its provenance is under 300 kB, a 50-step one with forecast gains in 64
channel groups about 130 kB; anything larger is not one."""
MAX_POLICY_DEPTH = 16
"""Policies nest a few levels (provenance.search.*); checked before parsing, so no input exhausts the stack."""


def _nesting_depth(text: str) -> int:
    """The deepest bracket nesting of JSON text, outside strings (a linear scan, no recursion)."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def _reject_constant(name: str) -> float:
    raise PolicyError(f"non-finite number {name} in policy: replace it with a finite value")


def uniform_mask(steps: int, budget: int) -> list[bool]:
    """Budget compute steps spread evenly over `steps`, always including step 0."""
    if not 1 <= budget <= steps:
        raise PolicyError(f"budget must be between 1 and steps={steps}, got {budget}")
    positions = {round(i * steps / budget) for i in range(budget)}
    return [i in positions for i in range(steps)]


def provenance_now(code_version: str | None = None, **entries: Any) -> dict[str, Any]:
    """Standard provenance block: creation time and code version plus caller entries."""
    from budcache_pipeline import __version__

    return {
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "code_version": code_version or __version__,
        **entries,
    }


def _require_type(name: str, value: Any, kind: type | tuple[type, ...], fix: str) -> None:
    if isinstance(value, bool) and kind in (int, float, (int, float)):
        raise PolicyError(f"field '{name}' must be {fix}, got a boolean")
    if not isinstance(value, kind):
        raise PolicyError(f"field '{name}' must be {fix}, got {type(value).__name__}")


def _validate(data: Any) -> None:
    """Reject every policy that could not be deployed exactly as searched."""
    version = _check_schema_version(data)
    _check_top_level_fields(data, version)
    _check_mask(data["mask"], data["steps"], data["budget"])
    if data["sigmas"] is not None:
        _check_sigmas(data["sigmas"], data["steps"])
    _check_model(data["model"])
    if version >= GAINS_SCHEMA_VERSION:
        _check_forecast_gains(data["forecast_gains"], data["steps"])
    _require_type("provenance", data["provenance"], dict, "an object")
    _round_floats(data["provenance"])


def _check_schema_version(data: Any) -> int:
    """The policy's schema version, once it is one this code reads."""
    if not isinstance(data, dict):
        raise PolicyError(f"policy must be a JSON object, got {type(data).__name__}")
    if "schema_version" not in data:
        raise PolicyError(f"missing field(s) ['schema_version']: a policy needs all of {sorted(_TOP_LEVEL_FIELDS[2])}")
    version = data["schema_version"]
    _require_type("schema_version", version, int, "an integer")
    if version not in READABLE_SCHEMA_VERSIONS:
        raise PolicyError(
            f"field 'schema_version' is {version}, this version of budcache reads {list(READABLE_SCHEMA_VERSIONS)}: "
            "re-export the policy with a matching budcache version"
        )
    return version


def _check_top_level_fields(data: dict[str, Any], version: int) -> None:
    """Exactly the fields of `version`, and from version 2 a known forecast."""
    fields = _TOP_LEVEL_FIELDS[version]
    missing = sorted(fields - data.keys())
    if missing:
        raise PolicyError(f"missing field(s) {missing}: a version {version} policy needs all of {sorted(fields)}")
    unknown = sorted(data.keys() - fields)
    if unknown:
        raise PolicyError(
            f"unknown field(s) {unknown} for schema version {version}: remove them (allowed: {sorted(fields)})"
        )
    if version >= 2:
        _require_type("forecast", data["forecast"], str, f"one of {list(FORECASTS)}")
        if data["forecast"] not in FORECASTS:
            raise PolicyError(f"field 'forecast' is {data['forecast']!r}: use one of {list(FORECASTS)}")


def _check_mask(mask: Any, steps: Any, budget: Any) -> None:
    """One boolean per step, `budget` of them true, step 0 among them."""
    _require_type("mask", mask, list, "a list of booleans")
    _check_mask_entries(mask)
    _require_type("steps", steps, int, "an integer")
    _require_type("budget", budget, int, "an integer")
    if len(mask) != steps:
        raise PolicyError(f"field 'mask' has {len(mask)} entries but 'steps' is {steps}: give one entry per step")
    if budget != sum(mask):
        raise PolicyError(
            f"field 'budget' is {budget} but 'mask' has {sum(mask)} compute steps: set budget to the count of true"
        )
    if not mask[0]:
        raise PolicyError("field 'mask' caches step 0, which has nothing to reuse: set mask[0] to true")


def _check_sigmas(sigmas: Any, steps: int) -> None:
    """A finite, strictly decreasing schedule of steps + 1 values that ends at 0."""
    _require_type("sigmas", sigmas, list, "a list of numbers or null")
    _check_sigma_entries(sigmas)
    if not all(math.isfinite(s) for s in sigmas):
        raise PolicyError("field 'sigmas' contains NaN or infinity: use finite values")
    if len(sigmas) != steps + 1:
        raise PolicyError(f"field 'sigmas' has {len(sigmas)} values, expected steps + 1 = {steps + 1}")
    if any(b >= a for a, b in zip(sigmas, sigmas[1:])):
        raise PolicyError("field 'sigmas' must be strictly decreasing: sort it and remove repeats")
    if sigmas[-1] != 0:
        raise PolicyError(f"field 'sigmas' must end at 0, ends at {sigmas[-1]}: append the final 0")


def _check_forecast_gains(gains: Any, steps: int) -> None:
    """Per-step gains of the same shape for the residual and the slope, one row per step."""
    try:
        parsed = ForecastGains.from_dict(gains)
    except ForecastGainsError as exc:
        raise PolicyError(f"field 'forecast_gains': {exc}") from exc
    if parsed.steps != steps:
        raise PolicyError(
            f"field 'forecast_gains' has {parsed.steps} rows but 'steps' is {steps}: give one row per step"
        )


def _check_model(model: Any) -> None:
    """The model's name and fingerprint (and optionally its weights digest), all strings."""
    _require_type("model", model, dict, "an object with 'name' and 'fingerprint'")
    if not _MODEL_FIELDS <= set(model) <= _MODEL_FIELDS | _OPTIONAL_MODEL_FIELDS:
        raise PolicyError(
            f"field 'model' must have the keys {sorted(_MODEL_FIELDS)} (and optionally "
            f"{sorted(_OPTIONAL_MODEL_FIELDS)}), got {sorted(model)}"
        )
    for key in sorted(model):
        _require_type(f"model.{key}", model[key], str, "a string")


def _check_mask_entries(mask: Sequence[Any]) -> None:
    if not mask or not all(isinstance(m, bool) for m in mask):
        raise PolicyError("field 'mask' must be a non-empty list of true/false values, one per step")


def _check_sigma_entries(sigmas: Any) -> None:
    if not isinstance(sigmas, (list, tuple)) or not all(
        isinstance(s, (int, float)) and not isinstance(s, bool) for s in sigmas
    ):
        raise PolicyError("field 'sigmas' must contain only numbers")


def load_policy(path: str | Path, transformer: torch.nn.Module | None = None) -> CachePolicy:
    """Read and validate a policy file; raises PolicyError naming the field and the fix.

    Given the `transformer` it will run on, a policy of another architecture is refused and
    one searched on other weights of the same architecture (a fine-tune, a fused LoRA) warns.
    """
    path = Path(path)
    if not path.is_file():
        raise PolicyError(f"policy file {path} does not exist")
    if path.stat().st_size > MAX_POLICY_CHARS * 4:
        raise PolicyError(f"{path} is {path.stat().st_size:,} bytes: too large to be a policy")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise PolicyError(f"{path} is not UTF-8 text: it is not a policy written by CachePolicy.save") from exc
    policy = CachePolicy.from_json(text)
    if transformer is not None:
        found = model_fingerprint(transformer)
        if found != policy.model_fingerprint:
            raise PolicyError(
                f"{path} was searched for model fingerprint {policy.model_fingerprint}, this transformer is {found}: "
                "use the policy registered for this model"
            )
        mismatch = weights_mismatch(policy, transformer)
        if mismatch:
            warnings.warn(f"{path}: {mismatch}", stacklevel=2)
    return policy


def weights_mismatch(policy: CachePolicy, transformer: torch.nn.Module) -> str | None:
    """Why `policy` was searched on other weights than `transformer`'s, or None when they match (or it is unknown)."""
    if policy.model_weights is None:
        return None
    found = weights_digest(transformer)
    if found == policy.model_weights:
        return None
    return (
        f"the policy was searched on weights {policy.model_weights}, this transformer's are {found} "
        "(same architecture, other values: a fine-tune or a fused LoRA); search a policy for these weights"
    )


def policy_schema() -> dict[str, Any]:
    """The JSON Schema shipped with the package, for tools outside Python."""
    return json.loads(resources.files("budcache_pipeline").joinpath("schemas/policy.schema.json").read_text())
