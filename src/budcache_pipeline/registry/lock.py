"""One promotion at a time per registered model, across processes and machines.

Promotion reads production, compares ladders and moves the alias; two promotions that both
read the old production would both pass and the later write would win, whichever ladder is
better. MLflow has no compare-and-set on aliases, so the lock is a registered model named
`<model>.promotion-lock`: creating it is atomic in every MLflow store (a unique name in the
database), deleting it releases it, and its tags say who holds it and since when.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from budcache_pipeline.registry.store import RegistryError, already_exists, not_found, retry_locked

LOCK_SUFFIX = ".promotion-lock"
WAIT_SECONDS = 120.0
"""How long a promotion waits for another one on the same model before it gives up."""
STALE_SECONDS = 600.0
"""A lock older than this was left by a promotion that died; the next one breaks it (logged in its tags)."""
_POLL_SECONDS = 0.2


def lock_name(model_name: str) -> str:
    return f"{model_name}{LOCK_SUFFIX}"


@contextmanager
def promotion_lock(client: MlflowClient, model_name: str, holder: str) -> Iterator[None]:
    """Hold the model's promotion lock for the body; wait up to WAIT_SECONDS, break a stale one."""
    name = lock_name(model_name)
    deadline = time.monotonic() + WAIT_SECONDS
    while not _try_acquire(client, name, holder):
        held = _holder(client, name)
        if held is not None and time.time() - held[1] > STALE_SECONDS:
            _release(client, name)
            continue
        if time.monotonic() > deadline:
            who = f"{held[0]} since {datetime.fromtimestamp(held[1], timezone.utc).isoformat()}" if held else "?"
            raise RegistryError(
                f"another promotion of '{model_name}' has held its lock for over {WAIT_SECONDS:.0f} s ({who}); "
                f"nothing was changed: retry when it finishes, or if that process is gone delete the registered "
                f"model '{name}' (it is broken automatically after {STALE_SECONDS:.0f} s)"
            )
        time.sleep(_POLL_SECONDS)
    try:
        yield
    finally:
        _release(client, name)


def _try_acquire(client: MlflowClient, name: str, holder: str) -> bool:
    try:
        retry_locked(
            lambda: client.create_registered_model(
                name,
                tags={"holder": holder, "since": f"{time.time():.6f}"},
                description="budcache promotion lock: deleted when the promotion ends",
            ),
            f"taking the promotion lock {name}",
        )
    except MlflowException as exc:
        if already_exists(exc):
            return False
        raise
    return True


def _holder(client: MlflowClient, name: str) -> tuple[str, float] | None:
    """Who holds the lock and since when (epoch seconds), or None when it was released meanwhile."""
    try:
        tags = client.get_registered_model(name).tags
    except MlflowException as exc:
        if not_found(exc):
            return None
        raise
    return tags.get("holder", "unknown"), float(tags.get("since", "0"))


def _release(client: MlflowClient, name: str) -> None:
    try:
        retry_locked(lambda: client.delete_registered_model(name), f"releasing the promotion lock {name}")
    except MlflowException as exc:
        if not not_found(exc):
            raise
