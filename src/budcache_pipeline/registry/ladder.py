"""Ladder folders: one canonical policy JSON per budget plus `SHA256SUMS`, written, read back and picked from."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

from budcache_pipeline.atomic import write_bytes_atomic, write_text_atomic
from budcache_pipeline.policy import CachePolicy, PolicyError, load_policy
from budcache_pipeline.policy_ladder_model import (
    CHECKSUMS_FILE,
    LadderIntegrityError,
    checksums_text,
    holdout_loss,
    policy_file_name,
    read_ladder,
    select_budget,
)
from budcache_pipeline.registry.store import RegistryError


def check_ladder(policies: Mapping[int, CachePolicy]) -> None:
    """A ladder must be one model, one step count, keyed by budget, with a held-out loss each."""
    if not policies:
        raise RegistryError("the policy ladder is empty: give at least one policy")
    for budget, policy in policies.items():
        if budget != policy.budget:
            raise RegistryError(f"ladder key {budget} holds a policy with budget {policy.budget}: key by budget")
        if holdout_loss(policy.to_dict()) is None:
            raise RegistryError(
                f"policy for budget {budget} has no finite provenance['scores']['holdout_mse']: "
                "evaluate it on the holdout set before registering"
            )
    identities = {(p.model_name, p.model_fingerprint, p.steps) for p in policies.values()}
    if len(identities) > 1:
        raise RegistryError(f"the ladder mixes models or step counts {sorted(identities)}: register one per model")


def write_ladder(policies: Mapping[int, CachePolicy] | Iterable[CachePolicy], directory: str | Path) -> list[Path]:
    """Write canonical policy JSONs and their `SHA256SUMS`; returns the policy paths by budget."""
    ladder = _as_ladder(policies)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    files = {policy_file_name(b): p.to_json().encode("utf-8") for b, p in sorted(ladder.items())}
    for name, data in files.items():
        write_bytes_atomic(directory / name, data)
    write_text_atomic(directory / CHECKSUMS_FILE, checksums_text(files))
    return [directory / name for name in files]


def load_ladder(directory: str | Path) -> dict[int, CachePolicy]:
    """Policies by budget from a ladder directory, after checksum and schema checks."""
    directory = Path(directory)
    try:
        budgets = read_ladder(directory)
    except LadderIntegrityError as exc:
        raise RegistryError(str(exc)) from exc
    ladder = {}
    for budget in sorted(budgets):
        path = directory / policy_file_name(budget)
        try:
            policy = load_policy(path)
        except PolicyError as exc:
            raise RegistryError(f"{path} is not a valid policy: {exc}") from exc
        if policy.budget != budget:
            raise RegistryError(f"{path} holds a policy with budget {policy.budget}: the file name was changed")
        ladder[budget] = policy
    return ladder


def _as_ladder(policies: Mapping[int, CachePolicy] | Iterable[CachePolicy]) -> dict[int, CachePolicy]:
    if isinstance(policies, Mapping):
        return dict(policies)
    ladder: dict[int, CachePolicy] = {}
    for policy in policies:
        if policy.budget in ladder:
            raise RegistryError(f"two policies share budget {policy.budget}: keep one per budget")
        ladder[policy.budget] = policy
    return ladder


def pick_policy(policies: Mapping[int, CachePolicy] | Iterable[CachePolicy], budget: int) -> CachePolicy:
    """The policy to run for a request of `budget` compute steps.

    Lowest held-out loss among policies whose budget fits (larger budget on ties, and
    for unscored ladders); the same rule the registered pyfunc model serves.
    """
    ladder = _as_ladder(policies)
    if not ladder:
        raise RegistryError("no policies to pick from: pull a ladder first")
    losses = {b: holdout_loss(p.to_dict()) for b, p in ladder.items()}
    try:
        return ladder[select_budget(losses, budget)]
    except ValueError as exc:
        raise RegistryError(str(exc)) from exc
