"""Teacher trajectories: the uncached rollout that every cached rollout is measured against.

They are computed once per (model, steps, prompt set, seeds) and shared by every
budget's search and by the evaluation, so they are saved batch by batch with a
manifest: an interrupted run resumes where it stopped, and a reference that does
not belong to the model or settings at hand is refused instead of silently reused.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from budcache_pipeline.caching import get_runtime
from budcache_pipeline.models.flux import flux_default_sigmas, prepare_batch
from budcache_pipeline.policy import model_fingerprint
from budcache_pipeline.sampling import rollout

MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1
_BATCH_FILE = "batch_{:05d}.safetensors"
# Keys that identify what a reference is; anything else in the manifest is bookkeeping.
_IDENTITY_KEYS = (
    "format_version",
    "model_fingerprint",
    "model_class",
    "steps",
    "sigmas",
    "height",
    "width",
    "count",
    "prompts_seeds_sha256",
    "batch_size",
    "dtype",
)


class ReferenceError(ValueError):
    """A reference set that cannot serve this model or these settings; the message says what differs."""


@dataclass
class ReferenceSet:
    """Teacher trajectories for (model, steps, prompts, seeds): initial noise and uncached final latents."""

    prompts: list[str]
    seeds: list[int]
    sigmas: list[float]
    noise: torch.Tensor
    final: torch.Tensor
    manifest: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.prompts:
            raise ReferenceError("the reference set is empty: give at least one (prompt, seed) pair")
        if len(self.prompts) != len(self.seeds):
            raise ReferenceError(f"{len(self.prompts)} prompts but {len(self.seeds)} seeds: give one seed per prompt")
        if self.noise.shape != self.final.shape or self.noise.shape[0] != len(self.prompts):
            raise ReferenceError(
                f"noise {tuple(self.noise.shape)} and final {tuple(self.final.shape)} must both have "
                f"{len(self.prompts)} rows of the same shape"
            )
        if len(self.sigmas) < 2 or self.sigmas[-1] != 0:
            raise ReferenceError("sigmas must hold steps + 1 values ending at 0")

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

    def _size(self, name: str) -> int:
        if name not in self.manifest:
            raise ReferenceError(f"the reference's manifest has no '{name}': build it with compute_reference")
        return int(self.manifest[name])

    def subset(self, indices: Sequence[int]) -> ReferenceSet:
        """The reference restricted to some pairs, e.g. a screening subset or a single-prompt calibration."""
        indices = list(indices)
        if not indices:
            raise ReferenceError("a subset needs at least one index")
        index = torch.tensor(indices, dtype=torch.long)
        prompts = [self.prompts[i] for i in indices]
        seeds = [self.seeds[i] for i in indices]
        manifest = {
            **self.manifest,
            "count": len(indices),
            "prompts_seeds_sha256": prompts_seeds_sha256(prompts, seeds),
            "subset_of": self.manifest.get("prompts_seeds_sha256"),
        }
        return ReferenceSet(prompts, seeds, list(self.sigmas), self.noise[index], self.final[index], manifest)


def prompts_seeds_sha256(prompts: Sequence[str], seeds: Sequence[int]) -> str:
    """Order-sensitive hash of the (prompt, seed) pairs: a reference is only valid for exactly these pairs."""
    payload = json.dumps([[str(p), int(s)] for p, s in zip(prompts, seeds)], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def check_uncached(transformer: torch.nn.Module) -> None:
    """Refuse to compute a teacher through a transformer that has a cache enabled."""
    if get_runtime(transformer) is not None:
        raise ReferenceError("BudCache is enabled on this transformer: call disable_budcache before computing teachers")
    if getattr(transformer, "is_cache_enabled", False):
        raise ReferenceError("a diffusers cache is enabled on this transformer: call transformer.disable_cache() first")


def _manifest(
    pipe: Any,
    prompts: list[str],
    seeds: list[int],
    sigmas: list[float],
    height: int,
    width: int,
    batch_size: int,
) -> dict[str, Any]:
    transformer = pipe.transformer
    return {
        "format_version": FORMAT_VERSION,
        "model_fingerprint": model_fingerprint(transformer),
        "model_class": type(transformer).__name__,
        "steps": len(sigmas) - 1,
        "sigmas": sigmas,
        "height": height,
        "width": width,
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
        raise ReferenceError(
            f"{where / MANIFEST_FILE} was written for other settings ({details}): "
            "use another out_dir or delete that folder to recompute"
        )


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def compute_reference(
    pipe: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    steps: int,
    height: int,
    width: int,
    out_dir: Path | None = None,
    batch_size: int = 32,
    progress: bool = True,
) -> ReferenceSet:
    """Uncached rollouts of every (prompt, seed) pair, batched, on the pipe's device.

    With `out_dir`, each finished batch is saved (safetensors) next to a manifest, and
    a rerun skips the batches already there; a manifest for other settings is an error.
    """
    prompts, seeds = [str(p) for p in prompts], [int(s) for s in seeds]
    if not prompts:
        raise ReferenceError("no prompts: a reference set needs at least one (prompt, seed) pair")
    if len(prompts) != len(seeds):
        raise ReferenceError(f"{len(prompts)} prompts but {len(seeds)} seeds: give one seed per prompt")
    if steps < 1 or batch_size < 1:
        raise ReferenceError(f"steps and batch_size must be at least 1, got {steps} and {batch_size}")
    check_uncached(pipe.transformer)
    sigmas = flux_default_sigmas(pipe, steps, height, width)
    manifest = _manifest(pipe, prompts, seeds, sigmas, height, width, batch_size)
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        manifest_path = out_dir / MANIFEST_FILE
        if manifest_path.exists():
            _check_manifest(json.loads(manifest_path.read_text()), manifest, out_dir)
        else:
            manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    device = pipe.transformer.device
    sigma_tensor = torch.tensor(sigmas, dtype=torch.float32, device=device)
    noises, finals = [], []
    starts = range(0, len(prompts), batch_size)
    for number, begin in enumerate(tqdm(starts, desc="reference", unit="batch", disable=not progress)):
        path = out_dir / _BATCH_FILE.format(number) if out_dir is not None else None
        if path is not None and path.exists():
            stored = load_file(str(path))
            noises.append(stored["noise"])
            finals.append(stored["final"])
            continue
        end = begin + batch_size
        batch = prepare_batch(pipe, prompts[begin:end], seeds[begin:end], height, width)
        with torch.inference_mode():
            final = rollout(batch.denoiser, None, batch.noise, sigma_tensor).final
        noise, final = batch.noise.detach().cpu(), final.detach().cpu()
        if path is not None:
            _save_atomic({"noise": noise, "final": final}, path)
        noises.append(noise)
        finals.append(final)
    return ReferenceSet(prompts, seeds, sigmas, torch.cat(noises), torch.cat(finals), manifest)


def load_reference(out_dir: Path | str) -> ReferenceSet:
    """A reference saved by `compute_reference`; refuses an incomplete one."""
    out_dir = Path(out_dir)
    manifest_path = out_dir / MANIFEST_FILE
    if not manifest_path.is_file():
        raise ReferenceError(f"{out_dir} holds no reference ({MANIFEST_FILE} missing): run compute_reference first")
    manifest = json.loads(manifest_path.read_text())
    batches = -(-manifest["count"] // manifest["batch_size"])
    missing = [i for i in range(batches) if not (out_dir / _BATCH_FILE.format(i)).is_file()]
    if missing:
        raise ReferenceError(
            f"reference in {out_dir} is incomplete ({batches - len(missing)} of {batches} batches): "
            "rerun compute_reference with the same arguments to finish it"
        )
    stored = [load_file(str(out_dir / _BATCH_FILE.format(i))) for i in range(batches)]
    return ReferenceSet(
        list(manifest["prompts"]),
        [int(s) for s in manifest["seeds"]],
        [float(s) for s in manifest["sigmas"]],
        torch.cat([s["noise"] for s in stored]),
        torch.cat([s["final"] for s in stored]),
        manifest,
    )
