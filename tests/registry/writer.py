"""A registry writer run as its own process by the concurrency tests: register, promote or pull in a loop.

Each command waits until the wall-clock time given by `--start` so that processes begin together,
and prints one JSON line with what it did.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from budcache_pipeline import registry
from budcache_pipeline.policy import CachePolicy

STEPS = 20
FINGERPRINT = "0123456789abcdef"


def ladder(model: str, loss: float) -> dict[int, CachePolicy]:
    """Budgets 5 and 10 whose held-out losses scale with `loss` (lower is better)."""
    return {
        b: CachePolicy.uniform(STEPS, b, model, FINGERPRINT).with_provenance(scores={"holdout_mse": loss / b})
        for b in (5, 10)
    }


def _wait(start: float) -> None:
    while time.time() < start:
        time.sleep(0.001)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["register", "promote", "pull-loop"])
    parser.add_argument("--uri", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--start", type=float, default=0.0)
    parser.add_argument("--loss", type=float)
    parser.add_argument("--versions", help="comma-separated versions to promote, in order (forced)")
    parser.add_argument("--version")
    parser.add_argument("--out")
    parser.add_argument("--until", help="stop pulling once this file exists")
    args = parser.parse_args(argv)
    name = registry.registered_model_name(args.model, STEPS)
    _wait(args.start)
    if args.command == "register":
        result = registry.register_ladder(
            ladder(args.model, args.loss), code_version="test", data_hash="md5:test", tracking_uri=args.uri
        )
        print(json.dumps({"version": result.version}))
    elif args.command == "promote" and args.version:
        result = registry.promote(name, args.version, tracking_uri=args.uri)
        print(json.dumps({"version": result.version, "promoted": result.promoted, "previous": result.previous_version}))
    elif args.command == "promote":
        for version in args.versions.split(","):
            registry.promote(name, version, force=True, reason="rotation test", tracking_uri=args.uri)
        print(json.dumps({"promotions": len(args.versions.split(","))}))
    else:
        pulls, errors, seen = 0, [], set()
        while not Path(args.until).exists() or pulls == 0:
            try:
                paths = registry.pull(name, registry.PRODUCTION_ALIAS, args.out, tracking_uri=args.uri)
                policies = registry.load_ladder(args.out)
                seen.add(tuple(sorted((b, p.provenance["scores"]["holdout_mse"]) for b, p in policies.items())))
                if [p.name for p in paths] != ["budget_5.json", "budget_10.json"]:
                    errors.append(f"pulled {[p.name for p in paths]}")
            except Exception as exc:  # every failure a reader could meet is what this loop counts
                errors.append(f"{type(exc).__name__}: {exc}")
            pulls += 1
        print(json.dumps({"pulls": pulls, "errors": errors, "ladders_seen": sorted(seen)}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
