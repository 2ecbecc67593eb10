"""Corpora, tokens, prompts and feedback tables: everything the stages read as data.

Every reader takes an fsspec URL (a local path, ``file://``, ``s3://``, a glob) and fails with one
clear error, naming the file or column, before any training starts. URIs in messages are redacted.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import posixpath
import random
import re
from dataclasses import dataclass

import fsspec
import numpy as np
import pandas as pd
import torch

from tasks.redact import redact, redact_uri

BUILTIN_CORPUS_URI = "builtin://cpython-docs"
RATING_COLUMNS = ("prompt", "response", "rating")
PAIR_COLUMNS = ("prompt", "chosen", "rejected")
TABLE_SUFFIXES = (".csv", ".parquet", ".jsonl", ".json")


class CorpusError(ValueError):
    """The training corpus cannot be used as given."""


class FeedbackError(ValueError):
    """A feedback table (ratings or preference pairs) is missing, malformed or out of range."""


# --------------------------------------------------------------------------- tokens


class ByteTokenizer:
    """UTF-8 bytes as tokens: no vocabulary file, any text round-trips, and the model stays tiny."""

    vocab_size: int = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.flatten().tolist()
        # A sampled sequence can stop inside a multi-byte character, and a model with spare vocabulary
        # (num_tokens > 256) can sample ids no byte has: show both as U+FFFD rather than fail (0xFF is never UTF-8).
        return bytes(int(i) if 0 <= int(i) < 256 else 0xFF for i in ids).decode("utf-8", errors="replace")


def encode_corpus(text: str, tokenizer) -> torch.Tensor:
    """1-D tensor of token ids: uint8 when they fit (a quarter of the memory), else int64."""
    dtype = torch.uint8 if tokenizer.vocab_size <= 256 else torch.long
    return torch.tensor(tokenizer.encode(text), dtype=dtype)


def split_tokens(tokens: torch.Tensor, heldout_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Train / validation as two contiguous pieces, so no validation window overlaps training text."""
    if not 0 <= heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    n_heldout = round(len(tokens) * heldout_fraction)
    cut = len(tokens) - n_heldout
    return tokens[:cut], tokens[cut:]


def sample_windows(tokens: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """(batch_size, seq_len + 1) int64 windows at random offsets.

    Only ``generator`` is consumed, so restoring ``generator.get_state()`` from a checkpoint
    resumes the exact sequence of batches.
    """
    if len(tokens) < seq_len + 1:
        raise CorpusError(
            f"corpus has {len(tokens)} tokens but a training window needs seq_len + 1 = {seq_len + 1}; "
            "use a larger corpus or a smaller seq_len"
        )
    starts = torch.randint(0, len(tokens) - seq_len, (batch_size,), generator=generator)
    offsets = torch.arange(seq_len + 1)
    return tokens[starts[:, None] + offsets].long()  # (b, seq_len + 1)


# --------------------------------------------------------------------------- corpus

_TYPOGRAPHY = str.maketrans({"\u2019": "'", "\u2018": "'", "\u201c": '"', "\u201d": '"', "\u2026": "...",
                             "\u2014": "-", "\u2013": "-"})
_UNDERLINE = re.compile(r"^\s*([*=\-~^#+])\1{2,}\s*$")
_CODE_CHARS = frozenset("=[]{}<>|\\/#%$@^~`&")
_CODE_STARTS = (">>>", "...", "|", "+-", "(Pdb)")
_CODE_LINE = re.compile(
    r"^\s*((if|elif|else|for|while|try|except|finally|with|def|async def|class)\b.*:|return\b.*|raise|#.*)$"
)


def _is_prose(lines: list[str]) -> bool:
    if any(line.lstrip().startswith(_CODE_STARTS) or "::=" in line or _CODE_LINE.match(line) for line in lines):
        return False  # doctests, tables, grammar productions, Python blocks
    text = " ".join(line.strip() for line in lines)
    if len(text.split()) < 6:
        return False  # headings, signatures, "See also:"
    if sum(c in _CODE_CHARS for c in text) > 0.02 * len(text):
        return False  # indented code examples
    return text.endswith((".", ":", "?", "!", ")", "]", '"'))


def _clean_paragraph(lines: list[str]) -> str:
    text = " ".join(" ".join(lines).split())
    text = re.sub(r"^(\* |\d+\. )", "", text)  # list bullets
    text = re.sub(r"\*(\S[^*]*?)\*", r"\1", text)  # reST *emphasis*
    return text.encode("ascii", "ignore").decode("ascii")


@functools.cache
def builtin_corpus() -> str:
    """About 335k characters of English prose from the pydoc topics that ship inside CPython.

    Needs no download, so the pipeline runs offline and every machine reads the same text.
    Paragraphs are separated by "\\n"; code examples, tables and headings are dropped.
    """
    from pydoc_data.topics import topics

    paragraphs = []
    for key in sorted(topics):
        for block in re.split(r"\n\s*\n", topics[key].translate(_TYPOGRAPHY)):
            lines = [line for line in block.splitlines() if line.strip() and not _UNDERLINE.match(line)]
            if lines and _is_prose(lines):
                paragraphs.append(_clean_paragraph(lines))
    return "\n".join(paragraphs)


def _suffix(path: str) -> str:
    return posixpath.splitext(path.lower())[1]


_URI_CREDENTIALS = re.compile(r"^(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://).*:.*@(?P<rest>[^@]*)$")


def _filesystem(uri: str, storage_options: dict | None, error: type[ValueError]) -> tuple:
    """(filesystem, path) for a URL, refusing credentials written into it.

    fsspec does not read ``key:secret@`` from a URL: it would treat it as part of the bucket name
    and echo it in its own errors. Credentials belong in the environment or ``storage_options``.
    """
    found = _URI_CREDENTIALS.match(uri)
    if found:  # shown without them: a secret may hold "/" and so escape URL parsing and redact_uri
        shown = f"{found['scheme']}***@{found['rest']}"
        raise error(f"credentials inside a URI are not supported, put them in the environment: {shown}")
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    fs.invalidate_cache()  # another process may have just written here
    return fs, path


def _unreadable(uri: str, exc: OSError, error: type[ValueError]) -> ValueError:
    """Access denied, an unreachable endpoint: fsspec's own message names neither the URL nor a fix."""
    return error(f"cannot read {redact_uri(uri)}: {type(exc).__name__}: {redact(str(exc))}; "
                 "check the storage credentials and endpoint in the environment")


def _kind(fs, path: str, uri: str, error: type[ValueError]) -> str | None:
    """"file", "directory", or None when nothing is there; isfile() would call a denied read "missing"."""
    try:
        return fs.info(path)["type"]
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise _unreadable(uri, exc, error) from None


def _expand(uri: str, storage_options: dict | None, error: type[ValueError]) -> tuple:
    """The files a URL names: a glob's matches, a folder's files (hidden ones skipped), or the one file."""
    fs, path = _filesystem(uri, storage_options, error)
    try:
        if fsspec.core.has_magic(path):
            paths = sorted(p for p in fs.glob(path) if fs.isfile(p))
        elif (kind := _kind(fs, path, uri, error)) == "directory":
            root = path.rstrip("/")
            paths = sorted(p for p in fs.find(path) if not re.search(r"(^|/)\.", p[len(root):]))
        else:
            paths = [path] if kind == "file" else []
    except OSError as exc:
        raise _unreadable(uri, exc, error) from None
    if not paths:
        raise error(f"no file matches {redact_uri(uri)}")
    return fs, paths


def _read_table(fs, path: str, error: type[ValueError], **csv_options) -> pd.DataFrame:
    shown = redact_uri(fs.unstrip_protocol(path))
    try:
        with fs.open(path, "rb") as f:
            suffix = _suffix(path)
            if suffix == ".parquet":
                return pd.read_parquet(f)
            if suffix in (".jsonl", ".json"):  # dtype=False: a response "42" stays text
                return pd.read_json(f, lines=True, dtype=False)
            return pd.read_csv(f, **csv_options)
    except FileNotFoundError:
        raise error(f"file not found: {shown}") from None
    except Exception as exc:  # parser errors differ per format; the file name is what a user needs
        raise error(f"cannot read {shown}: {redact(str(exc))}") from None


def _require_columns(frame: pd.DataFrame, columns: tuple[str, ...], where: str, error: type[ValueError]) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise error(f"{where} has no column {', '.join(map(repr, missing))}; columns present: {list(frame.columns)}")


def read_corpus(uri: str | None, text_column: str = "text", storage_options: dict | None = None,
                *, min_chars: int = 1) -> str:
    """The training text behind ``uri``; None or ``BUILTIN_CORPUS_URI`` is the built-in corpus.

    Parquet and JSON-lines files contribute their ``text_column`` joined by newlines (null cells
    skipped); any other file is read as UTF-8 text. Files are concatenated in sorted order.
    ``min_chars`` lets a stage refuse a corpus too small for its windows before training starts.
    """
    if uri is None or uri == BUILTIN_CORPUS_URI:
        text, source = builtin_corpus(), BUILTIN_CORPUS_URI
    else:
        text, source = _read_corpus_files(uri, text_column, storage_options), redact_uri(uri)
    validate_corpus(text, min_chars, source)
    return text


def _read_corpus_files(uri: str, text_column: str, storage_options: dict | None) -> str:
    fs, paths = _expand(uri, storage_options, CorpusError)
    parts: list[str] = []
    for path in paths:
        shown = redact_uri(fs.unstrip_protocol(path))
        if _suffix(path) in (".parquet", ".jsonl", ".json"):
            frame = _read_table(fs, path, CorpusError)
            _require_columns(frame, (text_column,), shown, CorpusError)
            part = "\n".join(frame[text_column].dropna().astype(str))
        else:
            try:
                part = fs.cat_file(path).decode("utf-8")
            except UnicodeDecodeError as exc:
                raise CorpusError(f"{shown} is not UTF-8 text (byte {exc.start})") from None
            except OSError as exc:
                raise _unreadable(shown, exc, CorpusError) from None
        # A newline between files keeps the last word of one from fusing with the first of the next.
        if parts and not parts[-1].endswith("\n"):
            parts.append("\n")
        parts.append(part)
    return "".join(parts)


def validate_corpus(text: str, min_chars: int, source: str) -> None:
    if not text.strip():
        raise CorpusError(f"corpus {source} is empty")
    if len(text) < min_chars:
        raise CorpusError(f"corpus {source} has {len(text)} characters, fewer than the {min_chars} required")


# --------------------------------------------------------------------------- digests


def text_digest(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


def _canonical(value):
    if not pd.api.types.is_scalar(value):  # a list or array inside a cell
        return str(value)
    if pd.isna(value):  # None, NaN, pd.NA and NaT all mean "no value"
        return None
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    try:  # 4, 4.0 and numpy scalars are the same rating whichever file format carried them
        return float(value) if not isinstance(value, str) else value
    except (TypeError, ValueError):
        return str(value)


def frame_digest(df: pd.DataFrame) -> str:
    """sha256 over column names and values, independent of dtype details and file format."""
    columns = [str(c) for c in df.columns]
    rows = [[_canonical(v) for v in row] for row in df.itertuples(index=False, name=None)]
    payload = json.dumps([columns, rows], ensure_ascii=False, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(payload.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------- prompts


def _split_of(paragraph: str) -> str:
    # A hash of the text, not the seed, picks the split: prompts drawn with any two seeds stay disjoint.
    bucket = int(hashlib.sha256(paragraph.encode("utf-8")).hexdigest()[:8], 16) % 100
    return "train" if bucket < 80 else "heldout"


def _cut_prompt(paragraph: str, start: int, prompt_len: int) -> str | None:
    if start > 0 and paragraph[start - 1] != " ":
        next_space = paragraph.find(" ", start)
        if next_space < 0:
            return None
        start = next_space + 1
    window = paragraph[start:start + prompt_len]
    if start + prompt_len < len(paragraph) and paragraph[start + prompt_len] != " ":
        window = window[: window.rfind(" ")] if " " in window else ""
    window = window.rstrip()
    return window if len(window) >= prompt_len // 2 else None


def make_prompts(text: str, n: int, prompt_len: int, *, split: str, seed: int) -> list[str]:
    """``n`` distinct prompts of about ``prompt_len`` characters, starting and ending at word boundaries.

    Each paragraph belongs to "train" (~80%) or "heldout" (~20%) by a hash of its text, and a prompt
    that also occurs in the other split's text is skipped, so the two splits never share a prompt.
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    if n < 1 or prompt_len < 8:
        raise ValueError(f"need n >= 1 and prompt_len >= 8, got n={n}, prompt_len={prompt_len}")
    paragraphs = [p for p in dict.fromkeys(text.split("\n")) if p.strip()]
    mine = [p for p in paragraphs if _split_of(p) == split and len(p) > prompt_len]
    other_text = "\n".join(p for p in paragraphs if _split_of(p) != split)
    cum_weights = list(itertools.accumulate(len(p) for p in mine))  # every character equally likely
    rng = random.Random(seed)
    prompts: dict[str, None] = {}
    for _ in range(50 * n if mine else 0):
        paragraph = rng.choices(mine, cum_weights=cum_weights)[0]
        prompt = _cut_prompt(paragraph, rng.randrange(len(paragraph) - prompt_len), prompt_len)
        if prompt and prompt not in other_text:
            prompts[prompt] = None
            if len(prompts) == n:
                return list(prompts)
    raise CorpusError(
        f"found only {len(prompts)} of {n} {split} prompts of ~{prompt_len} characters in {len(mine)} "
        f"{split} paragraphs; use a larger corpus or fewer/shorter prompts"
    )


def read_prompts(uri: str, *, storage_options: dict | None = None) -> list[str]:
    """A user's prompts: a .txt file with one per line (blank lines skipped), or a table with a ``prompt`` column."""
    fs, paths = _expand(uri, storage_options, CorpusError)
    shown = redact_uri(uri)
    if len(paths) > 1:
        raise CorpusError(f"{shown} matches {len(paths)} files; name one prompt file")
    if _suffix(paths[0]) in TABLE_SUFFIXES:
        frame = _read_table(fs, paths[0], CorpusError, keep_default_na=False, dtype=str)
        _require_columns(frame, ("prompt",), shown, CorpusError)
        bad = [i for i, p in enumerate(frame["prompt"]) if not isinstance(p, str) or not p.strip()]
        if bad:
            raise CorpusError(f"{shown}: {len(bad)} empty or missing prompts (first: row {bad[0]}, counting from 0)")
        prompts = list(frame["prompt"])
    else:
        try:
            prompts = [line for line in fs.cat_file(paths[0]).decode("utf-8").splitlines() if line.strip()]
        except UnicodeDecodeError as exc:
            raise CorpusError(f"{shown} is not UTF-8 text (byte {exc.start})") from None
    if not prompts:
        raise CorpusError(f"{shown} holds no prompts")
    return prompts


# --------------------------------------------------------------------------- feedback


@dataclass(frozen=True)
class FeedbackTable:
    """Validated feedback: ``kind`` is "ratings" (prompt, response, rating) or "pairs" (prompt, chosen, rejected)."""

    kind: str
    frame: pd.DataFrame
    digest: str


_SHAPES = {"ratings": RATING_COLUMNS, "pairs": PAIR_COLUMNS}
_SHAPES_TEXT = "ratings (prompt, response, rating) or pairs (prompt, chosen, rejected)"


def _feedback_kind(frame: pd.DataFrame, shown: str) -> str:
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
    fs, path = _filesystem(uri, storage_options, FeedbackError)
    shown = redact_uri(uri)
    if _suffix(uri) not in TABLE_SUFFIXES:
        raise FeedbackError(f"feedback {shown}: unknown file type; use one of {', '.join(TABLE_SUFFIXES)}")
    if _kind(fs, path, uri, FeedbackError) != "file":
        raise FeedbackError(f"feedback file not found: {shown}")
    # Keep "" and "NA" in CSV text columns as written: "" is an error to report, "NA" may be a real answer.
    text_dtypes = {c: str for c in ("prompt", "response", "chosen", "rejected")}
    frame = _read_table(fs, path, FeedbackError, keep_default_na=False, dtype=text_dtypes)
    if frame.empty:
        raise FeedbackError(f"feedback {shown} has no rows")
    kind = _feedback_kind(frame, shown)
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
    fs, path = _filesystem(uri, storage_options, FeedbackError)
    if _suffix(uri) != ".parquet":
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
    _require_columns(frame, RATING_COLUMNS, "ratings table", FeedbackError)
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
