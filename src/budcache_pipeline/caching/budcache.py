"""Apply a fixed-budget cache policy to a diffusers transformer through `diffusers.hooks`.

On a compute step the block stack runs and its residual (output minus input, per
stream) is stored; on a cached step no block runs and the stack's output is its
input plus the stored residual, while the embedders, `norm_out` and `proj_out`
still run with the current timestep. Under a "linear" forecast the cached step adds
the residual extrapolated in sigma from the last two computed ones instead; a policy's
forecast gains (learned by schedule alignment) scale both terms per step. The
step index is found by matching the call's timestep against the schedule, so a caller that skips or repeats calls
cannot silently shift the mask.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks._common import _ALL_TRANSFORMER_BLOCK_IDENTIFIERS
from diffusers.hooks._helpers import TransformerBlockRegistry
from diffusers.hooks.hooks import CacheContext, StateManager

from budcache_pipeline.caching.runtime import BudCacheError, BudCacheRuntime, ContextState
from budcache_pipeline.forecast_gains import per_channel
from budcache_pipeline.policy import CachePolicy, model_fingerprint

ROOT_HOOK = "budcache_root"
BLOCK_HOOK = "budcache_block"
ROTARY_HOOK = "budcache_rotary"
# Rotary-embedding modules whose output only the transformer blocks read: on a cached step no block
# runs, so recomputing their tables is wasted (about a quarter of a cached step's cost on the bench model).
_ROTARY_CLASSES = ("FluxPosEmbed", "WanRotaryPosEmbed")
DEFAULT_CONTEXT = "default"
_RUNTIME_ATTR = "_budcache_runtime"


class _RootHook(ModelHook):
    """Reads the timestep of each transformer call and decides compute or reuse for it."""

    _is_stateful = True

    def __init__(self, runtime: BudCacheRuntime) -> None:
        super().__init__()
        self.runtime = runtime
        self.state_manager = runtime.state_manager
        self._own_context = False

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple[Any], dict[str, Any]]:
        self._own_context = self.state_manager._context is None
        if self._own_context:
            self.state_manager.set_context(CacheContext(DEFAULT_CONTEXT))
        timestep = kwargs.get("timestep")
        if timestep is None:
            raise BudCacheError("BudCache needs the transformer to be called with `timestep=` as a keyword")
        state: ContextState = self.state_manager.get_state()
        step = self.runtime.resolve_step(timestep, state.step)
        if step == 0:
            state.reset()
        elif state.residual_hidden is None and not self.runtime.mask[step]:
            raise BudCacheError(
                f"step {step} is cached but no step before it computed in context "
                f"'{self.state_manager.context.name}': start generations at the first sigma"
            )
        state.step = step
        state.sigma = self.runtime._current_schedule()[step]
        state.compute = self.runtime.mask[step]
        name = self.state_manager.context.name
        self.runtime.counts[name] = (0 if step == 0 else self.runtime.counts.get(name, 0)) + int(state.compute)
        return args, kwargs

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        if self._own_context:
            self.state_manager.set_context(None)
        return output

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.state_manager.reset()
        return module


class BlockStreamsHook(ModelHook):
    """One block's hook in a cache runtime: reads the block's image/text streams and builds its output tuple.

    Uses the block metadata diffusers' cache hooks register, so any block type those hooks know works.
    The head block (first) and tail block (last) of the stack are where caches inject and store.
    """

    def __init__(self, runtime: Any, is_head: bool, is_tail: bool) -> None:
        super().__init__()
        self.runtime = runtime
        self.state_manager: StateManager = runtime.state_manager
        self.is_head = is_head
        self.is_tail = is_tail
        self._metadata: Any = None

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        self._metadata = TransformerBlockRegistry.get(module.__class__)
        return module

    def _inputs(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        meta = self._metadata
        hidden = meta._get_parameter_from_args_kwargs(meta.hidden_states_argument_name, args, kwargs)
        encoder = None
        if meta.return_encoder_hidden_states_index is not None:
            encoder = meta._get_parameter_from_args_kwargs(meta.encoder_hidden_states_argument_name, args, kwargs)
        return hidden, encoder

    def _as_output(self, hidden: torch.Tensor, encoder: torch.Tensor | None) -> Any:
        meta = self._metadata
        if meta.return_encoder_hidden_states_index is None:
            return hidden
        output: list[Any] = [None, None]
        output[meta.return_hidden_states_index] = hidden
        output[meta.return_encoder_hidden_states_index] = encoder
        return tuple(output)

    def _split_output(self, output: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        meta = self._metadata
        if meta.return_encoder_hidden_states_index is None:
            return (output[meta.return_hidden_states_index] if isinstance(output, tuple) else output), None
        return output[meta.return_hidden_states_index], output[meta.return_encoder_hidden_states_index]


class _BlockHook(BlockStreamsHook):
    """Runs or skips one block; the first block injects cached output, the last stores residuals."""

    _is_stateful = True

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        state: ContextState = self.state_manager.get_state()
        hidden, encoder = self._inputs(args, kwargs)
        if state.compute:
            if self.is_head:
                state.head_hidden, state.head_encoder = hidden, encoder
            output = self.fn_ref.original_forward(*args, **kwargs)
            if self.is_tail:
                self._store(state, *self._split_output(output))
            return output
        if self.is_head:
            delta = self._since_residual(state, hidden)
            gains = self.runtime.gains_at(state.step)
            hidden = hidden + _forecast(state.residual_hidden, state.slope_hidden, delta, gains)
            if encoder is not None and state.residual_encoder is not None:
                encoder = encoder + _forecast(state.residual_encoder, state.slope_encoder, delta, gains)
        return self._as_output(hidden, encoder)

    def _store(self, state: ContextState, out_hidden: torch.Tensor, out_encoder: torch.Tensor | None) -> None:
        """Keep the stack's residuals (and, for a linear forecast, their slopes since the previous ones)."""
        hidden = out_hidden - state.head_hidden
        encoder = (
            out_encoder - state.head_encoder if out_encoder is not None and state.head_encoder is not None else None
        )
        if self.runtime.forecast == "linear":
            if state.residual_hidden is not None and state.residual_sigma is not None:
                delta = self._since_residual(state, hidden)
                state.slope_hidden = (hidden - state.residual_hidden) / delta
                state.slope_encoder = (
                    (encoder - state.residual_encoder) / delta
                    if encoder is not None and state.residual_encoder is not None
                    else None
                )
            state.residual_sigma = torch.full((hidden.shape[0],), state.sigma, dtype=hidden.dtype, device=hidden.device)
        state.residual_hidden, state.residual_encoder = hidden, encoder
        state.head_hidden = state.head_encoder = None

    @staticmethod
    def _since_residual(state: ContextState, like: torch.Tensor) -> torch.Tensor | None:
        """Current sigma minus the sigma each row's residual was computed at, shaped to broadcast."""
        if state.residual_sigma is None:
            return None
        return (state.sigma - state.residual_sigma).reshape(-1, *([1] * (like.dim() - 1)))

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.state_manager.reset()
        return module


class _RotaryHook(ModelHook):
    """Skips a rotary table on cached steps (only the skipped blocks read it) by returning the last one."""

    def __init__(self, runtime: BudCacheRuntime) -> None:
        super().__init__()
        self.state_manager = runtime.state_manager
        self.last: Any = None

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        if self.last is not None and self.state_manager._context is not None:
            if not self.state_manager.get_state().compute:
                return self.last
        self.last = self.fn_ref.original_forward(*args, **kwargs)
        return self.last

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.last = None
        return module


def rotary_modules(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer's rotary-embedding modules that only its blocks consume."""
    return [child for child in transformer.children() if type(child).__name__ in _ROTARY_CLASSES]


def _forecast(
    residual: torch.Tensor,
    slope: torch.Tensor | None,
    delta: torch.Tensor | None,
    gains: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """What a cached step adds: the residual, plus its slope times the sigma moved, each scaled by the step's gains."""
    if gains is not None:
        residual = residual * per_channel(gains[0], residual)
    if slope is None or delta is None:
        return residual
    if gains is not None:
        slope = slope * per_channel(gains[1], slope)
    return residual + delta * slope


def _transformer_and_scheduler(pipe_or_transformer: Any) -> tuple[torch.nn.Module, Any | None]:
    transformer = getattr(pipe_or_transformer, "transformer", None)
    if isinstance(transformer, torch.nn.Module):
        return transformer, getattr(pipe_or_transformer, "scheduler", None)
    if isinstance(pipe_or_transformer, torch.nn.Module):
        return pipe_or_transformer, None
    raise TypeError(f"expected a diffusers pipeline or transformer, got {type(pipe_or_transformer).__name__}")


def transformer_blocks(transformer: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The transformer's blocks in execution order, from the block lists diffusers' cache hooks know."""
    blocks = []
    for name, child in transformer.named_children():
        if name in _ALL_TRANSFORMER_BLOCK_IDENTIFIERS and isinstance(child, torch.nn.ModuleList):
            blocks.extend((f"{name}.{i}", block) for i, block in enumerate(child))
    if not blocks:
        raise TypeError(
            f"{type(transformer).__name__} has no block list that diffusers' cache hooks know "
            f"({sorted(_ALL_TRANSFORMER_BLOCK_IDENTIFIERS)})"
        )
    for name, block in blocks:
        try:
            TransformerBlockRegistry.get(block.__class__)
        except ValueError as exc:
            raise TypeError(f"block {name} ({type(block).__name__}) is not registered with diffusers' hooks") from exc
    return blocks


def enable_budcache(
    pipe_or_transformer: Any,
    policy: CachePolicy,
    check_fingerprint: bool = False,
) -> BudCacheRuntime:
    """Apply `policy` to a pipeline's transformer (or a bare transformer); returns the runtime handle.

    Given a pipeline, each generation is checked against the pipeline's live scheduler
    (number of steps and, when the policy carries them, its sigmas). Given a bare
    transformer, the policy must carry sigmas to match timesteps against.
    """
    transformer, scheduler = _transformer_and_scheduler(pipe_or_transformer)
    if get_runtime(transformer) is not None:
        raise BudCacheError("BudCache is already enabled on this transformer: call disable_budcache first")
    if scheduler is None and policy.sigmas is None:
        raise BudCacheError(
            "the policy has no sigmas and no pipeline scheduler was given: pass the pipeline, not its transformer"
        )
    if check_fingerprint:
        found = model_fingerprint(transformer)
        if found != policy.model_fingerprint:
            raise BudCacheError(
                f"policy was searched for model fingerprint {policy.model_fingerprint}, this transformer is {found}"
            )
    blocks = transformer_blocks(transformer)
    runtime = BudCacheRuntime(
        transformer,
        list(policy.mask),
        list(policy.sigmas) if policy.sigmas else None,
        scheduler,
        policy.forecast,
        policy.forecast_gains,
    )
    HookRegistry.check_if_exists_or_initialize(transformer).register_hook(_RootHook(runtime), ROOT_HOOK)
    for index, (_, block) in enumerate(blocks):
        hook = _BlockHook(runtime, is_head=index == 0, is_tail=index == len(blocks) - 1)
        HookRegistry.check_if_exists_or_initialize(block).register_hook(hook, BLOCK_HOOK)
    for module in rotary_modules(transformer):
        HookRegistry.check_if_exists_or_initialize(module).register_hook(_RotaryHook(runtime), ROTARY_HOOK)
    HookRegistry.check_if_exists_or_initialize(transformer).invalidate_child_registries_cache()
    setattr(transformer, _RUNTIME_ATTR, runtime)
    return runtime


def get_runtime(pipe_or_transformer: Any) -> BudCacheRuntime | None:
    """The runtime of an enabled policy, or None."""
    transformer, _ = _transformer_and_scheduler(pipe_or_transformer)
    return getattr(transformer, _RUNTIME_ATTR, None)


def _drop_empty_registry(module: torch.nn.Module) -> None:
    registry = getattr(module, "_diffusers_hook", None)
    if registry is None or registry.hooks:
        return
    del module._diffusers_hook
    forward = module.__dict__.get("forward")
    if getattr(forward, "__func__", None) is type(module).forward:
        del module.forward


def disable_budcache(pipe_or_transformer: Any) -> None:
    """Remove BudCache's hooks; the transformer is left as it was before `enable_budcache`."""
    transformer, _ = _transformer_and_scheduler(pipe_or_transformer)
    if get_runtime(transformer) is None:
        raise BudCacheError("BudCache is not enabled on this transformer")
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    registry.remove_hook(ROOT_HOOK, recurse=False)
    for _, block in transformer_blocks(transformer):
        HookRegistry.check_if_exists_or_initialize(block).remove_hook(BLOCK_HOOK, recurse=False)
        _drop_empty_registry(block)
    for module in rotary_modules(transformer):
        HookRegistry.check_if_exists_or_initialize(module).remove_hook(ROTARY_HOOK, recurse=False)
        _drop_empty_registry(module)
    registry.invalidate_child_registries_cache()
    _drop_empty_registry(transformer)
    delattr(transformer, _RUNTIME_ATTR)
