import json
import math
import time
from pathlib import Path

import pandas as pd
import pytest

from budcache_pipeline.prompts import (
    PromptFileError,
    ingest_prompts,
    prepare_prompts,
    prompt_seed,
    read_prompts,
    split_prompts,
)

SHIPPED = Path(__file__).resolve().parents[1] / "data" / "01_raw" / "prompts.csv"
ROWS = [
    {"prompt": "a handwritten seven", "seed": 7, "category": "7"},
    {"prompt": "the digit 3", "seed": 3, "category": "3"},
    {"prompt": "number one, written by hand", "seed": 1, "category": "1"},
]


def write(path: Path, rows: list[dict]) -> Path:
    frame = pd.DataFrame(rows)
    if path.suffix == ".csv":
        frame.to_csv(path, index=False)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif path.suffix == ".parquet":
        frame.to_parquet(path)
    else:
        path.write_text("".join(row["prompt"] + "\n" for row in rows))
    return path


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_every_tabular_format_gives_the_same_sets(tmp_path, suffix):
    reference = ingest_prompts(write(tmp_path / "ref.csv", ROWS))
    result = ingest_prompts(write(tmp_path / f"prompts{suffix}", ROWS))
    pd.testing.assert_frame_equal(result[0], reference[0])
    pd.testing.assert_frame_equal(result[1], reference[1])
    assert result[2]["prompts"] == 3


def test_txt_has_one_prompt_a_line_and_derives_seeds(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a handwritten seven\n\n   \nthe digit 3\n")
    calibration, holdout, summary = ingest_prompts(path)
    both = pd.concat([calibration, holdout])
    assert sorted(both["prompt"]) == ["a handwritten seven", "the digit 3"]
    assert summary["empty_dropped"] == 2
    assert summary["seeds_derived"] == 2
    assert set(both["category"]) == {"uncategorised"}
    assert dict(zip(both["prompt"], both["seed"])) == {p: prompt_seed(p) for p in both["prompt"]}


def test_normalises_whitespace_and_drops_case_insensitive_duplicates():
    raw = pd.DataFrame(
        {"prompt": ["  A  handwritten\tseven ", "a handwritten SEVEN", "the digit 3", "", None], "seed": [1, 2, 3, 4, 5]}
    )
    prepared, summary = prepare_prompts(raw)
    assert prepared["prompt"].tolist() == ["A handwritten seven", "the digit 3"]
    assert prepared["seed"].tolist() == [1, 3], "the first occurrence of a duplicate wins"
    assert summary["rows_read"] == 5
    assert summary["empty_dropped"] == 2
    assert summary["duplicates_dropped"] == 1
    assert summary["prompts"] == 2


def test_seeds_given_as_text_or_floats_are_accepted_when_whole():
    raw = pd.DataFrame({"prompt": ["a", "b", "c", "d"], "seed": ["12", "7.0", 5.0, ""]}, dtype=object)
    prepared, summary = prepare_prompts(raw)
    assert prepared["seed"].tolist()[:3] == [12, 7, 5]
    assert prepared["seed"].iloc[3] == prompt_seed("d")
    assert str(prepared["seed"].dtype) == "int64"
    assert summary["seeds_derived"] == 1


@pytest.mark.parametrize("bad", ["seven", "1.5", -1, 2**32, True])
def test_non_integer_or_out_of_range_seed_is_refused_with_its_row(bad):
    raw = pd.DataFrame({"prompt": ["ok", "bad"], "seed": [1, bad]}, dtype=object)
    with pytest.raises(PromptFileError, match=r"row 2: seed .* is not an integer"):
        prepare_prompts(raw)


def test_non_integer_seed_in_a_csv_file_is_refused(tmp_path):
    path = tmp_path / "prompts.csv"
    path.write_text("prompt,seed\na handwritten seven,7\nthe digit 3,three\n")
    with pytest.raises(PromptFileError, match="row 2: seed 'three'"):
        ingest_prompts(path)


def test_missing_prompt_column_is_refused(tmp_path):
    path = tmp_path / "prompts.csv"
    path.write_text("text,seed\na handwritten seven,7\n")
    with pytest.raises(PromptFileError, match=r"no 'prompt' column \(found \['text', 'seed'\]\)"):
        read_prompts(path)


def test_unsupported_extension_is_refused(tmp_path):
    path = tmp_path / "prompts.xlsx"
    path.write_text("x")
    with pytest.raises(PromptFileError, match="unsupported prompt file extension '.xlsx'.*.csv, .jsonl, .parquet, .txt"):
        read_prompts(path)


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(PromptFileError, match="does not exist"):
        read_prompts(tmp_path / "absent.csv")


def test_bad_jsonl_line_is_refused_with_its_number(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "a handwritten seven"}\n{"prompt": oops}\n')
    with pytest.raises(PromptFileError, match="line 2 is not valid JSON"):
        read_prompts(path)


def test_file_with_only_empty_prompts_is_refused(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n  \n")
    with pytest.raises(PromptFileError, match="no prompts left after dropping 2 empty row"):
        ingest_prompts(path)


@pytest.mark.parametrize("fraction", [0, 1, -0.1, 1.5])
def test_holdout_fraction_must_leave_both_sets(fraction):
    with pytest.raises(PromptFileError, match="holdout_fraction"):
        prepare_prompts(pd.DataFrame({"prompt": ["a", "b"]}), holdout_fraction=fraction)


def test_split_depends_on_the_prompt_only():
    prompts = [f"a handwritten digit number {i}" for i in range(200)]
    prepared, _ = prepare_prompts(pd.DataFrame({"prompt": prompts}))
    split_of = dict(zip(prepared["prompt"], prepared["split"]))

    reordered, _ = prepare_prompts(pd.DataFrame({"prompt": prompts[::-1][:150] + ["A NEW PROMPT", "another one"]}))
    for prompt, split in zip(reordered["prompt"], reordered["split"]):
        if prompt in split_of:
            assert split == split_of[prompt]
    assert 0.15 < (prepared["split"] == "holdout").mean() < 0.35
    restyled, _ = prepare_prompts(pd.DataFrame({"prompt": [p.upper() + "  " for p in prompts[:20]]}))
    assert restyled["split"].tolist() == prepared["split"].tolist()[:20]


def test_salt_reshuffles_the_split():
    raw = pd.DataFrame({"prompt": [f"prompt {i}" for i in range(100)]})
    assert prepare_prompts(raw, salt="a")[0]["split"].tolist() != prepare_prompts(raw, salt="b")[0]["split"].tolist()


def test_tiny_sets_get_one_prompt_in_each_split():
    prepared, summary = prepare_prompts(pd.DataFrame({"prompt": ["a handwritten seven", "the digit 3"]}))
    assert sorted(prepared["split"]) == ["calibration", "holdout"]
    calibration, holdout = split_prompts(prepared)
    assert len(calibration) == len(holdout) == 1
    assert list(calibration.columns) == ["prompt_id", "prompt", "seed", "category"]
    assert summary["splits"] == {"calibration": 1, "holdout": 1}


def test_summary_counts_per_split_and_category(tmp_path):
    rows = [{"prompt": f"digit {d} variant {v}", "category": d} for d in range(3) for v in range(10)]
    calibration, holdout, summary = ingest_prompts(write(tmp_path / "p.jsonl", rows), holdout_fraction=0.3)
    assert summary["source"] == "p.jsonl"
    assert summary["splits"] == {"calibration": len(calibration), "holdout": len(holdout)}
    assert set(summary["categories"]) == {"0", "1", "2"}
    assert sum(c["holdout"] for c in summary["categories"].values()) == len(holdout)
    assert all(sum(c.values()) == 10 for c in summary["categories"].values())


def test_shipped_prompt_set_is_clean_and_covers_every_digit():
    calibration, holdout, summary = ingest_prompts(SHIPPED)
    assert summary["prompts"] >= 60
    assert summary["duplicates_dropped"] == summary["empty_dropped"] == summary["seeds_derived"] == 0
    assert set(summary["categories"]) == {str(d) for d in range(10)}
    assert all(c["calibration"] and c["holdout"] for c in summary["categories"].values())
    assert not set(calibration["prompt_id"]) & set(holdout["prompt_id"])


def test_shipped_prompts_use_only_words_the_default_model_knows():
    from budcache_pipeline.models.digits.text_encoder import build_vocab, split_words

    vocab = set(build_vocab())
    prompts = read_prompts(SHIPPED)["prompt"]
    assert not {word for prompt in prompts for word in split_words(prompt)} - vocab


def write_empty(path: Path) -> Path:
    if path.suffix == ".parquet":
        pd.DataFrame({"prompt": pd.Series([], dtype=str)}).to_parquet(path)
    else:
        path.write_text("prompt\n" if path.name == "header_only.csv" else "")
    return path


@pytest.mark.parametrize("name", ["prompts.csv", "header_only.csv", "prompts.jsonl", "prompts.txt", "prompts.parquet"])
def test_an_empty_prompt_file_is_refused_in_every_format(tmp_path, name):
    path = write_empty(tmp_path / name)
    with pytest.raises(PromptFileError, match=rf"{name}: no prompts left after dropping 0 empty row\(s\)"):
        ingest_prompts(path)


def test_prompts_that_are_all_one_prompt_after_deduplication_are_refused(tmp_path):
    path = tmp_path / "prompts.csv"
    path.write_text("prompt\na handwritten seven\nA  handwritten SEVEN\n\n a handwritten seven\n")
    with pytest.raises(PromptFileError) as error:
        ingest_prompts(path)
    message = str(error.value)
    assert str(path) in message
    assert "has 1 distinct prompt after dropping 2 duplicate(s) and 1 empty row(s)" in message
    assert "need at least 2 distinct prompts" in message


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".txt"])
def test_a_file_that_is_not_utf8_is_refused_with_the_offending_byte(tmp_path, suffix):
    path = tmp_path / f"prompts{suffix}"
    line = '{"prompt": "caf\xe9 seven"}' if suffix == ".jsonl" else "caf\xe9 seven"
    path.write_bytes(("prompt\n" if suffix == ".csv" else "").encode() + line.encode("latin-1") + b"\n")
    with pytest.raises(PromptFileError, match=rf"prompts\{suffix} is not UTF-8 text \(byte 0xe9 .*re-save it as UTF-8"):
        read_prompts(path)


def test_a_100_kb_prompt_is_kept_whole(tmp_path):
    long_prompt = " ".join(["a handwritten seven"] * 5300)
    assert len(long_prompt) > 100_000
    calibration, holdout, summary = ingest_prompts(write(tmp_path / "p.csv", [{"prompt": long_prompt}, *ROWS]))
    assert summary["prompts"] == 4
    assert long_prompt in set(pd.concat([calibration, holdout])["prompt"])


def test_100000_prompts_ingest_and_split_in_seconds(tmp_path):
    path = tmp_path / "prompts.csv"
    pd.DataFrame({"prompt": [f"a handwritten digit, variant {i}" for i in range(100_000)]}).to_csv(path, index=False)
    started = time.perf_counter()
    calibration, holdout, summary = ingest_prompts(path)
    elapsed = time.perf_counter() - started
    assert elapsed < 30, f"ingesting 100,000 prompts took {elapsed:.1f} s"
    assert summary["prompts"] == len(calibration) + len(holdout) == 100_000
    assert 0.24 < len(holdout) / 100_000 < 0.26


def test_nan_seeds_are_missing_and_derived_from_the_prompt(tmp_path):
    path = tmp_path / "prompts.parquet"
    pd.DataFrame({"prompt": ["a seven", "a three"], "seed": [7.0, math.nan]}).to_parquet(path)
    calibration, holdout, summary = ingest_prompts(path)
    seeds = dict(zip(*[pd.concat([calibration, holdout])[c] for c in ("prompt", "seed")]))
    assert seeds == {"a seven": 7, "a three": prompt_seed("a three")}
    assert summary["seeds_derived"] == 1


@pytest.mark.parametrize(
    ("column", "values", "message"),
    [
        ("prompt", [1, 2], r"row 1: prompt 1 is not text \(int\): store the prompt column as strings"),
        ("seed", [1.5, 2.0], r"row 1: seed 1.5 is not an integer in \[0, 4294967295\]"),
        ("seed", [math.inf, 2.0], r"row 1: seed inf is not an integer"),
        ("seed", [-3, 2], r"row 1: seed -3 is not an integer"),
    ],
)
def test_a_parquet_file_with_wrong_column_types_is_refused_naming_file_and_row(tmp_path, column, values, message):
    path = tmp_path / "prompts.parquet"
    pd.DataFrame({"prompt": ["a seven", "a three"], "seed": [7, 3]} | {column: values}).to_parquet(path)
    with pytest.raises(PromptFileError, match=rf"prompts\.parquet {message}"):
        ingest_prompts(path)


def test_a_parquet_file_with_text_seeds_and_numeric_categories_is_read(tmp_path):
    path = tmp_path / "prompts.parquet"
    pd.DataFrame({"prompt": ["a seven", "a three"], "seed": ["7", "3"], "category": [7, 3]}).to_parquet(path)
    calibration, holdout, _ = ingest_prompts(path)
    both = pd.concat([calibration, holdout]).sort_values("seed")
    assert both["seed"].tolist() == [3, 7] and both["category"].tolist() == ["3", "7"]


def test_a_jsonl_line_that_is_not_an_object_is_refused_with_its_number(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "a handwritten seven"}\n["the digit 3"]\n')
    with pytest.raises(PromptFileError, match=r"line 2 is a JSON list, expected an object: write one object per line"):
        read_prompts(path)


def test_a_symlink_out_of_the_data_folder_is_refused_and_one_inside_is_read(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    outside = write(tmp_path / "elsewhere" / "prompts.csv", ROWS)
    raw = tmp_path / "project" / "data" / "01_raw"
    raw.mkdir(parents=True)
    (raw / "prompts.csv").symlink_to(outside)
    with pytest.raises(PromptFileError, match=r"links to .*elsewhere/prompts.csv, outside the data folder .*project/data"):
        read_prompts(raw / "prompts.csv")
    shared = write(tmp_path / "project" / "data" / "shared.csv", ROWS)
    (raw / "inside.csv").symlink_to(shared)
    assert read_prompts(raw / "inside.csv")["prompt"].tolist() == [row["prompt"] for row in ROWS]


def test_a_csv_with_a_ragged_row_is_refused_naming_the_fix(tmp_path):
    path = tmp_path / "data" / "prompts.csv"
    path.parent.mkdir()
    path.write_text("prompt\na red apple\na cat, sitting\n")
    with pytest.raises(PromptFileError, match=r"is not valid CSV .*quote prompts that contain commas"):
        read_prompts(path)
