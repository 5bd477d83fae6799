"""Candidates stacked into one transformer forward: their cache snapshots joined in row order, and split back.

The search evaluates many masks that share a prefix; at a step where several of them compute
(or forecast) from their own stored residuals, one forward over all their rows costs less than
one per candidate. These helpers build the joined snapshot and take it apart afterwards.
"""

from __future__ import annotations

import dataclasses

import torch

from budcache_pipeline.caching import ContextSnapshot


def _row_groups(tensor: torch.Tensor, parts: int, rows: int) -> torch.Tensor:
    """View (k * parts * rows, ...) as (k, parts * rows, ...): the k row blocks a transformer call sees.

    SD3 runs guidance as [uncond rows; cond rows] in one call (k = 2), so the residuals of
    stacked candidates interleave by block, not by candidate.
    """
    blocks = tensor.shape[0] // (parts * rows)
    return tensor.reshape(blocks, parts * rows, *tensor.shape[1:])


def stack_caches(
    caches: list[dict[str, ContextSnapshot]], step: int, with_residuals: bool, rows: int
) -> dict[str, ContextSnapshot]:
    """One snapshot whose residuals (and slopes) are the group's stacked in row order.

    A compute step under plain reuse needs no residual (it makes a new one), so none is
    stacked for it. A row without a slope yet (one compute so far) gets a zero slope,
    which forecasts exactly what reuse gives.
    """
    names = caches[0].keys()
    if not with_residuals:
        return {name: ContextSnapshot(step - 1, None, None, 0) for name in names}

    def stacked(tensors: list[torch.Tensor | None]) -> torch.Tensor | None:
        present = next((t for t in tensors if t is not None), None)
        if present is None:
            return None
        if len(tensors) == 1:
            return present
        filled = [torch.zeros_like(present) if t is None else t for t in tensors]
        blocks = torch.cat([_row_groups(t, 1, rows) for t in filled], dim=1)
        return blocks.reshape(-1, *present.shape[1:])

    return {
        name: ContextSnapshot(
            step - 1,
            stacked([c[name].residual_hidden for c in caches]),
            stacked([c[name].residual_encoder for c in caches]),
            0,
            stacked([c[name].slope_hidden for c in caches]),
            stacked([c[name].slope_encoder for c in caches]),
            stacked([c[name].residual_sigma for c in caches]),
        )
        for name in names
    }


def split_cache(snapshot: dict[str, ContextSnapshot], parts: int, rows: int) -> list[dict[str, ContextSnapshot]]:
    """Per-candidate snapshots from a group's snapshot (cloned so no candidate holds the whole batch)."""

    def split(tensor: torch.Tensor | None) -> list[torch.Tensor | None]:
        if tensor is None:
            return [None] * parts
        if parts == 1:
            return [tensor]
        blocks = _row_groups(tensor, parts, rows)
        return [p.reshape(-1, *tensor.shape[1:]).clone() for p in blocks.chunk(parts, dim=1)]

    fields = ("residual_hidden", "residual_encoder", "slope_hidden", "slope_encoder", "residual_sigma")
    pieces = {name: {f: split(getattr(s, f)) for f in fields} for name, s in snapshot.items()}
    return [
        {
            name: dataclasses.replace(s, computed=0, **{f: pieces[name][f][k] for f in fields})
            for name, s in snapshot.items()
        }
        for k in range(parts)
    ]
