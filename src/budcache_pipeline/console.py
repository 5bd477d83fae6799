"""The `budcache` command: benchmarks, generation, training the default model, registry operations.

Named `console` because Kedro reserves `<package>.cli` for its own project commands.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from budcache_pipeline.atomic import write_text_atomic


def _write_json(data: dict, path: str | None) -> None:
    if path:
        write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
        print(f"wrote {path}")


def _budget_list(text: str) -> list[int]:
    try:
        return [_positive_int(part) for part in text.split(",")]
    except (ValueError, argparse.ArgumentTypeError) as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}") from exc


def _seed_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def _bench_runtime(args: argparse.Namespace) -> int:
    from budcache_pipeline.bench_runtime import bench_runtime, format_runtime_table

    result = bench_runtime(repeats=args.repeats)
    print(format_runtime_table(result))
    _write_json(result, args.json)
    return 0


def _bench_quality(args: argparse.Namespace) -> int:
    import pandas as pd

    from budcache_pipeline.bench_quality import bench_quality
    from budcache_pipeline.bench_quality_report import format_quality_table

    result = bench_quality(forecast=args.forecast, out_dir=args.figures, fid_samples=args.fid_samples)
    print(format_quality_table(result))
    if args.csv:
        write_text_atomic(args.csv, pd.DataFrame(result["rows"]).to_csv(index=False))
        print(f"wrote {args.csv}")
    _write_json(result, args.json)
    return 0


def _bench_ablation(args: argparse.Namespace) -> int:
    from budcache_pipeline.bench_ablation import (
        ABLATION_BUDGETS,
        VARIANTS,
        bench_ablation,
        format_ablation,
        kedro_search_options,
    )
    from budcache_pipeline.registry import find_project_root

    options, forecast = kedro_search_options(find_project_root(), args.env)
    budgets = args.budgets or ABLATION_BUDGETS
    variants = VARIANTS
    if args.variants:
        unknown = sorted(set(args.variants) - set(VARIANTS))
        if unknown:
            raise ValueError(f"unknown variant(s) {unknown}: use some of {list(VARIANTS)} (the default always runs)")
        variants = {name: VARIANTS[name] for name in args.variants}
    table = bench_ablation(budgets, calibration_size=args.calibration, kedro_options=options, forecast=forecast,
                           variants=variants, seeds=args.seeds or (0,), calibration_sets=args.calibration_sets)
    print(format_ablation(table))
    if args.csv:
        write_text_atomic(args.csv, table.to_csv(index=False))
        print(f"wrote {args.csv}")
    return 0


def _bench_real_size(args: argparse.Namespace) -> int:
    from budcache_pipeline.bench_real_size import SearchProbe, format_real_size, run_real_size

    from budcache_pipeline.search.prefix_store import parse_bytes

    probe = SearchProbe(prompts=args.prompts, budget=args.budget, max_state_bytes=parse_bytes(args.max_state_bytes))
    results = run_real_size(args.model or ["flux-dev", "wan21-1.3b"], args.search or [], probe=probe)
    print(format_real_size(results))
    if args.json:
        write_text_atomic(Path(args.json), json.dumps(results, indent=2) + "\n")
    return 0


def _bench_gpu(args: argparse.Namespace) -> int:
    from budcache_pipeline.bench_gpu import bench_gpu, format_bench_gpu

    result = bench_gpu(args.project, args.env, reuse=args.reuse, images=args.images)
    print(format_bench_gpu(result))
    _write_json(result, args.json)
    return 0


def _generate(args: argparse.Namespace) -> int:
    from budcache_pipeline.deploy import check_policy, run_pipeline
    from budcache_pipeline.models.spec import ModelSpec, load_adapter, read_model_block
    from budcache_pipeline.policy import load_policy
    from budcache_pipeline.reporting import plot_sample_grid

    spec = ModelSpec.from_params(read_model_block(args.model_config) if args.model_config else {})
    adapter = load_adapter(spec)
    size = spec.output_size(adapter)
    steps = args.steps or spec.steps or 28
    seeds = list(range(args.seed, args.seed + args.images))
    policy, label = None, f"{steps} steps, no cache"
    schedule = adapter.schedule_kwargs(adapter.default_sigmas(steps, size), size)
    if args.policy:
        plan = check_policy(adapter, load_policy(args.policy), steps, size)
        policy, schedule = plan.policy, plan.schedule_kwargs
        label = f"budget {policy.budget} of {steps}"
    images, used = run_pipeline(adapter, [args.prompt] * len(seeds), seeds, size, schedule, policy)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    plot_sample_grid({label: images}, args.out, columns=len(seeds))
    print(f"wrote {args.out}: {len(seeds)} images of {args.prompt!r}, {used} of {steps} steps computed the block stack")
    return 0


def _check_model(args: argparse.Namespace) -> int:
    from budcache_pipeline.models.check import check_model, spec_from_arguments

    for line in check_model(spec_from_arguments(args)).lines():
        print(line)
    return 0


def _train_default_model(args: argparse.Namespace) -> int:
    from budcache_pipeline.models import train_default_model

    report = train_default_model(args.out, steps=args.steps, seed=args.seed, num_threads=args.threads)
    print(json.dumps(report, indent=2, sort_keys=True))
    return 0


def _promote(args: argparse.Namespace) -> int:
    from budcache_pipeline.registry import format_promotion, promote

    result = promote(
        args.model, args.version, force=args.force, reason=args.reason, allow_unverified=args.allow_unverified
    )
    print(format_promotion(result))
    return 0 if result.promoted else 1


def _pull(args: argparse.Namespace) -> int:
    from budcache_pipeline.registry import pull

    paths = pull(
        args.model,
        args.alias,
        args.out,
        expect_fingerprint=args.fingerprint,
        expect_steps=args.steps,
        allow_unverified=args.allow_unverified,
    )
    for path in paths:
        print(path)
    return 0


def _history(args: argparse.Namespace) -> int:
    from budcache_pipeline.registry import alias_history

    table = alias_history(args.model)
    print(table.to_string(index=False, na_rep="-") if not table.empty else f"'{args.model}': production never moved")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from budcache_pipeline.registry import verify

    result = verify(args.model, alias=args.alias, version=args.version)
    print(f"{'OK' if result.ok else 'FAILED'}: {result.message}")
    return 0 if result.ok else 1


_MODEL_CONFIG_HELP = (
    "a YAML file whose `model:` block names the adapter, weights, size and steps (default: the embedded model)"
)
_UNVERIFIED_HELP = (
    "accept versions registered without file digests in the registry database (logged as a warning); "
    "digests that exist are always checked"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="budcache", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    _add_bench_commands(commands)
    _add_generate_command(commands)
    _add_check_model_command(commands)
    _add_train_command(commands)
    _add_registry_commands(commands)
    return parser


def _add_bench_commands(commands: argparse._SubParsersAction) -> None:
    """`budcache bench ...`: one subcommand per benchmark."""
    bench = commands.add_parser("bench", help="benchmarks that print figures")
    benches = bench.add_subparsers(dest="bench", required=True)
    _add_bench_runtime(benches)
    _add_bench_quality(benches)
    _add_bench_ablation(benches)
    _add_bench_gpu(benches)
    _add_bench_real_size(benches)


def _add_bench_runtime(benches: argparse._SubParsersAction) -> None:
    runtime = benches.add_parser("runtime", help="speedup of budgets 28/14/10/7/5 over no cache on a bench FLUX model")
    runtime.add_argument("--json", help="also write the result as JSON here")
    runtime.add_argument("--repeats", type=_positive_int, default=6, help="timing rounds; figures are medians (default 6)")
    runtime.set_defaults(handler=_bench_runtime)


def _add_bench_quality(benches: argparse._SubParsersAction) -> None:
    quality = benches.add_parser("quality", help="searched policies vs heuristic caches on the default model's held-out prompts")
    quality.add_argument("--json", help="also write the summary and table as JSON here")
    quality.add_argument("--csv", help="also write the held-out table (one row per method x budget) as CSV here")
    quality.add_argument("--figures", help="folder for the plots (Pareto, masks, convergence, sample grids)")
    quality.add_argument(
        "--forecast",
        choices=["linear", "reuse"],
        default="linear",
        help="what searched policies add on a cached step (reuse: the paper's plain reuse; default linear)",
    )
    quality.add_argument("--fid-samples", type=_non_negative_int, default=2048,
                         help="held-out samples of the FID comparison at budgets 7, 5, 4 (default 2048; 0 skips it)")
    quality.set_defaults(handler=_bench_quality)


def _add_bench_ablation(benches: argparse._SubParsersAction) -> None:
    ablation = benches.add_parser(
        "ablation", help="held-out MSE and search cost per budget of the search's variants and the default"
    )
    ablation.add_argument("--budgets", type=_budget_list,
                          help="comma-separated compute budgets of 28 steps (default 14,10,7,5,4,3)")
    ablation.add_argument("--calibration", type=_positive_int, default=16,
                          help="calibration pairs (default 16, the Kedro default)")
    ablation.add_argument("--seeds", type=_seed_list,
                          help="comma-separated search seeds, each variant run at each (default 0)")
    ablation.add_argument("--calibration-sets", type=_positive_int, default=1,
                          help="calibration sets (the same prompts, other noise seeds) each searched at every seed "
                               "(default 1)")
    ablation.add_argument("--variants", type=lambda text: [v.strip() for v in text.split(",") if v.strip()],
                          help="comma-separated variants to run besides the default (default: all)")
    ablation.add_argument("--env", help="the Kedro environment whose search settings are the default (default local)")
    ablation.add_argument("--csv", help="also write the table as CSV here")
    ablation.set_defaults(handler=_bench_ablation)


def _add_bench_gpu(benches: argparse._SubParsersAction) -> None:
    gpu = benches.add_parser(
        "gpu", help="per budget of a Kedro run: s/image, speedup, peak GPU memory, search GPU-minutes, held-out quality"
    )
    gpu.add_argument("--env", help="Kedro environment (conf/<env>); on a CPU only tiny_flux, tiny_wan, tiny_sd3 or the default")
    gpu.add_argument("--project", default=".", help="the project folder (default: the current one)")
    gpu.add_argument(
        "--reuse", action="store_true", help="read the outputs of an earlier `kedro run --env ENV` instead of running it"
    )
    gpu.add_argument("--images", type=_positive_int, default=2, help="held-out images timed per method (default 2)")
    gpu.add_argument("--json", help="also write the result as JSON here")
    gpu.set_defaults(handler=_bench_gpu)


def _add_bench_real_size(benches: argparse._SubParsersAction) -> None:
    real = benches.add_parser(
        "real-size", help="a released model's speed, memory and state size at served size, random weights (GPU)"
    )
    real.add_argument("--model", action="append", help="flux-dev or wan21-1.3b (repeatable; default both)")
    real.add_argument("--search", action="append", help="also probe a short search on this model (repeatable)")
    real.add_argument("--prompts", type=_positive_int, default=2, help="calibration prompts of the probe (default 2)")
    real.add_argument("--budget", type=_positive_int, default=10, help="the probe's budget of 28 steps (default 10)")
    real.add_argument("--max-state-bytes", help="the probe's bound on prefix-state bytes, e.g. 4GB (default: none)")
    real.add_argument("--json", help="also write the figures as JSON here")
    real.set_defaults(handler=_bench_real_size)


def _add_generate_command(commands: argparse._SubParsersAction) -> None:
    generate = commands.add_parser("generate", help="a PNG grid of one prompt over several seeds, optionally under a policy")
    generate.add_argument("--prompt", required=True, help='e.g. "a handwritten seven" for the embedded default model')
    generate.add_argument("--model-config", help=_MODEL_CONFIG_HELP)
    generate.add_argument("--steps", type=_positive_int, help="sampling steps (default: the block's, else 28)")
    generate.add_argument("--policy", help="a policy JSON to apply")
    generate.add_argument("--seed", type=int, default=0, help="first seed; the grid uses consecutive seeds")
    generate.add_argument("--images", type=_positive_int, default=8, help="images in the grid (default 8)")
    generate.add_argument("--out", required=True, help="PNG path")
    generate.set_defaults(handler=_generate)


def _add_check_model_command(commands: argparse._SubParsersAction) -> None:
    check = commands.add_parser("check-model", help="load your weights, run two steps, print time and memory per step")
    check.add_argument("--adapter", required=True, help="a registered adapter's name (an unknown one lists them)")
    check.add_argument("--weights", help="a local diffusers folder, a cached hub id, or `tiny` (random weights)")
    check.add_argument("--dtype", default="auto", help="auto (bfloat16 on a GPU, float32 on a CPU), float32, bfloat16")
    check.add_argument("--device", default="auto")
    check.add_argument("--offload", default="none", choices=["none", "model", "sequential"])
    check.add_argument("--height", type=_positive_int)
    check.add_argument("--width", type=_positive_int)
    check.add_argument("--num-frames", type=_positive_int, dest="num_frames")
    check.set_defaults(handler=_check_model)


def _add_train_command(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser("train-default-model", help="reproduce the shipped default model from scratch")
    train.add_argument("--out", required=True, help="folder for the weights, loss curve and report")
    train.add_argument("--steps", type=_positive_int, default=3000)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument(
        "--threads", type=_positive_int, default=2, help="torch threads (the shipped weights used 2; bits depend on it)"
    )
    train.set_defaults(handler=_train_default_model)


def _add_registry_commands(commands: argparse._SubParsersAction) -> None:
    """The MLflow registry's operations: promote, pull, history, verify."""
    promote = commands.add_parser("promote", help="move alias `production` if the version wins at every shared budget")
    promote.add_argument("--model", required=True, help="registered model name")
    promote.add_argument("--version", required=True)
    promote.add_argument("--force", action="store_true", help="promote even if the gate fails (needs --reason)")
    promote.add_argument("--reason", help="why a forced promotion is right; recorded as a tag")
    promote.add_argument("--allow-unverified", action="store_true", help=_UNVERIFIED_HELP)
    promote.set_defaults(handler=_promote)

    pull = commands.add_parser("pull", help="write a registered policy ladder to a folder, verified")
    pull.add_argument("--model", required=True, help="registered model name")
    pull.add_argument("--alias", default="production")
    pull.add_argument("--out", required=True)
    pull.add_argument("--fingerprint", help="refuse policies made for another model fingerprint")
    pull.add_argument("--steps", type=_positive_int, help="refuse policies made for another number of steps")
    pull.add_argument("--allow-unverified", action="store_true", help=_UNVERIFIED_HELP)
    pull.set_defaults(handler=_pull)

    history = commands.add_parser("history", help="every move of alias `production`: when, which version, by whom")
    history.add_argument("--model", required=True, help="registered model name")
    history.set_defaults(handler=_history)

    verify = commands.add_parser(
        "verify", help="audit a registered version against the registry's digests; writes nothing, exit 0/1"
    )
    verify.add_argument("--model", required=True, help="registered model name")
    which = verify.add_mutually_exclusive_group()
    which.add_argument("--alias", help="the alias to check (default production)")
    which.add_argument("--version", help="the version to check")
    verify.set_defaults(handler=_verify)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, RuntimeError, FileNotFoundError) as exc:
        print(f"budcache {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
