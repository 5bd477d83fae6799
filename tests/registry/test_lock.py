"""The promotion lock: a held lock makes a promotion wait and then refuse, a stale one is broken, errors release it."""

from __future__ import annotations

import time

import pytest

from budcache_pipeline import registry
from budcache_pipeline.registry import lock, promotion, store
from tests.registry.writer import STEPS, ladder

MODEL = "locked"
NAME = registry.registered_model_name(MODEL, STEPS)


@pytest.fixture
def uri(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    registry.register_ladder(ladder(MODEL, 0.2), code_version="t", data_hash="md5:t", tracking_uri=uri)
    return uri


def _hold(uri: str, holder: str, since: float) -> None:
    store.open_client(uri).create_registered_model(
        lock.lock_name(NAME), tags={"holder": holder, "since": f"{since:.6f}"}
    )


def _lock_exists(uri: str) -> bool:
    names = {m.name for m in store.open_client(uri).search_registered_models()}
    return lock.lock_name(NAME) in names


def _production(uri: str) -> str | None:
    current = promotion.current_production(store.open_client(uri), NAME)
    return None if current is None else str(current.version)


def test_a_promotion_waits_for_a_live_lock_then_refuses_naming_its_holder(uri, monkeypatch):
    monkeypatch.setattr(lock, "WAIT_SECONDS", 0.6)
    _hold(uri, "nightly-job pid 41", since=time.time())
    started = time.monotonic()
    with pytest.raises(registry.RegistryError, match="nightly-job pid 41.*nothing was changed"):
        registry.promote(NAME, "1", tracking_uri=uri)
    assert time.monotonic() - started >= 0.6
    assert _production(uri) is None and _lock_exists(uri)


def test_a_stale_lock_left_by_a_dead_promotion_is_broken(uri):
    _hold(uri, "crashed pid 7", since=time.time() - lock.STALE_SECONDS - 1)
    assert registry.promote(NAME, "1", tracking_uri=uri).promoted
    assert _production(uri) == "1" and not _lock_exists(uri)


def test_a_promotion_that_fails_inside_the_lock_releases_it(uri, monkeypatch):
    def tampered(*args, **kwargs):
        raise registry.RegistryError("digest mismatch")

    monkeypatch.setattr(promotion, "download_ladder", tampered)
    with pytest.raises(registry.RegistryError, match="digest mismatch"):
        registry.promote(NAME, "1", tracking_uri=uri)
    assert not _lock_exists(uri) and _production(uri) is None


def test_a_bad_version_is_refused_before_any_lock_is_taken(uri):
    with pytest.raises(registry.RegistryError):
        registry.promote(NAME, "9", tracking_uri=uri)
    assert not _lock_exists(uri)
