"""`budcache bench real-size` on tiny configs of the same diffusers classes (CPU, float32)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from budcache_pipeline.bench_real_size import SearchProbe, format_real_size, measure_model, random_transformer
from budcache_pipeline.console import main
from budcache_pipeline.known_models import FLUX_1_DEV, WAN21_T2V_1_3B

TINY_FLUX = replace(
    FLUX_1_DEV,
    name="tiny FLUX",
    transformer={**FLUX_1_DEV.transformer, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16,
                 "num_attention_heads": 2, "joint_attention_dim": 32, "pooled_projection_dim": 32,
                 "in_channels": 16, "axes_dims_rope": [4, 6, 6]},
    height=64, width=64, steps=8, budget=3, text_tokens=8, dtype="float32", latent_dtype="float32",
)
TINY_WAN = replace(
    WAN21_T2V_1_3B,
    name="tiny Wan",
    transformer={**WAN21_T2V_1_3B.transformer, "num_layers": 2, "attention_head_dim": 12, "num_attention_heads": 2,
                 "ffn_dim": 32, "freq_dim": 32, "text_dim": 32, "rope_max_seq_len": 32},
    height=32, width=32, num_frames=5, steps=6, budget=3, text_tokens=8, dtype="float32",
)


def test_random_transformer_is_seeded_and_in_the_asked_dtype() -> None:
    first = random_transformer(TINY_FLUX.transformer, torch.device("cpu"), torch.bfloat16, seed=3)
    second = random_transformer(TINY_FLUX.transformer, torch.device("cpu"), torch.bfloat16, seed=3)
    assert {p.dtype for p in first.parameters()} == {torch.bfloat16}
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    assert torch.get_default_dtype() == torch.float32


def test_flux_figures_with_a_search_probe() -> None:
    probe = SearchProbe(prompts=2, budget=3, sa_iterations=4, hc_rounds=1)
    result = measure_model(TINY_FLUX, "cpu", probe=probe, repeats=3, progress=lambda _: None)
    assert result["per_call_seconds"] > 0 and result["batch_2"]["batch"] == 2
    assert result["state_bytes"] == result["state_bytes_formula"]
    search = result["search"]
    assert sum(search["mask"]) == 3 and search["mask"][0]
    assert search["calibration_rollouts"] > 0 and search["seconds_per_rollout"] > 0
    assert search["peak_state_bytes"] > 0
    assert result["loop"]["ideal"] == pytest.approx(8 / 3)
    text = format_real_size([result])
    assert "tiny FLUX on cpu" in text and "search probe (2 prompts, budget 3)" in text and "n/a (CPU)" in text


def test_wan_state_size_matches_the_cost_model() -> None:
    result = measure_model(TINY_WAN, "cpu", repeats=2, progress=lambda _: None)
    assert result["calls_per_step"] == 2
    assert result["state_bytes"] == result["state_bytes_formula"]
    assert "search" not in result


def test_known_models_quote_the_recorded_h200_measurements() -> None:
    """The cost model's per-call times and working memory are the ones `docs/measurements/` recorded."""
    folder = Path(__file__).resolve().parents[1] / "docs" / "measurements"
    runs = [json.loads(path.read_text()) for path in sorted(folder.glob("h200-real-size-*.json"))]
    assert len(runs) == 3
    by_model = {}
    for run in runs:
        for result in run:
            by_model.setdefault(result["model"], []).append(result)
    for model in (FLUX_1_DEV, WAN21_T2V_1_3B):
        results = by_model[model.name]
        calls = sorted(r["per_call_seconds"] for r in results)
        assert model.per_call_seconds == pytest.approx(calls[len(calls) // 2], rel=0.01)
        assert model.activation_bytes_per_sample == results[0]["batch_1"]["activation_bytes_per_sample"]
        assert all(r["state_bytes"] == model.state("linear").state_bytes for r in results)
    searches = [r["search"] for r in by_model[FLUX_1_DEV.name]]
    assert len({tuple(s["mask"]) for s in searches}) == 1
    assert all(s["max_state_bytes"] is None or s["peak_state_bytes"] <= s["max_state_bytes"] for s in searches)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "sdxl"], "unknown or unlisted model(s) ['sdxl']"),
        (["--model", "flux-dev", "--search", "wan21-1.3b"], "a --search model must also be a --model"),
    ],
)
def test_the_command_refuses_unknown_models(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "real-size", *argv]) == 2
    assert message in capsys.readouterr().err


def test_the_command_needs_a_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["bench", "real-size", "--model", "flux-dev"]) == 2
    assert "no CUDA device here" in capsys.readouterr().err
