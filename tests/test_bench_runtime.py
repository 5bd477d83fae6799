"""`bench_runtime` on a small image: the table and JSON a user reads, and the numbers' internal consistency."""

from __future__ import annotations

import json
import math

import pytest

from budcache_pipeline.bench_runtime import bench_runtime, format_runtime_table
from budcache_pipeline.console import main


@pytest.fixture(scope="module")
def result() -> dict:
    return bench_runtime(budgets=(8, 2), steps=8, repeats=3, size=64, progress=lambda _: None, overhead_repeats=2)


@pytest.mark.slow
def test_rows_hold_the_issue_fields_and_agree_with_the_baseline(result: dict) -> None:
    assert [row["budget"] for row in result["rows"]] == [8, 2]
    for row in result["rows"]:
        assert row["steps"] == 8
        assert row["seconds_per_image"] > 0
        assert row["speedup"] == pytest.approx(1 / row["relative_time"])
        assert row["speedup_over_ideal"] == pytest.approx(row["speedup"] / (8 / row["budget"]))
    assert result["overhead_full_budget_per_image"] == pytest.approx(result["rows"][0]["relative_time"] - 1)
    assert math.isfinite(result["overhead_full_budget"]) and result["overhead_full_budget"] > -1.0, "a ratio minus 1"
    assert len(result["rows"][0]["relative_times"]) == 3 + 2, "the full budget gets the extra overhead pairs"
    assert len(result["rows"][1]["relative_times"]) == 3
    assert "16 image tokens" in result["model"]


def test_without_the_full_budget_there_is_no_overhead_figure() -> None:
    result = bench_runtime(budgets=(2,), steps=4, repeats=1, size=32, progress=lambda _: None)
    assert result["overhead_full_budget"] is None and result["overhead_full_budget_per_image"] is None
    assert "overhead" not in format_runtime_table(result)


@pytest.mark.slow
def test_table_lists_every_budget(result: dict) -> None:
    table = format_runtime_table(result)
    assert "8/8" in table and "2/8" in table and "overhead at full budget" in table


def test_cli_rejects_nonpositive_repeats(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["bench", "runtime", "--repeats", "0"])
    assert "repeats" in capsys.readouterr().err


@pytest.mark.slow
def test_json_is_written_where_asked(tmp_path, monkeypatch: pytest.MonkeyPatch, result: dict) -> None:
    import budcache_pipeline.bench_runtime as runtime_bench

    monkeypatch.setattr(runtime_bench, "bench_runtime", lambda repeats: result)
    out = tmp_path / "bench" / "runtime.json"
    assert main(["bench", "runtime", "--repeats", "1", "--json", str(out)]) == 0
    written = json.loads(out.read_text())
    assert written["rows"][1]["budget"] == 2


@pytest.mark.parametrize("kwargs", [{"repeats": 0}, {"budgets": (9,)}, {"budgets": ()}])
def test_bad_arguments_are_refused_before_any_timing(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="repeats"):
        bench_runtime(**{"budgets": (8,), "steps": 8, "size": 32, **kwargs})
