"""`budcache check-model`: real-weights loading checked on tiny models of the real classes."""

from __future__ import annotations

import re

import pytest

from budcache_pipeline.console import main
from budcache_pipeline.models.check import check_model
from budcache_pipeline.models.spec import ModelSpec


@pytest.mark.parametrize("adapter", ["flux", "wan", "sd3"])
def test_two_steps_are_timed_and_memory_is_reported(adapter):
    result = check_model(ModelSpec(adapter=adapter, weights="tiny", device="cpu"))
    assert len(result.step_seconds) == 2 and all(s > 0 for s in result.step_seconds)
    assert result.parameters > 0 and result.peak_memory_bytes > 0
    assert result.transformer_calls_per_step == (2 if adapter == "wan" else 1)
    assert result.fingerprint and result.dtype == "float32" and result.device == "cpu"


def test_the_command_prints_time_and_memory_per_step(capsys):
    assert main(["check-model", "--adapter", "sd3", "--weights", "tiny", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "SD3Transformer2DModel" in out and "per step:" in out and "peak process (RSS) memory" in out


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--adapter", "flux", "--weights", "/no/such/FLUX.1-dev"], "is not a folder"),
        (["--adapter", "flux", "--weights", "tiny", "--dtype", "bfloat16", "--device", "cpu"], "float32"),
        (["--adapter", "wan", "--weights", "tiny", "--device", "cpu", "--num-frames", "6"], "4k \\+ 1"),
        (["--adapter", "flux"], "model.weights is required"),
    ],
)
def test_bad_settings_exit_2_with_the_fix(arguments, message, capsys):
    assert main(["check-model", *arguments]) == 2
    assert re.search(message, capsys.readouterr().err)
