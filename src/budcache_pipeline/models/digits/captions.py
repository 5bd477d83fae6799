"""Captions for the digits data set: varied wording so the model learns the digit, not a template."""

from __future__ import annotations

import random

NUMBER_WORDS: tuple[str, ...] = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
)

# `{word}` is the number word ("seven"), `{num}` the numeral ("7"), `{a}` the article that fits the word.
TEMPLATES: tuple[str, ...] = (
    "{word}",
    "{num}",
    "{a} {word}",
    "{a} handwritten {word}",
    "a handwritten {num}",
    "the digit {num}",
    "the digit {word}",
    "digit {num}",
    "number {word}",
    "the number {num}",
    "number {word}, written by hand",
    "the number {num} drawn by hand",
    "{word}, handwritten",
    "an image of the digit {word}",
    "a picture of a handwritten {num}",
    "a small grayscale {word}",
    "a scanned handwritten digit {word}",
    "a blurry {num}",
)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(label: int, template: str) -> str:
    """Fill one template for one digit label (0-9)."""
    if not 0 <= label <= 9:
        raise ValueError(f"digit label must be in 0..9, got {label}")
    word = NUMBER_WORDS[label]
    return template.format(word=word, num=str(label), a=_article(word))


def all_captions(label: int) -> list[str]:
    """Every caption wording for one digit, in template order."""
    return [caption(label, template) for template in TEMPLATES]


def captions_for_labels(labels: list[int], seed: int = 0) -> list[str]:
    """One randomly worded caption per label; the same seed gives the same captions."""
    rng = random.Random(seed)
    return [caption(int(label), rng.choice(TEMPLATES)) for label in labels]


def prompt_for_digit(label: int, variant: int = 0) -> str:
    """A deterministic prompt naming `label`, cycling through the wordings with `variant`."""
    return caption(label, TEMPLATES[variant % len(TEMPLATES)])
