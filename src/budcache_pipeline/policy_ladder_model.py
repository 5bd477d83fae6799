"""MLflow pyfunc model, logged "from code", that serves a registered policy ladder.

MLflow executes this file to load the model, so nothing is unpickled, and it imports
only the standard library, pandas and mlflow: a budget-to-policy lookup service needs
neither torch nor budcache. The ladder is a directory of canonical policy JSON files
(`budget_<B>.json`) and a `SHA256SUMS` file in `sha256sum` format, verified on load.
`budcache_pipeline.registry` writes and checks ladders with the same helpers.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd

LADDER_ARTIFACT = "ladder"
CHECKSUMS_FILE = "SHA256SUMS"
_POLICY_FILE = re.compile(r"budget_(\d+)\.json")


class LadderIntegrityError(ValueError):
    """A ladder whose files do not match its checksums: it must not be served or deployed."""


def policy_file_name(budget: int) -> str:
    return f"budget_{budget}.json"


def checksums_text(files: Mapping[str, bytes]) -> str:
    """`sha256sum`-compatible listing, sorted by name, so `sha256sum -c SHA256SUMS` works too."""
    return "".join(f"{hashlib.sha256(data).hexdigest()}  {name}\n" for name, data in sorted(files.items()))


def read_ladder(directory: str | Path) -> dict[int, bytes]:
    """Policy bytes by budget, after checking every file against `SHA256SUMS`.

    Refuses a missing or malformed checksums file, a listed file that is missing or
    differs, and a policy file that is not listed (it could not have been verified).
    """
    directory = Path(directory)
    checksums_path = directory / CHECKSUMS_FILE
    links = sorted(p.name for p in directory.iterdir() if p.is_symlink()) if directory.is_dir() else []
    if links:
        raise LadderIntegrityError(f"{directory} holds symbolic links {links}: a ladder is plain files only")
    if not checksums_path.is_file():
        raise LadderIntegrityError(f"{checksums_path} is missing: the ladder cannot be verified")
    expected: dict[str, str] = {}
    for number, line in enumerate(checksums_path.read_text().splitlines(), start=1):
        digest, _, name = line.partition("  ")
        if not re.fullmatch(r"[0-9a-f]{64}", digest) or not _POLICY_FILE.fullmatch(name):
            raise LadderIntegrityError(f"{checksums_path} line {number} is not '<sha256>  budget_<B>.json'")
        expected[name] = digest
    unlisted = sorted(p.name for p in directory.glob("*.json") if p.name not in expected)
    if unlisted:
        raise LadderIntegrityError(f"policy file(s) {unlisted} in {directory} are not listed in {CHECKSUMS_FILE}")
    if not expected:
        raise LadderIntegrityError(f"{checksums_path} lists no policy: the ladder is empty")
    ladder: dict[int, bytes] = {}
    for name, digest in expected.items():
        path = directory / name
        if not path.is_file():
            raise LadderIntegrityError(f"{path} is listed in {CHECKSUMS_FILE} but missing")
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != digest:
            raise LadderIntegrityError(f"{path} does not match its sha256 in {CHECKSUMS_FILE}: it was modified")
        ladder[int(_POLICY_FILE.fullmatch(name).group(1))] = data
    return ladder


def holdout_loss(policy: Mapping[str, Any]) -> float | None:
    """The held-out loss recorded in a policy's provenance, None when it has none."""
    value = policy.get("provenance", {}).get("scores", {}).get("holdout_mse")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def select_budget(losses: Mapping[int, float | None], requested: int) -> int:
    """The budget to serve for a request: lowest held-out loss among budgets <= requested.

    Ties and unscored policies go to the larger budget, so an unscored ladder serves the
    largest budget that fits.
    """
    fitting = [b for b in losses if b <= requested]
    if not fitting:
        raise ValueError(f"no policy fits a budget of {requested}: the smallest budget available is {min(losses)}")

    def rank(budget: int) -> tuple[float, int]:
        loss = losses[budget]
        return (math.inf if loss is None else loss, -budget)

    return min(fitting, key=rank)


def requested_budgets(model_input: Any) -> list[int]:
    """Budgets from a scalar, a list, or a DataFrame with a `budget` column."""
    if isinstance(model_input, pd.DataFrame):
        if "budget" not in model_input.columns:
            raise ValueError(f"input DataFrame needs a 'budget' column, got {list(model_input.columns)}")
        values = model_input["budget"].tolist()
    elif isinstance(model_input, (list, tuple, pd.Series)):
        values = list(model_input)
    else:
        values = [model_input]
    budgets = []
    for value in values:
        if isinstance(value, bool) or not float(value).is_integer():
            raise ValueError(f"budget must be a whole number of compute steps, got {value!r}")
        budgets.append(int(value))
    return budgets


class PolicyLadderModel(mlflow.pyfunc.PythonModel):
    """`predict(budget)` returns the JSON text of the best policy that fits the budget."""

    def load_context(self, context: Any) -> None:
        ladder = read_ladder(context.artifacts[LADDER_ARTIFACT])
        self._texts = {budget: data.decode("utf-8") for budget, data in ladder.items()}
        self._losses = {budget: holdout_loss(json.loads(text)) for budget, text in self._texts.items()}

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> Any:
        """A list of policy JSON strings for a DataFrame (column `budget`) or a list of budgets;
        one string for a single budget (an int passes through MLflow unchanged).

        The `pd.DataFrame` hint is the one MLflow accepts without building a schema that
        would reject a plain int.
        """
        budgets = requested_budgets(model_input)
        texts = [self._texts[select_budget(self._losses, budget)] for budget in budgets]
        scalar = not isinstance(model_input, (pd.DataFrame, list, tuple, pd.Series))
        return texts[0] if scalar else texts


mlflow.models.set_model(PolicyLadderModel())
