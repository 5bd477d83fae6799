"""Every adapter: the search's rollouts are what the stock diffusers pipeline computes under the policy.

Tiny random-weight models of the real classes (FluxPipeline, WanPipeline with its UniPC
scheduler and true guidance, StableDiffusion3Pipeline with batched guidance), float32 on CPU.
"""

from __future__ import annotations

import pytest
import torch

from budcache_pipeline import CachePolicy, disable_budcache, enable_budcache
from budcache_pipeline.evaluation import ComputeCounter
from budcache_pipeline.models.adapter import ADAPTERS, ModelSpecError, adapter_class
from budcache_pipeline.models.spec import ModelSpec, load_adapter
from budcache_pipeline.policy import model_fingerprint
from budcache_pipeline.search import MaskObjective, compute_reference
from budcache_pipeline.solvers import SchedulerSolver

STEPS = 8
PROMPTS = ["a red fox", "a blue bird", "a green frog"]
SEEDS = [3, 4, 5]
MASKS = [
    [True, False, True, False, False, True, False, True],
    [True, True, False, False, True, False, False, False],
    [True, False, False, True, True, False, True, False],
]
TINY = ("flux", "wan", "sd3")


@pytest.fixture(scope="module", params=TINY)
def adapter(request):
    adapter = load_adapter({"adapter": request.param, "weights": "tiny", "device": "cpu"})
    adapter.pipe.set_progress_bar_config(disable=True)
    return adapter


@pytest.fixture(scope="module")
def reference(adapter):
    return compute_reference(adapter, PROMPTS, SEEDS, STEPS, adapter.tiny_size, progress=False)


def stock_pipeline(adapter, reference, policy: CachePolicy | None) -> tuple[torch.Tensor, dict[str, int], int]:
    """Final latents of the stock pipeline (under `policy` when given), its runtime counts and block-stack runs."""
    size = reference.size
    conditioning = reference.conditioning
    runtime = enable_budcache(adapter.pipe, policy) if policy is not None else None
    try:
        with torch.no_grad(), ComputeCounter(adapter.transformer) as counter:
            output = adapter.pipe(
                **adapter.pipeline_inputs(conditioning, reference.noise, size),
                **adapter.schedule_kwargs(reference.sigmas, size),
                output_type="latent",
                return_dict=False,
            )[0]
        counts = runtime.compute_counts() if runtime is not None else {}
    finally:
        if policy is not None:
            disable_budcache(adapter.pipe)
    return output, counts, counter.full_stack


def policy_for(adapter, reference, mask, forecast="reuse") -> CachePolicy:
    return CachePolicy(
        mask=mask,
        model_name=adapter.name,
        model_fingerprint=model_fingerprint(adapter.transformer),
        sigmas=reference.sigmas,
        forecast=forecast,
    )


def test_every_built_in_adapter_is_registered_by_name():
    for name in ("digits", *TINY):
        assert adapter_class(name).name == name
    assert set(TINY) <= set(ADAPTERS)
    with pytest.raises(ModelSpecError, match="unknown model adapter 'mochi'"):
        adapter_class("mochi")


def test_a_full_budget_policy_equals_the_uncached_pipeline_exactly(adapter, reference):
    uncached, _, stacks = stock_pipeline(adapter, reference, None)
    assert stacks == STEPS * len(adapter.contexts)
    full, counts, _ = stock_pipeline(adapter, reference, policy_for(adapter, reference, [True] * STEPS))
    assert torch.equal(full, uncached)
    assert counts == {name: STEPS for name in counts} and len(counts) == len(adapter.contexts)
    assert (uncached - reference.final).abs().max().item() <= 1e-5, "the reference is the stock pipeline's output"


@pytest.mark.parametrize("forecast", ["reuse", "linear"])
def test_the_searched_rollout_of_a_mask_equals_the_stock_pipeline_under_the_policy(adapter, reference, forecast):
    objective = MaskObjective(adapter, reference, forecast=forecast)
    for mask in MASKS:
        ours = objective.final_latents(mask)
        stock, counts, stacks = stock_pipeline(adapter, reference, policy_for(adapter, reference, mask, forecast))
        assert (stock - ours).abs().max().item() <= 1e-5
        budget = sum(mask)
        assert sum(counts.values()) == budget * len(adapter.contexts), "each compute step runs every context"
        assert stacks == budget * len(adapter.contexts), "block stacks really run: budget x contexts"


def test_batched_candidates_and_prefix_resumes_equal_one_rollout_each(adapter, reference):
    batched = MaskObjective(adapter, reference, max_cached_states=256, forecast="linear")
    single = MaskObjective(adapter, reference, max_cached_states=0, forecast="linear")
    masks = MASKS + [MASKS[0][:5] + [True, True, False]]
    losses = batched.evaluate_many(masks)
    assert batched.stats["block_stack_calls"] < batched.stats["block_stack_calls_naive"], "prefixes were shared"
    for mask, loss in zip(masks, losses):
        assert loss == pytest.approx(single(mask), rel=1e-5)


def test_wan_steps_with_its_own_multistep_scheduler_and_two_contexts():
    wan = load_adapter({"adapter": "wan", "weights": "tiny", "device": "cpu"})
    assert wan.contexts == ("cond", "uncond") and wan.calls_per_step == 2
    assert isinstance(wan.solver(wan.default_sigmas(STEPS, wan.tiny_size)), SchedulerSolver)
    with pytest.raises(ModelSpecError, match="4k \\+ 1"):
        wan.prepare(["a"], [0], type(wan.tiny_size)(32, 32, 6))
    unguided = load_adapter({"adapter": "wan", "weights": "tiny", "device": "cpu", "guidance_scale": 1.0})
    assert unguided.contexts == ("cond",)


def test_a_policy_with_another_schedule_is_refused_by_wan():
    wan = load_adapter({"adapter": "wan", "weights": "tiny", "device": "cpu"})
    sigmas = wan.default_sigmas(STEPS, wan.tiny_size)
    other = [sigmas[0]] + [s * 0.9 for s in sigmas[1:]]
    with pytest.raises(ModelSpecError, match="takes no `sigmas=`"):
        wan.schedule_kwargs(other, wan.tiny_size)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"adapter": "flux", "weights": "tiny", "dtype": "bfloat16", "device": "cpu"}, "set model.dtype to float32"),
        ({"adapter": "flux", "weights": "./no/such/folder"}, "is not a folder"),
        ({"adapter": "flux", "weights": "tiny", "offload": "model", "device": "cpu"}, "offload: none on a CPU"),
        ({"adapter": "flux", "weights": "tiny", "offload": "disk"}, "not one of"),
        ({"adapter": "flux", "wieghts": "tiny"}, "unknown model settings \\['wieghts'\\]"),
        ({"adapter": "flux", "steps": 0}, "at least 1"),
        ({"adapter": "flux", "steps": -4}, "model.steps must be at least 1, got -4"),
    ],
)
def test_bad_model_settings_name_the_field_and_the_fix(params, message):
    with pytest.raises(ModelSpecError, match=message):
        load_adapter(params)


def test_weights_of_another_architecture_are_a_clear_error(tmp_path):
    tiny = load_adapter({"adapter": "sd3", "weights": "tiny", "device": "cpu"})
    tiny.pipe.save_pretrained(tmp_path / "sd3")
    with pytest.raises(ModelSpecError, match="hold a StableDiffusion3Pipeline.*set model.adapter"):
        load_adapter(ModelSpec(adapter="flux", weights=str(tmp_path / "sd3"), device="cpu"))


def test_a_saved_tiny_pipeline_loads_from_its_folder_with_the_same_fingerprint(tmp_path):
    tiny = load_adapter({"adapter": "flux", "weights": "tiny", "device": "cpu"})
    tiny.pipe.save_pretrained(tmp_path / "flux")
    loaded = load_adapter({"adapter": "flux", "weights": str(tmp_path / "flux"), "device": "cpu"})
    assert model_fingerprint(loaded.transformer) == model_fingerprint(tiny.transformer)
    with pytest.raises(ModelSpecError, match="has no text encoder"):
        loaded.prepare(["a"], [0], loaded.tiny_size)


def test_evaluation_counts_steps_and_transformer_calls_apart(adapter, reference):
    from budcache_pipeline.baselines import FixedPolicy
    from budcache_pipeline.evaluation import RolloutSet, run_method

    data = RolloutSet.from_reference(adapter, reference)
    run = run_method(FixedPolicy(MASKS[0]), data)
    assert (run.compute_steps == sum(MASKS[0])).all()
    assert (run.block_stack_runs == sum(MASKS[0]) * adapter.calls_per_step).all()
