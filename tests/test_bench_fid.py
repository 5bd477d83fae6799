"""The quality bench's FID comparison on a tiny FLUX with a stand-in judge: every figure, and bad input refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from budcache_pipeline.bench_fid import fid_comparison, format_fid
from budcache_pipeline.baselines import FixedPolicy, TaylorSeer, TeaCache
from budcache_pipeline.evaluation import EvalMethod, QualityMetrics
from budcache_pipeline.search.starts import uniform_start
from tests.conftest import tiny_flux_pipeline
from tests.fakes import flux_adapter, square

STEPS, BUDGET, SIZE = 8, 4, 32


class _Features(nn.Module):
    """A fixed random projection of the flattened 'image' (the latents themselves)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.num_features = 6
        self.projection = nn.Linear(width, self.num_features)
        with torch.no_grad():
            self.projection.weight.copy_(torch.randn(self.num_features, width, generator=torch.Generator().manual_seed(0)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.projection(images.flatten(1).float())


@pytest.fixture(scope="module")
def adapter():
    return flux_adapter(tiny_flux_pipeline())


def _quality(adapter) -> QualityMetrics:
    _, noise = adapter.prepare(["probe"], [0], square(SIZE))
    width = noise[0].numel()
    real = torch.randn(40, *noise.shape[1:], generator=torch.Generator().manual_seed(1))
    return QualityMetrics(decode=lambda latents: latents.float(), features=_Features(width), real_images=real)


def test_every_method_gets_a_gap_with_an_interval(adapter) -> None:
    pairs = [(f"a prompt {k}", k % 10, 500 + k) for k in range(24)]
    methods = [
        EvalMethod("budcache", BUDGET, FixedPolicy(uniform_start(STEPS, BUDGET, (0,)))),
        EvalMethod("taylorseer", BUDGET, TaylorSeer(2, 1)),
        EvalMethod("teacache", BUDGET, TeaCache(0.3)),
    ]
    result = fid_comparison(adapter, pairs, methods, _quality(adapter), {BUDGET: "budcache"}, STEPS, square(SIZE),
                            resamples=30, progress=lambda _: None)
    assert result["samples"] == 24 and result["real_images"] == 40
    record = result["budgets"][str(BUDGET)]
    assert set(record["fid"]) == {"uncached", "budcache", "taylorseer", "teacache"}
    assert set(record["gap"]) == set(record["shift"]) == {"budcache", "taylorseer", "teacache"}
    assert all(g["low"] <= g["value"] <= g["high"] for g in [*record["gap"].values(), *record["shift"].values()])
    assert min(s["value"] for s in record["shift"].values()) > 0, "every cache moves the distribution a little"
    assert record["best_heuristic"] == min(("taylorseer", "teacache"), key=lambda n: record["shift"][n]["value"])
    best = record["shift"][record["best_heuristic"]]["value"]
    assert record["shift_ratio"]["value"] == pytest.approx(record["shift"]["budcache"]["value"] / best)
    assert isinstance(record["intervals_disjoint"], bool) and isinstance(record["shift_ratio_met"], bool)
    text = "\n".join(format_fid(result))
    assert f"B={BUDGET}: budcache / {record['best_heuristic']} shift ratio" in text


def test_a_model_without_a_judge_is_refused(adapter) -> None:
    with pytest.raises(ValueError, match="needs the model's quality plug-in"):
        fid_comparison(adapter, [("p", 0, 1), ("q", 1, 2)], [], QualityMetrics(), {BUDGET: "budcache"}, STEPS,
                       square(SIZE), progress=lambda _: None)
