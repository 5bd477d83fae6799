"""The default model's bench prompt sets: every wording of every digit, split by the ingest rule."""

from __future__ import annotations

from budcache_pipeline.models.digits.captions import all_captions
from budcache_pipeline.prompts import holdout_score

HOLDOUT_SEED_OFFSET = 100_000


def benchmark_prompt_sets(
    calibration_size: int, holdout_size: int
) -> tuple[list[tuple[str, int, int]], list[tuple[str, int, int]]]:
    """(prompt, digit, seed) triples for calibration and held-out evaluation, disjoint in prompts and seeds.

    Every wording of every digit is assigned to one side by a hash of its text (the
    ingest split's rule), digits are balanced round-robin, and seeds come from
    separate ranges.
    """
    if calibration_size < 1 or holdout_size < 1:
        raise ValueError(f"both sets need at least one pair, got {calibration_size} and {holdout_size}")
    sides: dict[str, dict[int, list[str]]] = {"calibration": {}, "holdout": {}}
    for digit in range(10):
        for prompt in sorted(set(all_captions(digit)), key=holdout_score):
            side = "holdout" if holdout_score(prompt) < 0.5 else "calibration"
            sides[side].setdefault(digit, []).append(prompt)
    for side, per_digit in sides.items():
        if len(per_digit) < 10:
            raise RuntimeError(f"the {side} side lacks wordings for some digits: change the split rule")

    def pairs(side: str, count: int, seed_offset: int) -> list[tuple[str, int, int]]:
        per_digit = sides[side]
        return [
            (per_digit[i % 10][(i // 10) % len(per_digit[i % 10])], i % 10, seed_offset + i) for i in range(count)
        ]

    return pairs("calibration", calibration_size, 0), pairs("holdout", holdout_size, HOLDOUT_SEED_OFFSET)
