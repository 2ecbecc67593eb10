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
    rating_scale: tuple[float, float] | None = None  # ratings: the scale given, or the lowest and highest rating found
    duplicates_dropped: int = 0  # exact repeats of a row, dropped
    prompts_derived: int = 0  # pairs without a prompt column: rows whose prompt is the sides' shared beginning


_SHAPES = {"ratings": RATING_COLUMNS, "pairs": PAIR_COLUMNS}
_SHAPES_TEXT = ("ratings (prompt, response, rating) or pairs (prompt, chosen, rejected), or pairs of whole dialogues "
                "(chosen, rejected) whose shared beginning is the prompt")
ASSISTANT_TURN = "Assistant:"  # the Anthropic HH layout: "\n\nHuman: ... \n\nAssistant: ..."


def _feedback_kind(frame: pd.DataFrame, shown: str) -> str:
    missing = {kind: [c for c in cols if c not in frame.columns] for kind, cols in _SHAPES.items()}
    complete = [kind for kind, cols in missing.items() if not cols]
    if len(complete) == 1:
        return complete[0]
    if complete:
        raise FeedbackError(f"feedback {shown} has the columns of both shapes; keep those of one: {_SHAPES_TEXT}")
    if missing["pairs"] == ["prompt"]:
        return "dialogue pairs"
    lacks = "; ".join(f"as {kind} it lacks {', '.join(map(repr, cols))}" for kind, cols in missing.items())
    raise FeedbackError(
        f"feedback {shown} matches neither accepted shape, {_SHAPES_TEXT}: {lacks}. "
        f"Columns present: {list(frame.columns)}"
    )


def _first_rows(mask) -> str:
    rows = [i for i, bad in enumerate(mask) if bad]
    if not rows:
        return ""
    if len(rows) == 1:
        return f"1 row (first: row {rows[0]})"
    listed = ", ".join(map(str, rows[:20])) + (", ..." if len(rows) > 20 else "")
    return f"{len(rows)} rows (first: row {rows[0]}; rows {listed})"


def _text_problems(frame: pd.DataFrame, columns: tuple[str, ...], empty_ok: tuple[str, ...] = ()) -> list[str]:
    problems = []
    for column in columns:
        values = list(frame[column])
        found = _first_rows(not isinstance(v, str) for v in values)
        if found:
            problems.append(f"column '{column}' is missing or not text in {found}")
        if column in empty_ok:
            continue
        found = _first_rows(isinstance(v, str) and not v.strip() for v in values)
        if found:
            problems.append(f"column '{column}' is an empty string in {found}")
    return problems


def _rating_problems(frame: pd.DataFrame, scale: tuple[float, float] | None) -> list[str]:
    ratings = pd.to_numeric(frame["rating"], errors="coerce")
    problems = []
    found = _first_rows(ratings.isna())
    if found:
        problems.append(f"column 'rating' is NaN, empty or not a number in {found}")
    if scale is not None:
        found = _first_rows(ratings.notna() & ~ratings.between(*scale))
        if found:
            problems.append(f"column 'rating' is outside [{scale[0]:g}, {scale[1]:g}] in {found}")
    return problems


def split_dialogues(chosen: str, rejected: str) -> tuple[str, str, str] | None:
    """(prompt, chosen response, rejected response) from two whole dialogues: the prompt is their shared beginning,
    up to and including the last "Assistant:" turn marker in it (the HH layout), else up to a word boundary; None when
    they share no beginning."""
    shared = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        shared += 1
    cut = chosen.rfind(ASSISTANT_TURN, 0, shared)
    if cut >= 0:
        cut += len(ASSISTANT_TURN)
    else:  # no turn marker: the shared words, never half a word
        cut = max(chosen.rfind(" ", 0, shared), chosen.rfind("\n", 0, shared)) + 1
    if cut <= 0 or not chosen[:cut].strip():
        return None
    return chosen[:cut], chosen[cut:], rejected[cut:]


def _derive_prompts(frame: pd.DataFrame, shown: str) -> pd.DataFrame:
    split = [split_dialogues(c, r) for c, r in zip(frame["chosen"], frame["rejected"])]
    found = _first_rows(s is None for s in split)
    if found:
        raise FeedbackError(f"feedback {shown} has no prompt column, and the two sides of {found} share no beginning "
                            "to take as the prompt (rows count from 0, header excluded)")
    return frame.assign(prompt=[s[0] for s in split], chosen=[s[1] for s in split],
                        rejected=[s[2] for s in split])


def read_feedback(uri: str, *, rating_scale: tuple[float, float] | None = None, empty_responses: bool = False,
                  storage_options: dict | None = None) -> FeedbackTable:
    """Ratings or preference pairs from a .csv, .parquet or .jsonl/.json (JSON lines) file.

    The shape is decided by the columns; extra columns are kept. Ratings may use any numeric scale: `rating_scale`,
    or the lowest and highest rating found. Pairs without a prompt column are whole dialogues (the Anthropic HH
    layout). Exact repeats of a row are dropped and counted. Every problem found is reported together in one
    FeedbackError, naming the rows; nothing else is dropped or altered. `empty_responses`: an empty answer is one to
    rate (a policy that stopped at once), as in simulated feedback; in a user's file it is taken for a missing one.
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
    kind = _feedback_kind(frame, shown)
    columns = ("chosen", "rejected") if kind == "dialogue pairs" else tuple(c for c in _SHAPES[kind] if c != "rating")
    problems = _text_problems(frame, columns, ("response",) if empty_responses else ())
    if kind == "ratings":
        problems += _rating_problems(frame, rating_scale)
    if problems:
        listing = "\n".join(f"  - {p}" for p in problems)
        raise FeedbackError(f"feedback {shown} is not usable (rows count from 0, header excluded):\n{listing}")
    derived = 0
    if kind == "dialogue pairs":
        frame, kind, derived = _derive_prompts(frame, shown), "pairs", len(frame)
    if kind == "pairs":
        found = _first_rows(frame["chosen"] == frame["rejected"])
        if found:
            raise FeedbackError(f"feedback {shown}: chosen == rejected, which states no preference, in {found} (rows "
                                "count from 0, header excluded)")
    scale = None
    if kind == "ratings":
        frame["rating"] = pd.to_numeric(frame["rating"]).astype("float64")
        low, high = float(frame["rating"].min()), float(frame["rating"].max())
        scale = tuple(rating_scale) if rating_scale else ((low, high) if low < high else None)  # one value: no scale
    before = len(frame)
    frame = frame[~frame.astype(str).duplicated()].reset_index(drop=True)
    return FeedbackTable(kind=kind, frame=frame, digest=frame_digest(frame), rating_scale=scale,
                         duplicates_dropped=before - len(frame), prompts_derived=derived)


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


# --------------------------------------------------------------------------- for a model

FITTED = "_tokens"  # the column of a prepared table holding each row's tokens, cut to fit the context


@dataclass
class PreparedFeedback:
    """A feedback table tokenized once for one model: each row's tokens (a Fitted, or a (chosen, rejected) pair of
    them for pairs) cut to the model's context by the too-long rule, and what that took."""

    table: FeedbackTable  # as read
    frame: pd.DataFrame  # the rows kept, with their tokens in FITTED
    stats: dict[str, float]  # feedback.rows, .duplicates_dropped, .rows_cut, .tokens_cut, .too_long_dropped

    @property
    def kind(self) -> str:
        return self.table.kind


RESPONSE_IDS = "response_ids"  # simulated feedback: the tokens that were sampled, end-of-text included when it was


def _responses(table: FeedbackTable, side: str, tokenizer, encode, shown: str) -> list[list[int]]:
    """The tokens of each answer as a policy would produce it: a whole answer ends with end-of-text. Where the table
    carries the sampled tokens themselves (RESPONSE_IDS, simulated feedback), those: the reward model learns from the
    tokens PPO will show it, not from their text decoded and encoded again."""
    if side == "response" and RESPONSE_IDS in table.frame.columns:
        rows = [[int(t) for t in ids] for ids in table.frame[RESPONSE_IDS]]
        bad = [i for i, ids in enumerate(rows)
               if any(not 0 <= t < tokenizer.vocab_size or t == tokenizer.pad_id for t in ids)]
        if bad:
            raise FeedbackError(f"feedback {shown}: column {RESPONSE_IDS!r} holds padding or ids outside this model's "
                                f"vocabulary of {tokenizer.vocab_size} in {len(bad)} row(s) (first: row {bad[0]})")
        return rows
    return [ids + [tokenizer.eos_id] for ids in encode(list(table.frame[side]))]


def prepare_feedback(table: FeedbackTable, tokenizer, context: int, on_too_long: str, shown: str) -> PreparedFeedback:
    """Tokenize every row; a row longer than `context` is cut to fit (the prompt keeps its end, the response its
    beginning), dropped, or refused with its row numbers, as `on_too_long` says."""
    from tasks.data.tokens import fit_dialogue

    encode = getattr(tokenizer, "encode_batch", None) or (lambda texts: [tokenizer.encode(t) for t in texts])
    prompts = encode(list(table.frame["prompt"]))
    sides = ("response",) if table.kind == "ratings" else ("chosen", "rejected")
    fitted = [[fit_dialogue(p, r, context) for p, r in zip(prompts, _responses(table, side, tokenizer, encode, shown))]
              for side in sides]
    rows = list(zip(*fitted))  # per row: one Fitted per side
    too_long = [any(f.cut for f in row) for row in rows]
    if on_too_long == "error" and any(too_long):
        raise FeedbackError(f"feedback {shown}: {_first_rows(too_long)} longer than the model's context of {context} "
                            "tokens (rows count from 0, header excluded); set reward.on_too_long to cut or drop them")
    frame = table.frame.assign(**{FITTED: [row[0] if len(row) == 1 else row for row in rows]})
    stats = {"feedback.rows": float(len(frame)), "feedback.duplicates_dropped": float(table.duplicates_dropped),
             "feedback.rows_cut": 0.0, "feedback.tokens_cut": 0.0, "feedback.too_long_dropped": 0.0}
    if on_too_long == "drop":
        frame = frame[[not t for t in too_long]].reset_index(drop=True)
        stats["feedback.too_long_dropped"] = float(sum(too_long))
        stats["feedback.rows"] = float(len(frame))
    else:
        stats["feedback.rows_cut"] = float(sum(too_long))
        stats["feedback.tokens_cut"] = float(sum(f.cut for row in rows for f in row))
    if frame.empty:
        raise FeedbackError(f"feedback {shown}: no row fits the model's context of {context} tokens")
    return PreparedFeedback(table, frame, stats)
