"""The quality bench's distribution check: FID of each method on thousands of held-out samples, with intervals.

64 held-out images cannot separate the methods' FIDs (their sampling noise is larger than the
differences), so `budcache bench quality` also runs the uncached model, the searched policy and
every budget-matched heuristic on `samples` further held-out (prompt, seed) pairs at the budgets
in `FID_BUDGETS`, embeds the decoded images with the model's judge and reports, with paired 95%
bootstrap intervals (`evaluation.intervals`), each method's FID to real data, its gap to the
uncached model's FID, and its shift: the FID between its samples and the uncached model's own.
The headline is the searched policy's shift over the best heuristic's. The gap is what a paper
reports, but a few hundred real images make it too noisy to rank caches whose shift is small
(its intervals span zero); the shift compares 2 x `samples` images of the same prompts and seeds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from budcache_pipeline.evaluation.intervals import RESAMPLES, draw_ratio_interval, fid_intervals

FID_BUDGETS = (7, 5, 4)
FID_GAP_RATIO_GOAL = 0.5
"""Issue 18's goal for the searched policy's FID shift over the best heuristic's, at budgets 7, 5, 4."""
FID_BATCH = 512


def fid_comparison(
    adapter: Any,
    pairs: Sequence[tuple[str, int, int]],
    methods: Sequence[Any],
    quality: Any,
    searched: dict[int, str],
    steps: int,
    size: Any,
    *,
    resamples: int = RESAMPLES,
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Per budget of `searched` ({budget: searched method's name}): every method's FID and gap with intervals.

    `methods` are the bench's EvalMethods (the searched ones and the heuristics) at those budgets;
    `quality` must decode latents and embed images (`features`, `real_images`).
    """
    from budcache_pipeline.evaluation import RolloutSet, run_method
    from budcache_pipeline.search import compute_reference

    if quality.decode is None or quality.features is None or quality.real_images is None:
        raise ValueError("the FID comparison needs the model's quality plug-in: decode, features and real images")
    if not searched:
        raise ValueError("no budget to compare: give at least one budget with a searched policy")
    reference = compute_reference(adapter, [p for p, _, _ in pairs], [s for _, _, s in pairs], steps, size,
                                  batch_size=FID_BATCH, progress=False)
    data = RolloutSet.from_reference(adapter, reference)
    embed = _embedder(quality)
    real = embed(quality.real_images, decoded=True)
    uncached = embed(reference.final)
    progress(f"FID: {len(pairs)} held-out pairs, {len(real)} real images, budgets {sorted(searched, reverse=True)}")
    out: dict[str, Any] = {"samples": len(pairs), "real_images": len(real), "resamples": resamples, "budgets": {}}
    for budget, name in searched.items():
        features = {"uncached": uncached}
        for entry in (m for m in methods if m.budget == budget):
            features[entry.name] = embed(run_method(entry.method, data).final)
            progress(f"FID B={budget}: {entry.name} done")
        found = fid_intervals(features, real, "uncached", resamples=resamples, seed=budget)
        heuristics = [n for n in found.shift if not n.startswith("budcache")]
        record: dict[str, Any] = {
            "searched": name,
            **{key: {n: i.to_dict() for n, i in getattr(found, key).items()} for key in ("fid", "gap", "shift")},
        }
        if heuristics:
            best = min(heuristics, key=lambda n: found.shift[n].value)
            ratio = draw_ratio_interval(found.shift, found.shift_draws, name, best)
            record.update(best_heuristic=best, shift_ratio=ratio.to_dict(), shift_ratio_met=ratio.value <= FID_GAP_RATIO_GOAL,
                          intervals_disjoint=found.shift[name].disjoint(found.shift[best]))
        out["budgets"][str(budget)] = record
    return out


def bench_fid_comparison(
    adapter: Any,
    table: Any,
    methods: Sequence[Any],
    quality: Any,
    pairs: Sequence[tuple[str, int, int]],
    budgets: Sequence[int],
    steps: int,
    size: Any,
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    """`fid_comparison` for the quality bench at `budgets`: per budget the searched policy that won on
    held-out MSE in `table` (aligned or not) and the compute-matched heuristics (a blocks-matched
    variant is another budget)."""
    searched = {}
    for budget in sorted({int(b) for b in budgets} & {m.budget for m in methods}, reverse=True):
        rows = table[table["budget"] == budget].set_index("method")["latent_mse"]
        aligned = "budcache_aligned" in rows and rows["budcache_aligned"] < rows["budcache"]
        searched[budget] = "budcache_aligned" if aligned else "budcache"
    chosen = [m for m in methods if m.budget in searched
              and (m.name == searched[m.budget] or not (m.name.startswith("budcache") or "@" in m.name))]
    return fid_comparison(adapter, pairs, chosen, quality, searched, steps, size, progress=progress)


def _embedder(quality: Any) -> Callable[..., torch.Tensor]:
    """Latents (or already decoded images) -> judge features, batch by batch."""

    def embed(tensor: torch.Tensor, decoded: bool = False) -> torch.Tensor:
        parts = []
        with torch.inference_mode():
            for first in range(0, len(tensor), FID_BATCH):
                chunk = tensor[first : first + FID_BATCH]
                parts.append(quality.features(chunk if decoded else quality.decode(chunk)).double().cpu())
        return torch.cat(parts)

    return embed


def format_fid(result: dict[str, Any]) -> list[str]:
    """Lines for the bench's terminal output: per budget the gaps with intervals and the headline ratio."""
    def show(i: dict[str, float]) -> str:
        return f"{i['value']:.2f} [{i['low']:.2f}, {i['high']:.2f}]"

    lines = [f"FID over {result['samples']} held-out samples, 95% paired bootstrap ({result['resamples']} resamples): "
             f"gap = FID to {result['real_images']} real images - the uncached model's; shift = FID to the uncached "
             "model's own samples"]
    for budget, record in result["budgets"].items():
        lines.append(f"  B={budget}: uncached FID {show(record['fid']['uncached'])}")
        for n in record["shift"]:
            lines.append(f"    {n:>18}: FID {show(record['fid'][n])}, gap {show(record['gap'][n])}, "
                         f"shift {show(record['shift'][n])}")
        if "shift_ratio" in record:
            lines.append(
                f"  B={budget}: {record['searched']} / {record['best_heuristic']} shift ratio "
                f"{show(record['shift_ratio'])} (goal <= {FID_GAP_RATIO_GOAL}: "
                f"{'met' if record['shift_ratio_met'] else 'missed'}), intervals "
                f"{'disjoint' if record['intervals_disjoint'] else 'overlap'}"
            )
    return lines
