"""Teacher trajectories: the uncached rollout that every cached rollout is measured against.

They are computed once per (model, steps, prompt set, seeds) and shared by every
budget's search and by the evaluation, so they are saved batch by batch with a
manifest: an interrupted run resumes where it stopped, and a reference that does
not belong to the model or settings at hand is refused instead of silently reused.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save
from tqdm.auto import tqdm

from budcache_pipeline.atomic import atomic_folder, write_bytes_atomic, write_text_atomic
from budcache_pipeline.caching import get_runtime
from budcache_pipeline.models.adapter import BoundDenoiser, Conditioning, Size
from budcache_pipeline.policy import model_fingerprint
from budcache_pipeline.sampling import NonFiniteLatents, rollout
from budcache_pipeline.search.distributed import Shard

MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 2
_BATCH_FILE = "batch_{:05d}.safetensors"
_SHARED_FILE = "conditioning_shared.safetensors"
# Keys that identify what a reference is; anything else in the manifest is bookkeeping.
_IDENTITY_KEYS = (
    "format_version",
    "model_fingerprint",
    "model_class",
    "steps",
    "sigmas",
    "height",
    "width",
    "num_frames",
    "adapter_settings",
    "count",
    "prompts_seeds_sha256",
    "batch_size",
    "dtype",
)


class ReferenceSetError(ValueError):
    """A reference set that cannot serve this model or these settings; the message says what differs."""


@dataclass
class ReferenceSet:
    """Teacher trajectories for (model, steps, prompts, seeds): initial noise, uncached finals, conditioning.

    The conditioning (encoded prompts) is stored with them, so the search and alignment
    never run a text encoder.
    """

    prompts: list[str]
    seeds: list[int]
    sigmas: list[float]
    noise: torch.Tensor
    final: torch.Tensor
    manifest: dict[str, Any] = field(default_factory=dict)
    conditioning: Conditioning | None = None

    def __post_init__(self) -> None:
        if not self.prompts:
            raise ReferenceSetError("the reference set is empty: give at least one (prompt, seed) pair")
        if len(self.prompts) != len(self.seeds):
            raise ReferenceSetError(f"{len(self.prompts)} prompts but {len(self.seeds)} seeds: give one seed per prompt")
        if self.noise.shape != self.final.shape or self.noise.shape[0] != len(self.prompts):
            raise ReferenceSetError(
                f"noise {tuple(self.noise.shape)} and final {tuple(self.final.shape)} must both have "
                f"{len(self.prompts)} rows of the same shape"
            )
        if len(self.sigmas) < 2 or self.sigmas[-1] != 0:
            raise ReferenceSetError("sigmas must hold steps + 1 values ending at 0")
        if self.conditioning is not None and len(self.conditioning) != len(self.prompts):
            raise ReferenceSetError(
                f"conditioning has {len(self.conditioning)} rows for {len(self.prompts)} prompts: recompute the reference"
            )

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1

    @property
    def height(self) -> int:
        return self._size("height")

    @property
    def width(self) -> int:
        return self._size("width")

    @property
    def size(self) -> Size:
        frames = self.manifest.get("num_frames")
        return Size(self.height, self.width, None if frames is None else int(frames))

    def denoiser(self, adapter: Any) -> BoundDenoiser:
        """The adapter bound to this reference's stored conditioning, on the adapter's device."""
        if self.conditioning is None:
            raise ReferenceSetError("this reference holds no conditioning: recompute it with compute_reference")
        return BoundDenoiser(adapter, self.conditioning.to(adapter.device, adapter.dtype))

    def _size(self, name: str) -> int:
        if name not in self.manifest:
            raise ReferenceSetError(f"the reference's manifest has no '{name}': build it with compute_reference")
        return int(self.manifest[name])

    def subset(self, indices: Sequence[int]) -> ReferenceSet:
        """The reference restricted to some pairs, e.g. a screening subset or a single-prompt calibration."""
        indices = list(indices)
        if not indices:
            raise ReferenceSetError("a subset needs at least one index")
        index = torch.tensor(indices, dtype=torch.long)
        prompts = [self.prompts[i] for i in indices]
        seeds = [self.seeds[i] for i in indices]
        manifest = {
            **self.manifest,
            "count": len(indices),
            "prompts_seeds_sha256": prompts_seeds_sha256(prompts, seeds),
            "subset_of": self.manifest.get("prompts_seeds_sha256"),
        }
        conditioning = self.conditioning.select(indices) if self.conditioning is not None else None
        return ReferenceSet(
            prompts, seeds, list(self.sigmas), self.noise[index], self.final[index], manifest, conditioning
        )


def prompts_seeds_sha256(prompts: Sequence[str], seeds: Sequence[int]) -> str:
    """Order-sensitive hash of the (prompt, seed) pairs: a reference is only valid for exactly these pairs."""
    payload = json.dumps([[str(p), int(s)] for p, s in zip(prompts, seeds)], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def check_uncached(transformer: torch.nn.Module) -> None:
    """Refuse to compute a teacher through a transformer that has a cache enabled."""
    if get_runtime(transformer) is not None:
        raise ReferenceSetError("BudCache is enabled on this transformer: call disable_budcache before computing teachers")
    if getattr(transformer, "is_cache_enabled", False):
        raise ReferenceSetError("a diffusers cache is enabled on this transformer: call transformer.disable_cache() first")


def _manifest(
    adapter: Any,
    prompts: list[str],
    seeds: list[int],
    sigmas: list[float],
    size: Size,
    batch_size: int,
) -> dict[str, Any]:
    transformer = adapter.transformer
    return {
        "format_version": FORMAT_VERSION,
        "model_fingerprint": model_fingerprint(transformer),
        "model_class": type(transformer).__name__,
        "adapter_settings": adapter.settings(),
        "steps": len(sigmas) - 1,
        "sigmas": sigmas,
        "height": size.height,
        "width": size.width,
        "num_frames": size.num_frames,
        "count": len(prompts),
        "prompts_seeds_sha256": prompts_seeds_sha256(prompts, seeds),
        "batch_size": batch_size,
        "dtype": str(transformer.dtype).removeprefix("torch."),
        "prompts": prompts,
        "seeds": seeds,
    }


def _check_manifest(found: dict[str, Any], expected: dict[str, Any], where: Path) -> None:
    differing = [key for key in _IDENTITY_KEYS if found.get(key) != expected.get(key)]
    if differing:
        details = ", ".join(f"{k}: stored {found.get(k)!r} vs now {expected.get(k)!r}" for k in differing[:3])
        raise ReferenceSetError(
            f"{where / MANIFEST_FILE} was written for other settings ({details}): "
            "use another out_dir or delete that folder to recompute"
        )


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    write_bytes_atomic(path, save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}))


def compute_reference(
    adapter: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    steps: int,
    size: Size,
    out_dir: Path | None = None,
    batch_size: int = 32,
    progress: bool = True,
    shard: Shard | None = None,
) -> ReferenceSet:
    """Uncached rollouts of every (prompt, seed) pair, batched, on the adapter's device.

    With `out_dir`, each finished batch (noise, final latents, conditioning) is saved
    (safetensors) next to a manifest, and a rerun skips the batches already there; a
    manifest for other settings is an error. With a `shard` of K ranks, each rank
    computes a contiguous block of the batches into `out_dir` (the same batches, so the
    same numbers, as one process) and then reads the others' files; a killed rank's
    batches are the only ones a rerun computes.
    """
    shard = shard or Shard()
    prompts, seeds = _checked_pairs(prompts, seeds, steps, batch_size, shard.distributed and out_dir is None)
    check_uncached(adapter.transformer)
    sigmas = adapter.default_sigmas(steps, size)
    manifest = _manifest(adapter, prompts, seeds, sigmas, size, batch_size)
    if out_dir is not None:
        out_dir = Path(out_dir)
        _open_out_dir(out_dir, manifest, shard)
    solver = adapter.solver(sigmas)
    starts = range(0, len(prompts), batch_size)
    mine = shard.block(len(starts), allow_empty=True)
    batches: dict[int, tuple[torch.Tensor, torch.Tensor, Conditioning | None]] = {}
    for number in tqdm(mine, desc="reference", unit="batch", disable=not progress):
        path = out_dir / _BATCH_FILE.format(number) if out_dir is not None else None
        if path is not None and path.exists():
            batches[number] = _read_batch(path, out_dir)
            continue
        rows = slice(starts[number], starts[number] + batch_size)
        batches[number] = _teacher_batch(adapter, solver, prompts[rows], seeds[rows], size, steps)
        if path is not None:
            _save_batch(batches[number], number, path)
    shard.barrier("the reference batches")
    for number in range(len(starts)):
        if number not in batches:
            batches[number] = _read_batch(out_dir / _BATCH_FILE.format(number), out_dir)
    parts = [batches[number] for number in range(len(starts))]
    return ReferenceSet(
        prompts,
        seeds,
        sigmas,
        torch.cat([p[0] for p in parts]),
        torch.cat([p[1] for p in parts]),
        manifest,
        Conditioning.cat([p[2] for p in parts]),
    )


def _checked_pairs(
    prompts: Sequence[str], seeds: Sequence[int], steps: int, batch_size: int, sharded_in_memory: bool
) -> tuple[list[str], list[int]]:
    """The pairs as strings and integers, or the error that says what is wrong with the arguments."""
    if sharded_in_memory:
        raise ReferenceSetError("a sharded reference needs out_dir: the ranks share their batches through it")
    prompts, seeds = [str(p) for p in prompts], [int(s) for s in seeds]
    if not prompts:
        raise ReferenceSetError("no prompts: a reference set needs at least one (prompt, seed) pair")
    if len(prompts) != len(seeds):
        raise ReferenceSetError(f"{len(prompts)} prompts but {len(seeds)} seeds: give one seed per prompt")
    if steps < 1 or batch_size < 1:
        raise ReferenceSetError(f"steps and batch_size must be at least 1, got {steps} and {batch_size}")
    return prompts, seeds


def _open_out_dir(out_dir: Path, manifest: dict[str, Any], shard: Shard) -> None:
    """Create `out_dir` with the manifest (rank 0), or check that the one there describes these settings."""
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = out_dir / MANIFEST_FILE
    if manifest_path.exists():
        _check_manifest(json.loads(manifest_path.read_text()), manifest, out_dir)
    elif shard.is_main:
        write_text_atomic(manifest_path, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    shard.barrier("the reference manifest")


def _teacher_batch(
    adapter: Any, solver: Any, prompts: list[str], seeds: list[int], size: Size, steps: int
) -> tuple[torch.Tensor, torch.Tensor, Conditioning]:
    """One batch's noise, uncached final latents and conditioning, on the CPU; NaN or inf names its pairs."""
    conditioning, noise = adapter.prepare(prompts, seeds, size)
    try:
        with torch.inference_mode():
            denoiser = BoundDenoiser(adapter, conditioning)
            final = rollout(denoiser, None, noise.to(adapter.latent_dtype), solver, check_finite=True).final
    except NonFiniteLatents as exc:
        pairs = [(prompts[r], seeds[r]) for r in exc.rows]
        raise ReferenceSetError(
            f"the model output NaN or inf at sampling step {exc.step + 1} of {steps} "
            f"for (prompt, seed) {pairs[:3]}"
            f"{' and more' if len(pairs) > 3 else ''}: check the weights, the dtype (float16 overflows; "
            "use bfloat16 or float32) and the guidance scale; batches already written are kept"
        ) from exc
    return noise.detach().cpu(), final.detach().cpu(), conditioning.to("cpu")


def _save_batch(batch: tuple[torch.Tensor, torch.Tensor, Conditioning], number: int, path: Path) -> None:
    """A computed batch's file (the first batch also writes the conditioning every row shares)."""
    noise, final, conditioning = batch
    if number == 0:
        _save_atomic(conditioning.shared, path.parent / _SHARED_FILE)
    _save_atomic({"noise": noise, "final": final, **_row_tensors(conditioning)}, path)


def _row_tensors(conditioning: Conditioning) -> dict[str, torch.Tensor]:
    return {k: v for k, v in conditioning.tensors().items() if k.startswith("rows.")}


def save_reference(reference: ReferenceSet, out_dir: Path | str) -> None:
    """Write `reference` in the layout `load_reference` reads, replacing `out_dir` whole.

    The folder is written beside the target and swapped in by renames, so a crash leaves
    either the old reference or the new one, never a mix of their batches.
    """
    with atomic_folder(out_dir) as staging:
        _write_reference(reference, staging)


def _write_reference(reference: ReferenceSet, staging: Path) -> None:
    batch_size = int(reference.manifest.get("batch_size") or len(reference))
    conditioning = reference.conditioning
    if conditioning is not None:
        _save_atomic(conditioning.shared, staging / _SHARED_FILE)
    for number, begin in enumerate(range(0, len(reference), batch_size)):
        rows = slice(begin, begin + batch_size)
        tensors = {"noise": reference.noise[rows], "final": reference.final[rows]}
        if conditioning is not None:
            tensors.update(_row_tensors(conditioning.select(rows)))
        _save_atomic(tensors, staging / _BATCH_FILE.format(number))
    # The manifest describes exactly these pairs, also when `reference` is a subset of another one.
    manifest = {
        **reference.manifest,
        "format_version": FORMAT_VERSION,
        "prompts": reference.prompts,
        "seeds": reference.seeds,
        "sigmas": reference.sigmas,
        "count": len(reference),
        "batch_size": batch_size,
    }
    write_text_atomic(staging / MANIFEST_FILE, json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def _read_batch(path: Path, out_dir: Path) -> tuple[torch.Tensor, torch.Tensor, Conditioning | None]:
    stored = load_file(str(path))
    shared = load_file(str(out_dir / _SHARED_FILE)) if (out_dir / _SHARED_FILE).is_file() else {}
    rows = {k: v for k, v in stored.items() if k.startswith("rows.")}
    if not rows:
        return stored["noise"], stored["final"], None
    conditioning = Conditioning.from_tensors({**rows, **{f"shared.{k}": v for k, v in shared.items()}})
    return stored["noise"], stored["final"], conditioning


def load_reference(out_dir: Path | str) -> ReferenceSet:
    """A reference saved by `compute_reference`; refuses an incomplete one or one of an older format."""
    out_dir = Path(out_dir)
    manifest_path = out_dir / MANIFEST_FILE
    if not manifest_path.is_file():
        raise ReferenceSetError(f"{out_dir} holds no reference ({MANIFEST_FILE} missing): run compute_reference first")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ReferenceSetError(
            f"{manifest_path} is format {manifest.get('format_version')}, this version reads {FORMAT_VERSION} "
            "(references now store the encoded prompts): delete that folder and rerun the reference pipeline"
        )
    batches = -(-manifest["count"] // manifest["batch_size"])
    missing = [i for i in range(batches) if not (out_dir / _BATCH_FILE.format(i)).is_file()]
    if missing:
        raise ReferenceSetError(
            f"reference in {out_dir} is incomplete ({batches - len(missing)} of {batches} batches): "
            "rerun compute_reference with the same arguments to finish it"
        )
    parts = [_read_batch(out_dir / _BATCH_FILE.format(i), out_dir) for i in range(batches)]
    return ReferenceSet(
        list(manifest["prompts"]),
        [int(s) for s in manifest["seeds"]],
        [float(s) for s in manifest["sigmas"]],
        torch.cat([p[0] for p in parts]),
        torch.cat([p[1] for p in parts]),
        manifest,
        Conditioning.cat([p[2] for p in parts]) if all(p[2] is not None for p in parts) else None,
    )
