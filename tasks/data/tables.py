"""Feedback tables: ratings (prompt, response, rating) or preference pairs (prompt, chosen, rejected), read and
checked whole, written as Parquet, and pairs derived from ratings."""

from __future__ import annotations

import posixpath
import random
from dataclasses import dataclass

import pandas as pd

from tasks.data.files import (TABLE_SUFFIXES, file_kind, frame_digest, open_filesystem, read_table, require_columns,
                              suffix)
from tasks.redact import redact_uri

RATING_COLUMNS = ("prompt", "response", "rating")
PAIR_COLUMNS = ("prompt", "chosen", "rejected")


class FeedbackError(ValueError):
    """A feedback table (ratings or preference pairs) is missing, malformed or out of range."""


@dataclass(frozen=True)
class FeedbackTable:
    """Validated feedback: ``kind`` is "ratings" (prompt, response, rating) or "pairs" (prompt, chosen, rejected)."""

    kind: str
    frame: pd.DataFrame
    digest: str


_SHAPES = {"ratings": RATING_COLUMNS, "pairs": PAIR_COLUMNS}
_SHAPES_TEXT = "ratings (prompt, response, rating) or pairs (prompt, chosen, rejected)"


def _feedbackfile_kind(frame: pd.DataFrame, shown: str) -> str:
    missing = {kind: [c for c in cols if c not in frame.columns] for kind, cols in _SHAPES.items()}
    complete = [kind for kind, cols in missing.items() if not cols]
    if len(complete) == 1:
        return complete[0]
    if complete:
        raise FeedbackError(f"feedback {shown} has the columns of both shapes; keep those of one: {_SHAPES_TEXT}")
    lacks = "; ".join(f"as {kind} it lacks {', '.join(map(repr, cols))}" for kind, cols in missing.items())
    raise FeedbackError(
        f"feedback {shown} matches neither accepted shape, {_SHAPES_TEXT}: {lacks}. "
        f"Columns present: {list(frame.columns)}"
    )


def _first_rows(mask) -> str:
    rows = [i for i, bad in enumerate(mask) if bad]
    if not rows:
        return ""
    return f"{len(rows)} row{'s' if len(rows) > 1 else ''} (first: row {rows[0]})"


def _feedback_problems(frame: pd.DataFrame, kind: str, min_rating: float, max_rating: float) -> list[str]:
    problems = []
    for column in _SHAPES[kind]:
        if column == "rating":
            continue
        values = list(frame[column])
        found = _first_rows(not isinstance(v, str) for v in values)
        if found:
            problems.append(f"column '{column}' is missing or not text in {found}")
        found = _first_rows(isinstance(v, str) and not v.strip() for v in values)
        if found:
            problems.append(f"column '{column}' is an empty string in {found}")
    if kind == "ratings":
        ratings = pd.to_numeric(frame["rating"], errors="coerce")
        found = _first_rows(ratings.isna())
        if found:
            problems.append(f"column 'rating' is NaN, empty or not a number in {found}")
        found = _first_rows(ratings.notna() & ~ratings.between(min_rating, max_rating))
        if found:
            problems.append(f"column 'rating' is outside [{min_rating}, {max_rating}] in {found}")
    else:
        found = _first_rows(frame["chosen"] == frame["rejected"])
        if found:
            problems.append(f"chosen == rejected, which states no preference, in {found}")
    return problems


def read_feedback(uri: str, *, min_rating: float = 1, max_rating: float = 5,
                  storage_options: dict | None = None) -> FeedbackTable:
    """Ratings or preference pairs from a .csv, .parquet or .jsonl/.json (JSON lines) file.

    The shape is decided by the columns; extra columns are kept. Every problem found is reported
    together in one FeedbackError; no row is dropped or altered silently.
    """
    fs, path = open_filesystem(uri, storage_options, FeedbackError)
    shown = redact_uri(uri)
    if suffix(uri) not in TABLE_SUFFIXES:
        raise FeedbackError(f"feedback {shown}: unknown file type; use one of {', '.join(TABLE_SUFFIXES)}")
    if file_kind(fs, path, uri, FeedbackError) != "file":
        raise FeedbackError(f"feedback file not found: {shown}")
    # Keep "" and "NA" in CSV text columns as written: "" is an error to report, "NA" may be a real answer.
    text_dtypes = {c: str for c in ("prompt", "response", "chosen", "rejected")}
    frame = read_table(fs, path, FeedbackError, keep_default_na=False, dtype=text_dtypes)
    if frame.empty:
        raise FeedbackError(f"feedback {shown} has no rows")
    kind = _feedbackfile_kind(frame, shown)
    problems = _feedback_problems(frame, kind, min_rating, max_rating)
    if problems:
        listing = "\n".join(f"  - {p}" for p in problems)
        raise FeedbackError(f"feedback {shown} is not usable (rows count from 0, header excluded):\n{listing}")
    frame = frame.reset_index(drop=True)
    if kind == "ratings":
        frame["rating"] = pd.to_numeric(frame["rating"]).astype("float64")
    return FeedbackTable(kind=kind, frame=frame, digest=frame_digest(frame))


def write_feedback(frame: pd.DataFrame, uri: str, *, storage_options: dict | None = None) -> str:
    """Write ``frame`` as Parquet at ``uri`` and return its ``frame_digest``."""
    fs, path = open_filesystem(uri, storage_options, FeedbackError)
    if suffix(uri) != ".parquet":
        raise FeedbackError(f"write_feedback writes Parquet; name the file *.parquet, not {redact_uri(uri)}")
    if "file" in fs.protocol:  # object stores have no folders to create
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
    with fs.open(path, "wb") as f:
        frame.to_parquet(f, index=False)
    return frame_digest(frame)


def pairs_from_ratings(frame: pd.DataFrame, *, min_margin: float = 1.0, max_pairs_per_prompt: int | None = None,
                       seed: int = 0) -> pd.DataFrame:
    """Preference pairs (prompt, chosen, rejected, margin) from ratings of several responses per prompt.

    A pair is kept when the chosen response is rated at least ``min_margin`` higher. Several ratings
    of the same response (several raters) count once, at their mean. With ``max_pairs_per_prompt``
    a seeded random subset of each prompt's pairs is kept, in their original order.
    """
    if min_margin <= 0:
        raise ValueError(f"min_margin must be > 0 (equal ratings express no preference), got {min_margin}")
    require_columns(frame, RATING_COLUMNS, "ratings table", FeedbackError)
    means = frame.groupby(["prompt", "response"], sort=False)["rating"].mean().reset_index()
    rng = random.Random(seed)
    rows = []
    for prompt, group in means.groupby("prompt", sort=False):
        rated = list(zip(group["response"], group["rating"]))
        pairs = []
        for i, a in enumerate(rated):
            for b in rated[i + 1:]:
                (chosen, r_chosen), (rejected, r_rejected) = (a, b) if a[1] >= b[1] else (b, a)
                if r_chosen - r_rejected >= min_margin - 1e-9:  # tolerate float error in mean ratings
                    pairs.append((prompt, chosen, rejected, float(r_chosen - r_rejected)))
        if max_pairs_per_prompt is not None and len(pairs) > max_pairs_per_prompt:
            pairs = [pairs[i] for i in sorted(rng.sample(range(len(pairs)), max_pairs_per_prompt))]
        rows.extend(pairs)
    return pd.DataFrame(rows, columns=[*PAIR_COLUMNS, "margin"])
