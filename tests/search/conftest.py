"""A tiny FLUX pipeline with a prompt encoder and a small reference set, shared by the search tests."""

from __future__ import annotations

import pytest
import torch

from budcache_pipeline.search import MaskObjective, compute_reference
from tests.conftest import tiny_flux_pipeline
from tests.test_sampling import TinyPromptEncoder

STEPS, SIZE = 12, 64
PROMPTS = ["a seven", "a three", "a one", "a nine", "a zero", "a four"]
SEEDS = [0, 1, 2, 3, 4, 5]


def make_pipe(seed: int = 0):
    pipe = tiny_flux_pipeline(seed)
    pipe.encode_prompt = TinyPromptEncoder(pipe)
    return pipe


@pytest.fixture(scope="module")
def pipe():
    return make_pipe()


@pytest.fixture(scope="module")
def reference(pipe):
    return compute_reference(pipe, PROMPTS, SEEDS, STEPS, SIZE, SIZE, progress=False)


@pytest.fixture
def objective(pipe, reference):
    return MaskObjective(pipe, reference)


def random_mask(steps: int, budget: int, generator: torch.Generator) -> list[bool]:
    chosen = {0, *(1 + torch.randperm(steps - 1, generator=generator)[: budget - 1]).tolist()}
    return [i in chosen for i in range(steps)]
