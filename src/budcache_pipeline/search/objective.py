"""The search objective: mean final-latent loss of a cached rollout against the teacher, made cheap.

The search evaluates thousands of masks that differ from each other in one or two
positions. Three things keep that affordable without changing a single number:
every calibration pair runs in one batched forward; losses are memoised by mask;
and the state after each step (latent plus stored residuals) is kept per mask
prefix in a bounded LRU, so a candidate resumes from its longest known prefix and
only reruns the steps after its first difference. Resuming is exact: the state
after step k depends only on the first k mask entries.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from budcache_pipeline.caching import BudCacheRuntime, ContextSnapshot, disable_budcache, enable_budcache, get_runtime
from budcache_pipeline.forecast_gains import ForecastGains
from budcache_pipeline.policy import CachePolicy, check_forecast, model_fingerprint
from budcache_pipeline.sampling import RolloutState
from budcache_pipeline.solvers import SolverState, euler_step, split_state, stack_states
from budcache_pipeline.search.candidate_batch import split_cache, stack_caches
from budcache_pipeline.search.distributed import Shard
from budcache_pipeline.search.prefix_store import PrefixStore
from budcache_pipeline.search.reference import ReferenceSetError, ReferenceSet, check_uncached

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
_TEACHER_RELATIVE_TOLERANCE = 1e-3


def latent_mse_per_sample(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error over all latent elements (the paper's objective)."""
    return (output.float() - target.float()).pow(2).flatten(1).mean(dim=1)


def mask_key(mask: Sequence[bool]) -> str:
    """Compact, hashable, JSON-friendly form of a mask ('1' = compute)."""
    return "".join("1" if m else "0" for m in mask)


def key_mask(key: str) -> list[bool]:
    return [c == "1" for c in key]


@contextmanager
def budcache_session(
    transformer: torch.nn.Module,
    sigmas: Sequence[float],
    forecast: str = "reuse",
    gains: ForecastGains | None = None,
) -> Iterator[BudCacheRuntime]:
    """BudCache hooks on `transformer` for the duration of a block, so the pipe is left untouched afterwards."""
    check_uncached(transformer)
    steps = len(sigmas) - 1
    policy = CachePolicy(
        mask=(True,) * steps,
        model_name="search",
        model_fingerprint="search",
        sigmas=list(sigmas),
        forecast=forecast,
        forecast_gains=gains,
    )
    runtime = enable_budcache(transformer, policy)
    try:
        yield runtime
    finally:
        if get_runtime(transformer) is runtime:
            disable_budcache(transformer)


class MaskObjective:
    """Mean loss between cached and teacher final latents over a reference set, for any mask.

    `stats`: `evaluations` (rollouts actually run), `memo_hits`, `block_stack_calls`
    (compute steps actually run, each over the whole reference batch; candidates
    batched into one forward count once each) and `block_stack_calls_naive` (what the
    same evaluations cost as full rollouts), `wall_seconds`; search starts add
    `start_block_stack_calls` (in full-batch units), `start_block_stack_calls_naive`
    (the same rollouts run from the noise, each on its own) and `start_wall_seconds`.
    `sigmas` overrides the reference's schedule (to score learned schedules against
    the same teachers); `max_rows_per_forward` bounds how many candidate rows share a
    forward (memory on big models); `forecast` is the policy's forecast the masks are scored under,
    `gains` its forecast gains (to score an aligned policy).
    `max_cached_states` and `max_state_bytes` bound the prefix states kept on the model's device,
    `max_host_state_bytes` a host-memory tier behind them (`search.prefix_store`); stats add the
    store's hits, misses, evictions and peak bytes.
    `shard` (`search.distributed`): under torchrun this process keeps only its block of the
    reference's rows (trajectories, conditioning, prefix states); every loss is the sum of
    per-row errors over all ranks divided by the summed row count, so all ranks see the
    same numbers. `len()` is the whole set's row count, `local_rows` this process's.
    """

    def __init__(
        self,
        adapter: Any,
        reference: ReferenceSet,
        loss: Loss = latent_mse_per_sample,
        max_cached_states: int = 256,
        *,
        sigmas: Sequence[float] | None = None,
        max_rows_per_forward: int = 1024,
        forecast: str = "reuse",
        max_state_bytes: int | None = None,
        max_host_state_bytes: int = 0,
        shard: Shard | None = None,
        gains: ForecastGains | None = None,
    ) -> None:
        if len(reference) == 0:
            raise ReferenceSetError("the reference set is empty: give at least one (prompt, seed) pair")
        expected = reference.manifest.get("model_fingerprint")
        found = model_fingerprint(adapter.transformer)
        if expected is not None and expected != found:
            raise ReferenceSetError(
                f"the reference was computed for model fingerprint {expected}, this model's transformer is {found}: "
                "recompute the reference for this model"
            )
        self.forecast = check_forecast(forecast)
        self.gains = gains
        self.adapter = adapter
        self.shard = shard or Shard()
        self.manifest = reference.manifest
        self.positions = list(self.shard.block(len(reference)))
        self._total = len(reference)
        self.reference = reference = reference.subset(self.positions) if self.shard.distributed else reference
        self.loss = loss
        self.max_cached_states = max_cached_states
        self.steps = reference.steps
        schedule = list(reference.sigmas if sigmas is None else sigmas)
        if len(schedule) != self.steps + 1:
            raise ValueError(f"sigmas must hold steps + 1 = {self.steps + 1} values, got {len(schedule)}")
        self.schedule = [float(s) for s in schedule]
        device = adapter.device
        self.solver = adapter.solver(self.schedule)
        self.sigmas = self.solver.sigmas
        self.denoiser = reference.denoiser(adapter)
        self.noise = reference.noise.to(device=device, dtype=adapter.latent_dtype)
        self.target = reference.final.to(device=device)
        self._memo: dict[str, float] = {}
        self.prefix_store = PrefixStore(max_cached_states, max_state_bytes, max_host_state_bytes, device)
        self._teacher: list[torch.Tensor] | None = None
        self._teacher_solver: list[SolverState] = []
        self._tiles: dict[int, Any] = {}
        self.max_rows_per_forward = max_rows_per_forward
        self._candidates_per_forward = max(1, max_rows_per_forward // self.local_rows)
        self.cache: dict[Any, Any] = {}  # derived data valid as long as this objective is (subsets, DP edges)
        self.stats: dict[str, float] = {
            "evaluations": 0,
            "memo_hits": 0,
            "block_stack_calls": 0,
            "block_stack_calls_naive": 0,
            "wall_seconds": 0.0,
        }

    def __len__(self) -> int:
        return self._total

    @property
    def local_rows(self) -> int:
        """Rows this process holds (all of them when not sharded)."""
        return len(self.reference)

    def subset(self, count: int) -> MaskObjective:
        """An objective on `count` evenly strided pairs of this one's reference (for cheap screening).

        Created once per count and kept, so its memo and prefix states serve every later search.
        Its prefix store holds as many rows of states as this one's (more states of fewer
        rows): screening evaluates many masks, and each kept state spares reruns.
        """
        if count < 1:
            raise ValueError(f"a subset needs at least one pair, got {count}")
        if count >= len(self):
            return self
        key = ("subset", count)
        if key not in self.cache:
            stride = len(self) // count
            indices = list(range(0, stride * count, stride))
            wanted = set(indices)
            local = [k for k, position in enumerate(self.positions) if position in wanted]
            if not local:
                raise ValueError(
                    f"rank {self.shard.rank} of {self.shard.world_size} holds none of the {count} strided rows of a "
                    "screening subset: use fewer processes or more screen_samples / dp_samples"
                )
            child = MaskObjective(
                self.adapter,
                self.reference.subset(local) if self.shard.distributed else self.reference.subset(indices),
                self.loss,
                self.max_cached_states * len(self) // count,
                sigmas=self.schedule,
                max_rows_per_forward=self.max_rows_per_forward,
                forecast=self.forecast,
                max_state_bytes=self.prefix_store.max_bytes,
                max_host_state_bytes=self.prefix_store.max_host_bytes,
                gains=self.gains,
            )
            if self.shard.distributed:
                child.shard, child._total = self.shard, count
                child.positions = [self.positions[k] for k in local]
                child.manifest = {**self.manifest, "count": count, "subset_of": self.manifest.get("prompts_seeds_sha256")}
            self.cache[key] = child
        return self.cache[key]

    # -- evaluation -------------------------------------------------------------------------------

    def __call__(self, mask: Sequence[bool]) -> float:
        """Mean loss of `mask` over the reference set (memoised)."""
        return self.evaluate_many([mask])[0]

    def evaluate_many(self, masks: Sequence[Sequence[bool]]) -> list[float]:
        """Losses of several masks, the new ones rolled out together in shared forwards.

        Each row of a forward is computed independently of the others, so batching
        candidates changes no number; it saves the per-forward overhead that dominates
        small calibration subsets (and is what makes a GPU search fast).
        """
        keys = [self._check(mask) for mask in masks]
        todo = list(dict.fromkeys(k for k in keys if k not in self._memo))
        self.stats["memo_hits"] += len(keys) - len(todo)
        per_row: list[torch.Tensor] = []
        for chunk in range(0, len(todo), self._candidates_per_forward):
            group = todo[chunk : chunk + self._candidates_per_forward]
            per_row.extend(self.loss(final, self.target) for final in self._run_many(group))
        if todo:
            self._memo.update(zip(todo, self.mean_over_rows(per_row)))
        return [self._memo[k] for k in keys]

    def mean_over_rows(self, per_row: Sequence[torch.Tensor]) -> list[float]:
        """Means over all calibration rows of per-row values (one (local_rows,) tensor each).

        Sharded, each is this rank's float64 sum, summed over the ranks with the row count in
        one collective; every rank must call this with as many tensors in the same order.
        """
        if not self.shard.distributed:
            return [float(values.double().mean()) for values in per_row]
        sums = [float(values.double().sum()) for values in per_row]
        *totals, count = self.shard.sum(sums + [float(self.local_rows)])
        return [total / count for total in totals]

    def final_latents(self, mask: Sequence[bool]) -> torch.Tensor:
        """The cached rollout's final latents (this process's rows, ...) on CPU, e.g. for decoding and image metrics."""
        key = self._check(mask)
        final = self._run_many([key])[0]
        self._memo[key] = self.mean_over_rows([self.loss(final, self.target)])[0]
        return final.detach().cpu()

    def known(self, mask: Sequence[bool]) -> float | None:
        """The memoised loss of `mask`, or None when it was never evaluated."""
        return self._memo.get(mask_key(mask))

    def memo(self) -> dict[str, float]:
        """Losses evaluated so far, keyed by `mask_key` (checkpoints store it)."""
        return dict(self._memo)

    def load_memo(self, memo: dict[str, float]) -> None:
        """Restore losses from a checkpoint of a search on this same objective."""
        for key, value in memo.items():
            if len(key) != self.steps or set(key) - {"0", "1"}:
                raise ValueError(f"memo key {key!r} is not a {self.steps}-step mask")
            self._memo[key] = float(value)

    def pin(self, masks: Iterable[Sequence[bool]]) -> None:
        """Keep these masks' prefix states out of eviction (the search's current and best masks)."""
        self.prefix_store.pin(key[:k] for key in map(mask_key, masks) for k in range(1, self.steps))

    def _check(self, mask: Sequence[bool]) -> str:
        key = mask_key(mask)
        if len(key) != self.steps:
            raise ValueError(f"mask has {len(key)} entries, the reference has {self.steps} steps")
        if key[0] != "1":
            raise ValueError("the mask must compute step 0: there is nothing cached before it")
        return key

    def _run_many(self, keys: list[str]) -> list[torch.Tensor]:
        """Cached rollouts of several masks, each from its longest stored prefix, in shared forwards.

        At every step the running candidates are grouped by mask prefix (equal prefixes
        have equal states, so each is computed once), and the distinct prefixes split
        into a compute group and a cached group: one forward each through the BudCache
        hooks with the rows' residuals (and solver states) stacked, the computation
        `sampling.rollout` does.
        """
        started = time.perf_counter()
        latents: list[torch.Tensor] = []
        caches: list[dict[str, ContextSnapshot]] = []
        solvers: list[SolverState] = []
        begins: list[int] = []
        for key in keys:
            begin, state = self.prefix_store.longest(key, self.steps)
            begins.append(begin)
            latents.append(self.noise if state is None else state.latents)
            caches.append({} if state is None else state.cache)
            solvers.append(self.solver.initial_state() if state is None else state.solver)
        keep = self.prefix_store.enabled
        rows = self.local_rows
        computed = 0
        with torch.inference_mode(), budcache_session(
            self.adapter.transformer, self.schedule, self.forecast, self.gains
        ) as runtime:
            for step in range(min(begins), self.steps):
                members: dict[str, list[int]] = {}
                for k, begin in enumerate(begins):
                    if begin <= step:
                        members.setdefault(keys[k][: step + 1], []).append(k)
                for flag in (True, False):
                    group = [ks[0] for prefix, ks in members.items() if (prefix[-1] == "1") == flag]
                    if not group:
                        continue
                    stack_residuals = not flag or self.forecast == "linear"
                    runtime.restore(stack_caches([caches[k] for k in group], step, stack_residuals, rows))
                    runtime.mask = [True] * step + [flag] + [True] * (self.steps - step - 1)
                    x = torch.cat([latents[k] for k in group]) if len(group) > 1 else latents[group[0]]
                    velocity = self._tiled(len(group)).velocity(x, self.solver.timestep(step))
                    x, solver_state = self.solver.step(
                        step, x, velocity, stack_states([solvers[k] for k in group], rows)
                    )
                    parts = split_cache(runtime.snapshot(), len(group), rows) if flag else [caches[k] for k in group]
                    part_solvers = split_state(solver_state, len(group), rows)
                    computed += len(group) if flag else 0
                    for k, part, cache, solver in zip(group, x.chunk(len(group)), parts, part_solvers):
                        part = part.clone() if len(group) > 1 else part
                        prefix = keys[k][: step + 1]
                        for member in members[prefix]:
                            latents[member], caches[member], solvers[member] = part, cache, solver
                        if keep and step + 1 < self.steps:
                            self.prefix_store.put(prefix, RolloutState(step + 1, part, cache, solver))
        self.stats["evaluations"] += len(keys)
        self.stats["block_stack_calls"] += computed
        self.stats["block_stack_calls_naive"] += sum(key.count("1") for key in keys)
        self.stats["wall_seconds"] += time.perf_counter() - started
        self.stats.update(self.prefix_store.stats)
        return latents

    def _tiled(self, copies: int) -> Any:
        if copies == 1:
            return self.denoiser
        if copies not in self._tiles:
            self._tiles[copies] = self.denoiser.tile(copies)
        return self._tiles[copies]

    # -- teacher ----------------------------------------------------------------------------------

    def teacher_latents(self) -> list[torch.Tensor]:
        """Uncached latents before every step and the final one (steps + 1 tensors), computed once.

        Also checks that this model reproduces the reference's finals: the fingerprint
        does not hash weights, so a retrained model with a stale reference is caught here.
        """
        if self._teacher is None:
            started = time.perf_counter()
            latents = [self.noise]
            state = self.solver.initial_state()
            solver_states = [state]
            with torch.inference_mode():
                x = self.noise
                for i in range(self.steps):
                    x, state = self.solver.step(i, x, self.denoiser.velocity(x, self.solver.timestep(i)), state)
                    latents.append(x)
                    solver_states.append(state)
            error = (latents[-1].float() - self.target.float()).norm() / self.target.float().norm().clamp_min(1e-12)
            if error > _TEACHER_RELATIVE_TOLERANCE:
                raise ReferenceSetError(
                    f"this model's uncached rollout differs from the reference finals (relative error {error:.2e}): "
                    "the reference was computed with other weights or sigmas; recompute it"
                )
            self._teacher, self._teacher_solver = latents, solver_states
            self.stats["wall_seconds"] += time.perf_counter() - started
            self.stats.setdefault("teacher_block_stack_calls", 0)
            self.stats["teacher_block_stack_calls"] += self.steps
        return self._teacher

    def teacher_state(self, step: int) -> RolloutState | None:
        """The uncached rollout's state before `step` (no cache yet), to start segments from; None at 0."""
        if step == 0:
            return None
        latents = self.teacher_latents()
        return RolloutState(step, latents[step], {}, self._teacher_solver[step])


def euler_step_plain(
    denoiser: Any, latents: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor
) -> torch.Tensor:
    """One uncached Euler step with one sigma per sample (flow-matching Euler solvers only)."""
    velocity = denoiser.velocity(latents, sigma * 1000)
    shape = (-1,) + (1,) * (latents.dim() - 1)
    if sigma.dim() == 1:
        sigma, sigma_next = sigma.view(shape), sigma_next.view(shape)
    return euler_step(latents, velocity, sigma, sigma_next)

