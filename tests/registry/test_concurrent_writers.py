"""Concurrent writers on the registry, on sqlite and on a real `mlflow server` started on a loopback port.

Every writer is its own process (tests/registry/writer.py), as two scheduled jobs would be.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

from budcache_pipeline import registry
from budcache_pipeline.console import main
from budcache_pipeline.registry import store
from tests.registry.writer import STEPS, ladder

pytestmark = pytest.mark.slow  # end to end: `make test-fast` leaves it out

WRITER = Path(__file__).with_name("writer.py")
ROOT = Path(__file__).parents[2]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`mlflow server` with an sqlite backend and proxied artifacts, on a free loopback port."""
    home = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    process = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("mlflow")), "server",
            "--backend-store-uri", f"sqlite:///{home / 'mlflow.db'}",
            "--artifacts-destination", str(home / "artifacts"),
            "--host", "127.0.0.1", "--port", str(port), "--workers", "2",
        ],
        stdout=(home / "server.log").open("w"),
        stderr=subprocess.STDOUT,
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if process.poll() is not None or time.time() > deadline:
            process.kill()
            pytest.fail(f"mlflow server did not start: {(home / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)
    yield uri
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(params=["sqlite", "server"])
def uri(request, tmp_path, monkeypatch):
    """A fresh sqlite database per test, or the module's server (each test uses its own model name)."""
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'mlflow.db'}"
    return request.getfixturevalue("server")


def _model(request) -> str:
    return "m" + request.node.name.split("[")[0][-12:].replace("_", "") + request.node.callspec.id


def _start(*commands: list[str], delay: float = 8.0) -> list[dict]:
    """Run writer processes that begin at the same instant; returns their JSON lines."""
    start = time.time() + delay
    processes = [
        subprocess.Popen(
            [sys.executable, str(WRITER), *command, "--start", str(start)],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for command in commands
    ]
    results = []
    for process in processes:
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def test_two_registrations_at_once_land_as_distinct_versions(uri, request):
    model = _model(request)
    results = _start(
        ["register", "--uri", uri, "--model", model, "--loss", "0.2"],
        ["register", "--uri", uri, "--model", model, "--loss", "0.1"],
    )
    assert sorted(int(r["version"]) for r in results) == [1, 2]
    client = store.open_client(uri)
    name = registry.registered_model_name(model, STEPS)
    losses = {
        v.version: v.tags["holdout_mse.budget_5"] for v in client.search_model_versions(f"name = '{name}'")
    }
    assert sorted(losses.values()) == sorted([repr(0.1 / 5), repr(0.2 / 5)])
    assert client.get_model_version_by_alias(name, registry.CANDIDATE_ALIAS).version in losses
    assert all(str(v) in {"1", "2"} for v in losses)


def test_racing_promotions_leave_production_on_one_and_the_history_says_who_moved_it(uri, request, monkeypatch, capsys):
    model = _model(request)
    name = registry.registered_model_name(model, STEPS)
    versions = [
        registry.register_ladder(ladder(model, loss), code_version="t", data_hash="md5:t", tracking_uri=uri).version
        for loss in (0.3, 0.2, 0.1)
    ]
    assert registry.promote(name, versions[0], tracking_uri=uri).promoted
    results = _start(
        ["promote", "--uri", uri, "--model", model, "--version", versions[1]],
        ["promote", "--uri", uri, "--model", model, "--version", versions[2]],
    )
    production = str(store.open_client(uri).get_model_version_by_alias(name, registry.PRODUCTION_ALIAS).version)
    assert production in versions[1:]
    history = registry.alias_history(name, tracking_uri=uri)
    moves = 1 + sum(r["promoted"] for r in results)
    assert len(history) == moves and history["version"].iloc[-1] == production
    assert history["version"].iloc[0] == versions[0] and pd.isna(history["previous"].iloc[0])
    assert history["by"].str.contains(" pid ").all() and history["at"].is_monotonic_increasing
    # Each promotion compared itself with the production it replaced, so the better ladder wins in either order.
    assert production == versions[2]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    capsys.readouterr()
    assert main(["history", "--model", name]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split()[:4] == ["at", "version", "previous", "by"] and len(printed) == 1 + moves


def test_a_deployment_reading_production_during_20_promotions_never_gets_a_broken_ladder(uri, request, tmp_path):
    model = _model(request)
    name = registry.registered_model_name(model, STEPS)
    first, second = (
        registry.register_ladder(ladder(model, loss), code_version="t", data_hash="md5:t", tracking_uri=uri).version
        for loss in (0.2, 0.1)
    )
    registry.promote(name, first, tracking_uri=uri)
    done = tmp_path / "promotions-done"
    rotation = ",".join([second, first] * 10)
    start = time.time() + 8
    reader = subprocess.Popen(
        [sys.executable, str(WRITER), "pull-loop", "--uri", uri, "--model", model, "--out", str(tmp_path / "pulled"),
         "--until", str(done), "--start", str(start)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    promoter = _start(["promote", "--uri", uri, "--model", model, "--versions", rotation], delay=start - time.time())
    done.touch()
    out, err = reader.communicate(timeout=300)
    assert reader.returncode == 0, err[-3000:]
    report = json.loads(out.strip().splitlines()[-1])
    assert promoter == [{"promotions": 20}]
    assert report["errors"] == [] and report["pulls"] >= 5
    expected = {tuple((b, loss / b) for b in (5, 10)) for loss in (0.2, 0.1)}
    assert {tuple(map(tuple, seen)) for seen in report["ladders_seen"]} <= expected
    assert len(registry.alias_history(name, tracking_uri=uri)) == 21


def test_a_locked_database_is_retried_with_a_bound_and_a_clear_final_message(monkeypatch, caplog):
    from sqlalchemy.exc import OperationalError

    monkeypatch.setattr(store, "LOCK_BACKOFF_SECONDS", 0.001)
    calls = []

    def locked_twice():
        calls.append(1)
        if len(calls) <= 2:
            raise OperationalError("UPDATE", {}, Exception("database is locked"))
        return "written"

    with caplog.at_level("WARNING"):
        assert store.retry_locked(locked_twice, "setting an alias") == "written"
    assert len(calls) == 3 and caplog.text.count("registry database locked") == 2

    def always_locked():
        raise OperationalError("UPDATE", {}, Exception("database is locked"))

    with pytest.raises(registry.RegistryError, match=f"stayed locked by other writers through {store.LOCK_ATTEMPTS}"):
        store.retry_locked(always_locked, "setting an alias")

    def broken():
        raise OperationalError("UPDATE", {}, Exception("no such table: registered_models"))

    with pytest.raises(OperationalError, match="no such table"):
        store.retry_locked(broken, "setting an alias")
