"""A tiny FLUX adapter and a small reference set, shared by the search tests."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from budcache_pipeline.search import MaskObjective, compute_reference
from budcache_pipeline.search.tolerance import LOSS_RELATIVE_TOLERANCE
from tests.conftest import tiny_flux_pipeline
from tests.fakes import flux_adapter, square

STEPS, SIZE = 12, 64
PROMPTS = ["a seven", "a three", "a one", "a nine", "a zero", "a four"]
SEEDS = [0, 1, 2, 3, 4, 5]


def make_adapter(seed: int = 0):
    return flux_adapter(tiny_flux_pipeline(seed))


@pytest.fixture(scope="module")
def adapter():
    return make_adapter()


@pytest.fixture(scope="module")
def reference(adapter):
    return compute_reference(adapter, PROMPTS, SEEDS, STEPS, square(SIZE), progress=False)


@pytest.fixture
def objective(adapter, reference):
    return MaskObjective(adapter, reference)


def random_mask(steps: int, budget: int, generator: torch.Generator) -> list[bool]:
    chosen = {0, *(1 + torch.randperm(steps - 1, generator=generator)[: budget - 1]).tolist()}
    return [i in chosen for i in range(steps)]


def close(loss: float) -> Any:
    """What a loss of the same mask may be when computed in another batch composition, at
    another thread count or on another machine (README, "Determinism")."""
    return pytest.approx(loss, rel=LOSS_RELATIVE_TOLERANCE)


def assert_same_up_to_loss_tolerance(got: Any, expected: Any, where: str = "result") -> None:
    """Equal nested data (masks, names, counts exactly), except floats: losses, within the tolerance."""
    if isinstance(expected, dict):
        assert isinstance(got, dict) and got.keys() == expected.keys(), where
        for key in expected:
            assert_same_up_to_loss_tolerance(got[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert isinstance(got, (list, tuple)) and len(got) == len(expected), where
        for k, (a, b) in enumerate(zip(got, expected)):
            assert_same_up_to_loss_tolerance(a, b, f"{where}[{k}]")
    elif isinstance(expected, float):
        assert isinstance(got, float) and got == close(expected), where
    else:
        assert type(got) is type(expected) and got == expected, where
