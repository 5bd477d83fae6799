"""The `budcache` command: benchmarks, generation, training the default model, registry operations."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _write_json(data: dict, path: str | None) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        print(f"wrote {path}")


def _bench_runtime(args: argparse.Namespace) -> int:
    from budcache_pipeline.benchmarks import bench_runtime, format_runtime_table

    result = bench_runtime(repeats=args.repeats)
    print(format_runtime_table(result))
    _write_json(result, args.json)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="budcache", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    bench = commands.add_parser("bench", help="benchmarks that print figures")
    benches = bench.add_subparsers(dest="bench", required=True)
    runtime = benches.add_parser("runtime", help="speedup of budgets 28/14/10/7/5 over no cache on a bench FLUX model")
    runtime.add_argument("--json", help="also write the result as JSON here")
    runtime.add_argument("--repeats", type=int, default=5, help="best-of-N timing (default 5)")
    runtime.set_defaults(handler=_bench_runtime)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, RuntimeError, FileNotFoundError) as exc:
        print(f"budcache {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
