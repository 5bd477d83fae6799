"""The held-out table must hold one honest row per (method, budget), uncached first."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from budcache_pipeline.baselines import FirstBlockCache, FixedPolicy, TeaCache, Uncached
from budcache_pipeline.evaluation import (
    COLUMNS,
    EvalMethod,
    QualityMetrics,
    RolloutSet,
    best_per_budget,
    evaluate_methods,
    finite_or_none,
)
from budcache_pipeline.models.digits.judge import Judge
from tests.fakes import flux_rollout_set

STEPS, SIZE, COUNT = 12, 64, 4


def decode(latents: torch.Tensor) -> torch.Tensor:
    """Stand-in decoder: one latent channel as a 16x16 grey image in [0, 1]."""
    from diffusers import FluxPipeline

    images = FluxPipeline._unpack_latents(latents, SIZE, SIZE, 8)[:, :1]
    return F.interpolate((images.float() / 4 + 0.5).clamp(0, 1), size=(16, 16), mode="nearest")


@pytest.fixture(scope="module")
def holdout() -> RolloutSet:
    return flux_rollout_set([f"held out {i}" for i in range(COUNT)], [100 + i for i in range(COUNT)], STEPS, SIZE)


def test_table_has_a_row_per_method_and_budget(holdout):
    torch.manual_seed(0)
    judge = Judge().eval()
    quality = QualityMetrics(
        decode=decode,
        features=judge.feature_extractor(),
        real_images=torch.rand(6, 1, 16, 16),
        classify=judge.classify,
        labels=[1, 2, 3, 4],
    )
    methods = [
        EvalMethod("uniform", 4, FixedPolicy.uniform(STEPS, 4)),
        EvalMethod("first_block_cache", 4, FirstBlockCache(0.3), {"calibration_loss": 1e-3}),
        EvalMethod("teacache", 6, TeaCache(0.4)),
    ]
    collected: dict = {}
    table = evaluate_methods(holdout, methods, quality, timing_images=2, collect=collected)
    assert list(table.columns) == list(COLUMNS)
    assert table["method"].tolist() == ["uncached", "uniform", "first_block_cache", "teacache"]
    uncached = table.iloc[0]
    assert uncached["budget"] == STEPS and uncached["compute_steps_mean"] == STEPS
    assert uncached["latent_mse"] == 0 and uncached["speedup"] == 1.0 and math.isinf(uncached["psnr"])
    uniform = table.iloc[1]
    assert uniform["compute_steps_mean"] == 4 and uniform["compute_steps_std"] == 0
    assert uniform["block_evaluations_mean"] == 12
    assert uniform["latent_mse"] > 0 and 0 < uniform["ssim"] < 1 and uniform["seconds_per_image"] > 0
    assert all(0 <= v <= 1 for v in table["judge_agreement"]) and table["fid"].notna().all()
    assert "calibration_loss=0.001" in table.iloc[2]["settings"]
    assert set(collected) == {("uncached", STEPS), ("uniform", 4), ("first_block_cache", 4), ("teacache", 6)}
    best = best_per_budget(table, ["uniform", "first_block_cache"])
    assert best["budget"].tolist() == [4]
    assert best.iloc[0]["latent_mse"] == table[table["budget"] == 4]["latent_mse"].min()


def test_without_decoder_image_metrics_are_missing(holdout):
    table = evaluate_methods(holdout, [EvalMethod("uniform", 3, FixedPolicy.uniform(STEPS, 3))], timing_images=1)
    assert table[["psnr", "ssim", "fid", "judge_agreement"]].isna().all().all()
    assert finite_or_none(float("nan")) is None and finite_or_none(float("inf")) is None
    assert finite_or_none(2.5) == 2.5


def test_bad_method_lists_are_refused(holdout):
    uniform = EvalMethod("uniform", 3, FixedPolicy.uniform(STEPS, 3))
    with pytest.raises(ValueError, match="unique per budget"):
        evaluate_methods(holdout, [uniform, uniform])
    with pytest.raises(ValueError, match="added by evaluate_methods"):
        evaluate_methods(holdout, [EvalMethod("uncached", STEPS, Uncached())])
    bare = RolloutSet(holdout.denoiser, holdout.noise, holdout.sigmas)
    with pytest.raises(ValueError, match="no uncached finals"):
        evaluate_methods(bare, [uniform])
