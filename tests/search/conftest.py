"""A tiny FLUX adapter and a small reference set, shared by the search tests."""

from __future__ import annotations

import pytest
import torch

from budcache_pipeline.search import MaskObjective, compute_reference
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
