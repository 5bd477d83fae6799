"""TeaCache through `diffusers.hooks`, with per-sample decisions and a rescaling polynomial fitted per model.

TeaCache accumulates a rescaled relative-L1 change of the first block's modulated
input and recomputes the block stack when the sum passes a threshold. The published
code decides once per batch; here every sample of a batch keeps its own accumulator,
counter and cached residual, so a batched calibration gives exactly the per-image
decisions (and compute counts) that batch-1 generation would. Batches where only
some samples compute still run the stack for all of them: batching is for
calibration throughput, per-image wall time is measured at batch 1.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from diffusers.hooks import HookRegistry
from diffusers.hooks._helpers import TransformerBlockRegistry
from diffusers.hooks.hooks import BaseState, StateManager

from budcache_pipeline.caching.budcache import BlockStreamsHook, transformer_blocks

TEACACHE_HOOK = "budcache_teacache"
_RUNTIME_ATTR = "_budcache_teacache_runtime"

# TeaCache's published polynomial for FLUX.1 (highest power first): maps the modulated-input change
# to the expected output change.
FLUX_TEACACHE_COEFFICIENTS: tuple[float, ...] = (
    4.98651651e02,
    -2.83781631e02,
    5.58554382e01,
    -3.82021401e00,
    2.64230861e-01,
)

ModulatedInput = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def flux_modulated_input(block: torch.nn.Module, hidden: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
    """FLUX's TeaCache signal: the first block's AdaLN-modulated image stream, `norm1(h, emb=temb)[0]`."""
    norm1 = getattr(block, "norm1", None)
    if norm1 is None:
        raise TypeError(
            f"{type(block).__name__} has no `norm1`: pass `modulated_input=` that computes TeaCache's signal "
            "for this architecture"
        )
    return norm1(hidden, emb=temb)[0]


def relative_l1(current: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """Per-sample mean |current - previous| / mean |previous|, in float64."""
    current, previous = current.double().flatten(1), previous.double().flatten(1)
    return (current - previous).abs().mean(dim=1) / previous.abs().mean(dim=1).clamp_min(1e-12)


def _polyval(coefficients: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    result = torch.zeros_like(x)
    for c in coefficients:
        result = result * x + c
    return result


@dataclass(frozen=True)
class TeaCacheConfig:
    """Threshold on the accumulated rescaled change; the first and last of `num_inference_steps` always compute."""

    threshold: float
    num_inference_steps: int
    coefficients: tuple[float, ...] = FLUX_TEACACHE_COEFFICIENTS

    def __post_init__(self) -> None:
        if not np.isfinite(self.threshold) or self.threshold < 0:
            raise ValueError(f"TeaCache threshold must be a finite number >= 0, got {self.threshold}")
        if self.num_inference_steps < 2:
            raise ValueError(f"TeaCache needs at least 2 steps, got {self.num_inference_steps}")
        if not self.coefficients or not all(np.isfinite(c) for c in self.coefficients):
            raise ValueError("TeaCache coefficients must be a non-empty list of finite numbers")
        object.__setattr__(self, "coefficients", tuple(float(c) for c in self.coefficients))


class _TeaState(BaseState):
    """One cache context's rollout: step counter and per-sample accumulators, residuals and decisions."""

    def __init__(self) -> None:
        self.reset()

    def reset(self, *args: Any, **kwargs: Any) -> None:
        self.step = 0
        self.accumulated: torch.Tensor | None = None
        self.previous_modulated: torch.Tensor | None = None
        self.compute: torch.Tensor | None = None
        self.residual_hidden: torch.Tensor | None = None
        self.residual_encoder: torch.Tensor | None = None
        self.head_hidden: torch.Tensor | None = None
        self.head_encoder: torch.Tensor | None = None


class TeaCacheRuntime:
    """Handle on enabled TeaCache: its config (the threshold can be changed between rollouts) and counts."""

    def __init__(self, transformer: torch.nn.Module, config: TeaCacheConfig, modulated_input: ModulatedInput) -> None:
        self.transformer = transformer
        self.config = config
        self.modulated_input = modulated_input
        self.state_manager = StateManager(_TeaState)
        self.counts: dict[str, torch.Tensor] = {}
        self.decisions: dict[str, list[torch.Tensor]] = {}

    def compute_counts(self) -> dict[str, torch.Tensor]:
        """Per-sample block-stack computations per cache context, for the latest rollout in that context."""
        return {name: count.clone() for name, count in self.counts.items()}

    def step_decisions(self, context: str = "cond") -> torch.Tensor:
        """(steps, batch) booleans of the latest rollout in `context`: which samples computed on which step."""
        if context not in self.decisions:
            raise KeyError(f"no rollout recorded in cache context {context!r} (have {sorted(self.decisions)})")
        return torch.stack(self.decisions[context])

    def reset(self) -> None:
        self.state_manager.reset()
        self.counts.clear()
        self.decisions.clear()

    def decide(self, state: _TeaState, modulated: torch.Tensor) -> torch.Tensor:
        """Advance one step and return which samples compute the block stack on it."""
        step, batch = state.step, modulated.shape[0]
        last = self.config.num_inference_steps - 1
        if step == 0 or state.previous_modulated is None or state.previous_modulated.shape != modulated.shape:
            if step != 0:
                raise RuntimeError(
                    f"TeaCache is at step {step} with no state for this batch: start every rollout at step 0 "
                    f"and run exactly num_inference_steps={self.config.num_inference_steps} calls"
                )
            compute = torch.ones(batch, dtype=torch.bool)
            state.accumulated = torch.zeros(batch, dtype=torch.float64)
        elif step == last:
            compute = torch.ones(batch, dtype=torch.bool)
        else:
            coefficients = torch.tensor(self.config.coefficients, dtype=torch.float64)
            change = relative_l1(modulated, state.previous_modulated).cpu()
            state.accumulated = state.accumulated + _polyval(coefficients, change)
            compute = state.accumulated >= self.config.threshold
        state.accumulated = torch.where(compute, torch.zeros_like(state.accumulated), state.accumulated)
        state.previous_modulated = modulated.detach()
        name = self.state_manager.context.name
        if step == 0:
            self.counts[name] = torch.zeros(batch, dtype=torch.long)
            self.decisions[name] = []
        self.counts[name] = self.counts[name] + compute
        self.decisions[name].append(compute)
        state.step = 0 if step == last else step + 1
        return compute.to(modulated.device)


class _TeaBlockHook(BlockStreamsHook):
    """Head: decides per sample and injects cached residuals; tail: stores fresh residuals per sample."""

    _is_stateful = True

    @staticmethod
    def _merge(compute: torch.Tensor, fresh: torch.Tensor, cached: torch.Tensor | None) -> torch.Tensor:
        if cached is None or bool(compute.all()):
            return fresh
        return torch.where(compute.view(-1, *([1] * (fresh.ndim - 1))), fresh, cached)

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        state: _TeaState = self.state_manager.get_state()
        hidden, encoder = self._inputs(args, kwargs)
        if self.is_head:
            temb = self._metadata._get_parameter_from_args_kwargs("temb", args, kwargs)
            state.compute = self.runtime.decide(state, self.runtime.modulated_input(module, hidden, temb))
            state.head_hidden, state.head_encoder = hidden, encoder
        compute = state.compute
        if not bool(compute.any()):
            if self.is_head:
                hidden = hidden + state.residual_hidden
                if encoder is not None and state.residual_encoder is not None:
                    encoder = encoder + state.residual_encoder
            return self._as_output(hidden, encoder)
        output = self.fn_ref.original_forward(*args, **kwargs)
        if not self.is_tail:
            return output
        out_hidden, out_encoder = self._split_output(output)
        state.residual_hidden = self._merge(compute, out_hidden - state.head_hidden, state.residual_hidden)
        out_hidden = self._merge(compute, out_hidden, state.head_hidden + state.residual_hidden)
        if out_encoder is not None and state.head_encoder is not None:
            state.residual_encoder = self._merge(compute, out_encoder - state.head_encoder, state.residual_encoder)
            out_encoder = self._merge(compute, out_encoder, state.head_encoder + state.residual_encoder)
        state.head_hidden = state.head_encoder = None
        return self._as_output(out_hidden, out_encoder) if isinstance(output, tuple) else out_hidden

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.runtime.reset()
        return module


def enable_teacache(
    transformer: torch.nn.Module,
    config: TeaCacheConfig,
    modulated_input: ModulatedInput = flux_modulated_input,
) -> TeaCacheRuntime:
    """Register TeaCache's hooks on the transformer's blocks; calls must be wrapped in `cache_context`."""
    if get_teacache(transformer) is not None:
        raise RuntimeError("TeaCache is already enabled on this transformer: call disable_teacache first")
    blocks = transformer_blocks(transformer)
    runtime = TeaCacheRuntime(transformer, config, modulated_input)
    for index, (_, block) in enumerate(blocks):
        hook = _TeaBlockHook(runtime, is_head=index == 0, is_tail=index == len(blocks) - 1)
        HookRegistry.check_if_exists_or_initialize(block).register_hook(hook, TEACACHE_HOOK)
    HookRegistry.check_if_exists_or_initialize(transformer).invalidate_child_registries_cache()
    setattr(transformer, _RUNTIME_ATTR, runtime)
    return runtime


def get_teacache(transformer: torch.nn.Module) -> TeaCacheRuntime | None:
    return getattr(transformer, _RUNTIME_ATTR, None)


def disable_teacache(transformer: torch.nn.Module) -> None:
    """Remove TeaCache's hooks and leave the blocks' forward as it was."""
    if get_teacache(transformer) is None:
        raise RuntimeError("TeaCache is not enabled on this transformer")
    for _, block in transformer_blocks(transformer):
        registry = HookRegistry.check_if_exists_or_initialize(block)
        registry.remove_hook(TEACACHE_HOOK, recurse=False)
        if not registry.hooks:
            del block._diffusers_hook
            if getattr(block.__dict__.get("forward"), "__func__", None) is type(block).forward:
                del block.forward
    HookRegistry.check_if_exists_or_initialize(transformer).invalidate_child_registries_cache()
    delattr(transformer, _RUNTIME_ATTR)


@dataclass(frozen=True)
class StackChanges:
    """Step-to-step changes along uncached rollouts, for fitting TeaCache and calibrating MagCache.

    `input_change[t-1, b]`: relative L1 change of the modulated input from step t-1 to t;
    `residual_change[t-1, b]`: the same for the block stack's image-stream residual;
    `magnitude_ratio[t-1]`: MagCache's mean over samples and tokens of |r_t| / |r_{t-1}|.
    """

    input_change: np.ndarray
    residual_change: np.ndarray
    magnitude_ratio: np.ndarray


@dataclass
class _StackRecorder:
    modulated_input: ModulatedInput
    inputs: list[torch.Tensor] = field(default_factory=list)
    modulated: list[torch.Tensor] = field(default_factory=list)
    residuals: list[torch.Tensor] = field(default_factory=list)

    def before_head(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        meta = TransformerBlockRegistry.get(module.__class__)
        hidden = meta._get_parameter_from_args_kwargs(meta.hidden_states_argument_name, args, kwargs)
        temb = meta._get_parameter_from_args_kwargs("temb", args, kwargs)
        self.inputs.append(hidden.detach())
        self.modulated.append(self.modulated_input(module, hidden, temb).detach())

    def after_tail(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        meta = TransformerBlockRegistry.get(module.__class__)
        hidden = output[meta.return_hidden_states_index] if isinstance(output, tuple) else output
        self.residuals.append((hidden - self.inputs[-1]).detach())


def trace_stack_changes(
    denoiser: Any,
    noise: torch.Tensor,
    sigmas: Any,
    modulated_input: ModulatedInput = flux_modulated_input,
) -> StackChanges:
    """Run an uncached rollout of the batch and measure how the stack's input and residual change per step."""
    from budcache_pipeline.sampling import rollout

    blocks = transformer_blocks(denoiser.transformer)
    head, tail = blocks[0][1], blocks[-1][1]
    recorder = _StackRecorder(modulated_input)
    handles = [
        head.register_forward_pre_hook(recorder.before_head, with_kwargs=True),
        tail.register_forward_hook(recorder.after_tail, with_kwargs=True),
    ]
    try:
        with torch.no_grad():
            rollout(denoiser, None, noise, sigmas)
    finally:
        for handle in handles:
            handle.remove()
    inputs, residuals = recorder.modulated, recorder.residuals
    if len(inputs) < 2 or len(inputs) != len(residuals):
        raise RuntimeError("the rollout did not run the block stack once per step: is another cache enabled?")
    input_change = torch.stack([relative_l1(inputs[t], inputs[t - 1]) for t in range(1, len(inputs))])
    residual_change = torch.stack([relative_l1(residuals[t], residuals[t - 1]) for t in range(1, len(residuals))])
    ratio = torch.stack(
        [
            (
                torch.linalg.norm(residuals[t].float(), dim=-1)
                / (torch.linalg.norm(residuals[t - 1].float(), dim=-1) + 1e-8)
            ).mean()
            for t in range(1, len(residuals))
        ]
    )
    return StackChanges(input_change.numpy(), residual_change.numpy(), ratio.double().numpy())


@dataclass(frozen=True)
class TeaCacheFit:
    """A fitted rescaling polynomial (highest power first) and the points it was fitted to."""

    coefficients: tuple[float, ...]
    input_change: np.ndarray
    residual_change: np.ndarray

    @property
    def r_squared(self) -> float:
        predicted = np.polyval(self.coefficients, self.input_change)
        total = np.sum((self.residual_change - self.residual_change.mean()) ** 2)
        return float(1.0 - np.sum((self.residual_change - predicted) ** 2) / max(total, 1e-30))


def fit_teacache_coefficients(changes: StackChanges, degree: int = 4) -> TeaCacheFit:
    """Fit residual change as a polynomial of input change (TeaCache's calibration), by least squares."""
    x, y = changes.input_change.ravel(), changes.residual_change.ravel()
    if len(x) <= degree:
        raise ValueError(f"need more than {degree} (step, sample) points to fit a degree-{degree} polynomial")
    coefficients = np.polyfit(x, y, degree)
    return TeaCacheFit(tuple(float(c) for c in coefficients), x, y)
