"""Deployment example: serve the production policy ladder at a requested budget.

A deployment job never searches. It pulls the ladder behind `models:/<name>@production`
(plain JSON whose checksums and schema are verified, never a pickle), picks the best
policy that fits the request's budget, checks that policy against the model it is about
to run (fingerprint, number of steps, schedule), enables it in one call and generates.
`python -m budcache_pipeline.deploy NAME BUDGET PROMPT OUT_DIR` runs the whole job.
"""

from __future__ import annotations

import argparse
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from budcache_pipeline.caching import disable_budcache, enable_budcache
from budcache_pipeline.models.adapter import ModelSpecError, Size
from budcache_pipeline.models.spec import ModelSpec, load_adapter, read_model_block
from budcache_pipeline.policy import CachePolicy, model_fingerprint, weights_mismatch
from budcache_pipeline.registry import PRODUCTION_ALIAS, RegistryError, load_ladder, pick_policy, pull

POLICIES_DIR = "policies"
logger = logging.getLogger(__name__)
_SCHEDULE_TOLERANCE = 1e-6


class DeploymentError(RuntimeError):
    """The pulled policy does not fit the model this job runs; the message says what differs."""


@dataclass(frozen=True)
class DeploymentPlan:
    """What a job will run: the chosen policy, the pipeline's schedule inputs and whether the schedule is learned."""

    policy: CachePolicy
    schedule_kwargs: dict[str, Any]
    aligned_schedule: bool
    size: Size


def check_policy(
    adapter: Any, policy: CachePolicy, steps: int, size: Size, allow_other_weights: bool = False
) -> DeploymentPlan:
    """Refuse a policy made for another model, other weights, step count or an unreproducible schedule.

    The registry already refuses fingerprint and step mismatches on pull; checking again
    here covers policies that reach a job by other routes (a file, a cache). A policy
    searched on other weights of the same architecture (a fine-tune, a fused LoRA) is
    refused unless `allow_other_weights`, and then logged.
    """
    fingerprint = model_fingerprint(adapter.transformer)
    if policy.model_fingerprint != fingerprint:
        raise DeploymentError(
            f"policy for budget {policy.budget} was searched on model fingerprint {policy.model_fingerprint}, "
            f"this pipeline's transformer is {fingerprint}: pull the ladder registered for this model"
        )
    mismatch = weights_mismatch(policy, adapter.transformer)
    if mismatch and not allow_other_weights:
        raise DeploymentError(f"{mismatch}, or pass --allow-other-weights to serve it anyway")
    if mismatch:
        logger.warning("serving budget %d on other weights (allowed): %s", policy.budget, mismatch)
    if policy.steps != steps:
        raise DeploymentError(
            f"policy has {policy.steps} steps, this job runs {steps}: pull the ladder for {steps} steps"
        )
    default = adapter.default_sigmas(steps, size)
    sigmas = list(policy.sigmas) if policy.sigmas is not None else default
    try:
        kwargs = adapter.schedule_kwargs(sigmas, size)
    except (ValueError, ModelSpecError) as exc:
        raise DeploymentError(f"the policy's schedule cannot be run by this pipeline's scheduler: {exc}") from exc
    aligned = max(abs(a - b) for a, b in zip(sigmas, default)) > _SCHEDULE_TOLERANCE
    return DeploymentPlan(policy, kwargs, aligned, size)


def plan_deployment(
    model_name: str,
    budget: int,
    adapter: Any,
    out_dir: str | Path,
    steps: int,
    size: Size,
    *,
    alias: str = PRODUCTION_ALIAS,
    tracking_uri: str | None = None,
    allow_other_weights: bool = False,
    allow_unverified: bool = False,
) -> DeploymentPlan:
    """Pull the ladder behind `models:/<model_name>@<alias>` into `out_dir/policies`, pick the best
    policy for `budget` and check it against the adapter's model (`allow_unverified`: accept a version
    registered without file digests, with a warning, as `budcache pull --allow-unverified` does)."""
    policy_dir = Path(out_dir) / POLICIES_DIR
    pull(
        model_name,
        alias,
        policy_dir,
        expect_fingerprint=model_fingerprint(adapter.transformer),
        expect_steps=steps,
        tracking_uri=tracking_uri,
        allow_unverified=allow_unverified,
    )
    policy = pick_policy(load_ladder(policy_dir), budget)
    return check_policy(adapter, policy, steps, size, allow_other_weights)


def generate(adapter: Any, plan: DeploymentPlan, prompts: Sequence[str], seed: int = 0) -> torch.Tensor:
    """Images (or videos) in [0, 1] from the stock pipeline under the plan's policy, one seed per prompt."""
    seeds = [seed + k for k in range(len(prompts))]
    return run_pipeline(adapter, prompts, seeds, plan.size, plan.schedule_kwargs, plan.policy)[0]


def run_pipeline(
    adapter: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    size: Size,
    schedule_kwargs: dict[str, Any],
    policy: CachePolicy | None = None,
) -> tuple[torch.Tensor, int]:
    """The stock pipeline's images (or videos) in [0, 1], under `policy` when one is given, and how many
    steps computed the block stack (counted by the cache hooks; every step without a policy).

    Each sample's noise comes from its own seed, exactly as the reference stage draws it; hooks are
    removed afterwards.
    """
    pipe = adapter.pipe
    conditioning, noise = adapter.prepare(list(prompts), list(seeds), size)
    runtime = enable_budcache(pipe, policy, check_fingerprint=True) if policy is not None else None
    try:
        with torch.no_grad():
            latents = pipe(
                **adapter.pipeline_inputs(conditioning, noise, size),
                **schedule_kwargs,
                output_type="latent",
                return_dict=False,
            )[0]
    finally:
        if runtime is not None:
            disable_budcache(pipe)
    computed = max(runtime.compute_counts().values()) if runtime else schedule_kwargs["num_inference_steps"]
    return adapter.decode(latents, size).cpu(), computed


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48] or "prompt"


def save_image(images: torch.Tensor, path: Path) -> Path:
    """The first image as a PNG; a video's frames side by side."""
    from PIL import Image

    from budcache_pipeline.reporting import as_picture

    image = as_picture(images[0])
    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(path)
    return path


def deploy_and_generate(
    model_name: str,
    budget: int,
    prompt: str,
    out_dir: str | Path,
    alias: str = PRODUCTION_ALIAS,
    tracking_uri: str | None = None,
    *,
    model: dict[str, Any] | None = None,
    seed: int = 0,
    allow_other_weights: bool = False,
    allow_unverified: bool = False,
) -> Path:
    """The whole deployment job: load the model, pull, pick, check, enable, generate. Returns the image's path.

    `model` is a `model:` block (see conf/base/parameters.yml); the embedded default model
    at its shipped 28 steps when omitted.
    """
    spec = ModelSpec.from_params(model or {"steps": 28})
    adapter = load_adapter(spec)
    size, steps = spec.output_size(adapter), spec.steps or 28
    out_dir = Path(out_dir)
    plan = plan_deployment(
        model_name, budget, adapter, out_dir, steps, size, alias=alias, tracking_uri=tracking_uri,
        allow_other_weights=allow_other_weights, allow_unverified=allow_unverified,
    )
    images = generate(adapter, plan, [prompt], seed)
    return save_image(images, out_dir / f"{_slug(prompt)}_budget{plan.policy.budget}_seed{seed}.png")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_name", help="registered model name (the register stage prints it)")
    parser.add_argument("budget", type=int, help="compute steps this request may use")
    parser.add_argument("prompt")
    parser.add_argument("out_dir")
    parser.add_argument("--alias", default=PRODUCTION_ALIAS)
    parser.add_argument("--model-config", default=None,
                        help="a YAML file whose `model:` block names the adapter, weights, size and steps "
                             "(default: the embedded model at 28 steps)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--allow-other-weights", action="store_true",
                        help="serve a policy searched on other weights of the same architecture (logged)")
    parser.add_argument("--allow-unverified", action="store_true",
                        help="accept a version registered without file digests in the registry database (logged)")
    args = parser.parse_args(argv)
    try:
        model = read_model_block(args.model_config) if args.model_config else None
        path = deploy_and_generate(
            args.model_name, args.budget, args.prompt, args.out_dir, args.alias, model=model, seed=args.seed,
            allow_other_weights=args.allow_other_weights, allow_unverified=args.allow_unverified,
        )
    except (RegistryError, DeploymentError, ModelSpecError) as exc:
        parser.exit(1, f"refused: {exc}\n")
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
