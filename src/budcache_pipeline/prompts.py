"""Prompt sets: read, clean, seed and split the prompts a policy is calibrated on.

The split decides which prompts a policy is searched on and which ones judge it, so
it must never leak: a prompt goes to `calibration` or `holdout` by a hash of its
normalised text alone. Adding, removing or reordering other prompts never moves it,
and the same file gives the same sets (and seeds) on every machine.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

SUPPORTED_EXTENSIONS = (".csv", ".jsonl", ".parquet", ".txt")
SPLITS = ("calibration", "holdout")
COLUMNS = ("prompt_id", "prompt", "seed", "category")
UNCATEGORISED = "uncategorised"
DEFAULT_SALT = "budcache"
MAX_SEED = 2**32 - 1
_WHITESPACE = re.compile(r"\s+")
_INTEGER = re.compile(r"[+-]?\d+(?:\.0*)?")


class PromptFileError(ValueError):
    """A prompt file or frame that cannot be used; the message says what to fix."""


def normalise_prompt(text: str) -> str:
    """Strip and collapse whitespace, so that formatting never makes two prompts differ."""
    return _WHITESPACE.sub(" ", text).strip()


def prompt_key(text: str) -> str:
    """Identity of a prompt for de-duplication, seeding and splitting: case and spacing ignored."""
    return hashlib.sha256(normalise_prompt(text).casefold().encode("utf-8")).hexdigest()


def prompt_seed(text: str) -> int:
    """Seed for a prompt that has none: derived from its key, so it is the same everywhere."""
    return int(prompt_key(text)[:8], 16) % 2**31


def holdout_score(text: str, salt: str = DEFAULT_SALT) -> float:
    """Uniform number in [0, 1) from the prompt's key: below the holdout fraction means held out."""
    digest = hashlib.sha256(f"{salt}\x00{prompt_key(text)}".encode()).hexdigest()
    return int(digest[:13], 16) / 16**13


def read_prompts(path: str | Path) -> pd.DataFrame:
    """Read a prompt file as strings/objects without cleaning it.

    csv, jsonl and parquet need a `prompt` column (`seed` and `category` are optional);
    a txt file holds one prompt a line. Values are kept as read so that
    `prepare_prompts` can report bad ones by row.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_EXTENSIONS:
        raise PromptFileError(
            f"unsupported prompt file extension '{path.suffix}' ({path}): use one of {', '.join(SUPPORTED_EXTENSIONS)}"
        )
    if not path.is_file():
        raise PromptFileError(f"prompt file {path} does not exist: check the path (catalog entry or --prompts)")
    _check_inside_data_folder(path)
    try:
        frame = _read_frame(path, suffix)
    except UnicodeDecodeError as exc:
        raise PromptFileError(
            f"prompt file {path} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}): "
            "re-save it as UTF-8"
        ) from exc
    frame = frame.rename(columns=lambda c: str(c).strip().lower())
    if "prompt" not in frame.columns:
        raise PromptFileError(
            f"prompt file {path} has no 'prompt' column (found {list(frame.columns)}): "
            "name the column holding the prompts 'prompt'"
        )
    frame = frame.astype(object)
    frame.attrs["source"] = str(path)
    return frame


def _read_frame(path: Path, suffix: str) -> pd.DataFrame:
    if suffix == ".txt":
        return pd.DataFrame({"prompt": path.read_text(encoding="utf-8").splitlines()}, dtype=object)
    if suffix == ".csv":
        if not path.read_bytes().strip():
            return pd.DataFrame({"prompt": []}, dtype=object)
        try:
            return pd.read_csv(path, dtype=str, keep_default_na=False, skip_blank_lines=False, encoding="utf-8")
        except pd.errors.ParserError as exc:
            raise PromptFileError(
                f"prompt file {path} is not valid CSV ({' '.join(str(exc).split())}): "
                'quote prompts that contain commas ("a cat, sitting") or use one prompt a line in a .txt file'
            ) from exc
    if suffix == ".jsonl":
        return _read_jsonl(path)
    return pd.read_parquet(path)


def _data_folder(path: Path) -> Path:
    """The project's data folder above `path` (the nearest one named `data`), else the file's own folder."""
    absolute = path.absolute()
    return next((folder for folder in absolute.parents if folder.name == "data"), absolute.parent)


def _check_inside_data_folder(path: Path) -> None:
    """Refuse a prompt file that is a link to somewhere outside the data folder: git and DVC would not track it."""
    folder = _data_folder(path)
    target = path.resolve()
    if not target.is_relative_to(folder.resolve()):
        raise PromptFileError(
            f"prompt file {path} links to {target}, outside the data folder {folder}: "
            f"copy the file into {folder} so that it is versioned with the project"
        )


def _read_jsonl(path: Path) -> pd.DataFrame:
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PromptFileError(f"{path} line {number} is not valid JSON ({exc.msg}): one object per line") from exc
        if not isinstance(record, dict):
            raise PromptFileError(
                f"{path} line {number} is a JSON {type(record).__name__}, expected an object: "
                'write one object per line, like {"prompt": "a handwritten seven"}'
            )
        records.append(record)
    return pd.DataFrame.from_records(records, columns=None if records else ["prompt"])


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    if isinstance(value, str) and not value.strip():
        return True
    return value is pd.NA


def _whole_number(value: Any) -> int | None:
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real) and float(value).is_integer():
        return int(value)
    if isinstance(value, str) and _INTEGER.fullmatch(value.strip()):
        return int(value.strip().partition(".")[0])
    return None


def _parse_seed(value: Any, where: str) -> int | None:
    """An integer seed in [0, 2**32), None when absent; anything else is an error naming the row."""
    if _is_missing(value):
        return None
    seed = None if isinstance(value, bool) else _whole_number(value)
    if seed is None or not 0 <= seed <= MAX_SEED:
        raise PromptFileError(
            f"{where}: seed {value!r} is not an integer in [0, {MAX_SEED}]: fix it or leave it empty to derive one"
        )
    return seed


def _category(value: Any) -> str:
    if _is_missing(value):
        return UNCATEGORISED
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return normalise_prompt(str(value))


def prepare_prompts(
    raw: pd.DataFrame, holdout_fraction: float = 0.25, salt: str = DEFAULT_SALT
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Clean, de-duplicate, seed and split a raw prompt frame.

    Returns the prompts (columns `prompt_id, prompt, seed, category, split`, in file
    order) and a summary of what was dropped and how the sets came out. The first
    occurrence of a duplicate wins. Rows are numbered from 1 as in the file's data rows,
    and errors name the file `read_prompts` read (`raw.attrs["source"]`). Each split gets
    at least one prompt (the prompt whose hash lies nearest the threshold moves over, so
    tiny sets stay usable); fewer than two distinct prompts is an error.
    """
    source = str(raw.attrs.get("source", "prompt frame"))
    if not 0 < holdout_fraction < 1:
        raise PromptFileError(f"holdout_fraction must be strictly between 0 and 1, got {holdout_fraction}")
    if "prompt" not in raw.columns:
        raise PromptFileError(f"{source} has no 'prompt' column (found {list(raw.columns)})")
    cleaned = _clean_rows(raw, source, salt)
    _check_enough_prompts(cleaned, source)
    frame, rebalanced = _assign_splits(cleaned.rows, holdout_fraction)
    return frame.reset_index(drop=True), _summary(raw, frame, cleaned, holdout_fraction, salt, rebalanced)


@dataclass
class _Cleaned:
    """The distinct prompts in file order (with their holdout score) and the counts of what was dropped or derived."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    empty: int = 0
    duplicates: int = 0
    derived: int = 0


def _clean_rows(raw: pd.DataFrame, source: str, salt: str) -> _Cleaned:
    """Normalise each prompt, drop empty and repeated ones, check or derive its seed; errors name the row."""
    cleaned = _Cleaned()
    seen: set[str] = set()
    for row, record in enumerate(raw.to_dict("records"), start=1):
        text = record["prompt"]
        if _is_missing(text):
            cleaned.empty += 1
            continue
        if not isinstance(text, str):
            raise PromptFileError(
                f"{source} row {row}: prompt {text!r} is not text ({type(text).__name__}): store the prompt column as strings"
            )
        prompt = normalise_prompt(text)
        seed = _parse_seed(record.get("seed"), f"{source} row {row}")
        key = prompt_key(prompt)
        if key in seen:
            cleaned.duplicates += 1
            continue
        seen.add(key)
        if seed is None:
            seed = prompt_seed(prompt)
            cleaned.derived += 1
        cleaned.rows.append(
            {
                "prompt_id": key[:12],
                "prompt": prompt,
                "seed": seed,
                "category": _category(record.get("category")),
                "score": holdout_score(prompt, salt),
            }
        )
    return cleaned


def _check_enough_prompts(cleaned: _Cleaned, source: str) -> None:
    """At least one distinct prompt per split, or an error that says what was dropped."""
    if not cleaned.rows:
        raise PromptFileError(
            f"{source}: no prompts left after dropping {cleaned.empty} empty row(s): the prompt file is empty"
        )
    if len(cleaned.rows) < len(SPLITS):
        raise PromptFileError(
            f"{source} has {len(cleaned.rows)} distinct prompt after dropping {cleaned.duplicates} duplicate(s) and "
            f"{cleaned.empty} empty row(s) (case and spacing are ignored): the calibration and holdout splits need "
            f"at least {len(SPLITS)} distinct prompts, add more"
        )


def _assign_splits(rows: list[dict[str, Any]], holdout_fraction: float) -> tuple[pd.DataFrame, int]:
    """The prompts with their split (held out below `holdout_fraction`) and whether one moved to fill an empty split."""
    frame = pd.DataFrame(rows)
    frame["split"] = ["holdout" if s < holdout_fraction else "calibration" for s in frame["score"]]
    rebalanced = _ensure_both_splits(frame, holdout_fraction)
    frame = frame.drop(columns="score").astype({"seed": "int64", "prompt": str, "category": str, "split": str})
    return frame, rebalanced


def _summary(
    raw: pd.DataFrame, frame: pd.DataFrame, cleaned: _Cleaned, holdout_fraction: float, salt: str, rebalanced: int
) -> dict[str, Any]:
    """What was read, dropped and derived, and the split's sizes overall and per category."""
    counts = frame.groupby(["category", "split"]).size()
    return {
        "rows_read": len(raw),
        "empty_dropped": cleaned.empty,
        "duplicates_dropped": cleaned.duplicates,
        "prompts": len(frame),
        "seeds_derived": cleaned.derived,
        "holdout_fraction": holdout_fraction,
        "salt": salt,
        "rebalanced": rebalanced,
        "splits": {name: int((frame["split"] == name).sum()) for name in SPLITS},
        "categories": {
            category: {name: int(counts.get((category, name), 0)) for name in SPLITS}
            for category in sorted(frame["category"].unique())
        },
    }


def _ensure_both_splits(frame: pd.DataFrame, holdout_fraction: float) -> int:
    for empty_split in SPLITS:
        if not (frame["split"] == empty_split).any():
            nearest = (frame["score"] - holdout_fraction).abs().idxmin()
            frame.loc[nearest, "split"] = empty_split
            return 1
    return 0


def split_prompts(prepared: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The calibration and holdout sets of a prepared frame, without the `split` column."""
    sets = tuple(
        prepared.loc[prepared["split"] == name, list(COLUMNS)].reset_index(drop=True) for name in SPLITS
    )
    return sets[0], sets[1]


def ingest_prompts(
    path: str | Path, holdout_fraction: float = 0.25, salt: str = DEFAULT_SALT
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """Read a prompt file and return (calibration, holdout, summary): the whole ingest step."""
    prepared, summary = prepare_prompts(read_prompts(path), holdout_fraction, salt)
    calibration, holdout = split_prompts(prepared)
    return calibration, holdout, {"source": Path(path).name, **summary}
