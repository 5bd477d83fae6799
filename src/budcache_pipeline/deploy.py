"""Deployment example: serve the production policy ladder at a requested budget.

A deployment job never searches. It pulls the ladder behind `models:/<name>@production`
(plain JSON whose checksums and schema are verified, never a pickle), picks the best
policy that fits the request's budget, checks that policy against the model it is about
to run (fingerprint, number of steps, schedule), enables it in one call and generates.
`python -m budcache_pipeline.deploy NAME BUDGET PROMPT OUT_DIR` runs the whole job.
"""

from __future__ import annotations

import argparse
import inspect
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from budcache_pipeline.caching import disable_budcache, enable_budcache
from budcache_pipeline.policy import CachePolicy, model_fingerprint
from budcache_pipeline.registry import PRODUCTION_ALIAS, RegistryError, load_ladder, pick_policy, pull
from budcache_pipeline.schedules import default_sigmas, image_seq_len, scheduler_input_sigmas

POLICIES_DIR = "policies"
_SCHEDULE_TOLERANCE = 1e-6


class DeploymentError(RuntimeError):
    """The pulled policy does not fit the model this job runs; the message says what differs."""


@dataclass(frozen=True)
class DeploymentPlan:
    """What a job will run: the chosen policy, its scheduler inputs and whether the schedule is learned."""

    policy: CachePolicy
    scheduler_sigmas: list[float] | None
    aligned_schedule: bool
    height: int
    width: int


def default_steps(pipe: Any) -> int:
    """The number of steps the pipeline runs when the caller names none (28 for FLUX and the digits model)."""
    return int(inspect.signature(pipe.__call__).parameters["num_inference_steps"].default)


def check_policy(pipe: Any, policy: CachePolicy, steps: int, height: int, width: int) -> DeploymentPlan:
    """Refuse a policy made for another model, step count or an unreproducible schedule.

    The registry already refuses fingerprint and step mismatches on pull; checking again
    here covers policies that reach a job by other routes (a file, a cache).
    """
    fingerprint = model_fingerprint(pipe.transformer)
    if policy.model_fingerprint != fingerprint:
        raise DeploymentError(
            f"policy for budget {policy.budget} was searched on model fingerprint {policy.model_fingerprint}, "
            f"this pipeline's transformer is {fingerprint}: pull the ladder registered for this model"
        )
    if policy.steps != steps:
        raise DeploymentError(
            f"policy has {policy.steps} steps, this job runs {steps}: pull the ladder for {steps} steps"
        )
    if policy.sigmas is None:
        return DeploymentPlan(policy, None, False, height, width)
    seq_len = image_seq_len(pipe, height, width)
    try:
        inputs = scheduler_input_sigmas(pipe.scheduler, list(policy.sigmas), seq_len)
    except ValueError as exc:
        raise DeploymentError(f"the policy's schedule cannot be run by this pipeline's scheduler: {exc}") from exc
    default = default_sigmas(pipe.scheduler, steps, seq_len)
    aligned = max(abs(a - b) for a, b in zip(policy.sigmas, default)) > _SCHEDULE_TOLERANCE
    return DeploymentPlan(policy, inputs, aligned, height, width)


def plan_deployment(
    model_name: str,
    budget: int,
    pipe: Any,
    out_dir: str | Path,
    *,
    alias: str = PRODUCTION_ALIAS,
    steps: int | None = None,
    height: int | None = None,
    width: int | None = None,
    tracking_uri: str | None = None,
) -> DeploymentPlan:
    """Pull the ladder behind `models:/<model_name>@<alias>` into `out_dir/policies`, pick the best
    policy for `budget` and check it against `pipe`."""
    steps = steps or default_steps(pipe)
    height = height or pipe.default_sample_size * pipe.vae_scale_factor
    width = width or pipe.default_sample_size * pipe.vae_scale_factor
    policy_dir = Path(out_dir) / POLICIES_DIR
    pull(
        model_name,
        alias,
        policy_dir,
        expect_fingerprint=model_fingerprint(pipe.transformer),
        expect_steps=steps,
        tracking_uri=tracking_uri,
    )
    policy = pick_policy(load_ladder(policy_dir), budget)
    return check_policy(pipe, policy, steps, height, width)


def generate(pipe: Any, plan: DeploymentPlan, prompt: str, seed: int = 0) -> Any:
    """One image under the plan's policy; the pipeline is left without hooks afterwards."""
    enable_budcache(pipe, plan.policy, check_fingerprint=True)
    try:
        return pipe(
            prompt,
            num_inference_steps=plan.policy.steps,
            sigmas=plan.scheduler_sigmas,
            height=plan.height,
            width=plan.width,
            generator=torch.Generator(device="cpu").manual_seed(seed),
            output_type="pil",
        ).images[0]
    finally:
        disable_budcache(pipe)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48] or "prompt"


def deploy_and_generate(
    model_name: str,
    budget: int,
    prompt: str,
    out_dir: str | Path,
    alias: str = PRODUCTION_ALIAS,
    tracking_uri: str | None = None,
    *,
    pipe: Any = None,
    steps: int | None = None,
    seed: int = 0,
) -> Path:
    """The whole deployment job: pull, pick, check, enable, generate. Returns the image's path.

    `pipe` defaults to the embedded digits model; `steps` to the pipeline's default.
    """
    if pipe is None:
        from budcache_pipeline.models import load_default_pipeline

        pipe = load_default_pipeline()
    out_dir = Path(out_dir)
    plan = plan_deployment(
        model_name, budget, pipe, out_dir, alias=alias, steps=steps, tracking_uri=tracking_uri
    )
    image = generate(pipe, plan, prompt, seed)
    path = out_dir / f"{_slug(prompt)}_budget{plan.policy.budget}_seed{seed}.png"
    image.save(path)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_name", help="registered model, e.g. budcache-digits-28steps")
    parser.add_argument("budget", type=int, help="compute steps this request may use")
    parser.add_argument("prompt")
    parser.add_argument("out_dir")
    parser.add_argument("--alias", default=PRODUCTION_ALIAS)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        path = deploy_and_generate(
            args.model_name, args.budget, args.prompt, args.out_dir, args.alias, steps=args.steps, seed=args.seed
        )
    except (RegistryError, DeploymentError) as exc:
        parser.exit(1, f"refused: {exc}\n")
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
