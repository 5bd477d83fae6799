"""The quality bench's distribution check: FID of each method on thousands of held-out samples, with intervals.

64 held-out images cannot separate the methods' FIDs (their sampling noise is larger than the
differences), so `budcache bench quality` also runs the uncached model, the searched policy and
every budget-matched heuristic on `samples` further held-out (prompt, seed) pairs at the budgets
in `FID_BUDGETS`, embeds the decoded images with the model's judge and compares each method's FID
to real data, and its gap to the uncached model's FID, with paired 95% bootstrap intervals
(`evaluation.intervals`). The headline is the searched policy's gap over the best heuristic's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from budcache_pipeline.evaluation.intervals import RESAMPLES, fid_intervals, gap_ratio_interval

FID_BUDGETS = (7, 5, 4)
FID_SAMPLES = 2048
FID_GAP_RATIO_GOAL = 0.5
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
        fid, gaps, draws = fid_intervals(features, real, "uncached", resamples=resamples, seed=budget)
        heuristics = [n for n in gaps if not n.startswith("budcache")]
        record: dict[str, Any] = {
            "searched": name,
            "fid": {n: i.to_dict() for n, i in fid.items()},
            "gap": {n: i.to_dict() for n, i in gaps.items()},
        }
        if heuristics:
            best = min(heuristics, key=lambda n: gaps[n].value)
            ratio = gap_ratio_interval(gaps, draws, name, best)
            record.update(best_heuristic=best, gap_ratio=ratio.to_dict(),
                          gap_ratio_met=ratio.value <= FID_GAP_RATIO_GOAL, intervals_disjoint=gaps[name].disjoint(gaps[best]))
        out["budgets"][str(budget)] = record
    return out


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
    lines = [f"FID over {result['samples']} held-out samples vs {result['real_images']} real images "
             f"(95% paired bootstrap, {result['resamples']} resamples); gap = FID - uncached FID"]
    for budget, record in result["budgets"].items():
        gaps = ", ".join(f"{n} {g['value']:.2f} [{g['low']:.2f}, {g['high']:.2f}]" for n, g in record["gap"].items())
        lines.append(f"  B={budget}: uncached FID {record['fid']['uncached']['value']:.2f}; gaps {gaps}")
        if "gap_ratio" in record:
            r = record["gap_ratio"]
            lines.append(
                f"  B={budget}: {record['searched']} / {record['best_heuristic']} gap ratio {r['value']:.2f} "
                f"[{r['low']:.2f}, {r['high']:.2f}] (goal <= {FID_GAP_RATIO_GOAL}: "
                f"{'met' if record['gap_ratio_met'] else 'missed'}), intervals "
                f"{'disjoint' if record['intervals_disjoint'] else 'overlap'}"
            )
    return lines
