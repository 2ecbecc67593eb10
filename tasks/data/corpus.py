"""The training corpus as a stream of documents: the built-in English prose (a paragraph a document), a user's text
files (a file a document, or the pieces between `<|endoftext|>` markers in it), or the text column of Parquet and
JSON-lines tables (a row a document). Read in pieces, never whole; and the token windows pretraining samples.
"""

from __future__ import annotations

import codecs
import functools
import re
from collections.abc import Iterator

import numpy as np
import torch

from tasks.data.files import expand, require_columns, suffix, unreadable
from tasks.redact import redact_uri

BUILTIN_CORPUS_URI = "builtin://cpython-docs"
DOCUMENT_MARKER = "<|endoftext|>"  # between documents of a text file, as many corpora write them
CHUNK_BYTES = 4 << 20
PIECE_CHARS = 4 << 20  # a document longer than this comes in pieces that end at a line break
TABLE_ROWS = 8192


class CorpusError(ValueError):
    """The training corpus (or a prompt file) cannot be used as given."""


def split_tokens(tokens, heldout_fraction: float):
    """Train / validation as two contiguous pieces, so no validation window overlaps training text."""
    if not 0 <= heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    n_heldout = round(len(tokens) * heldout_fraction)
    cut = len(tokens) - n_heldout
    return tokens[:cut], tokens[cut:]


def sample_windows(tokens, batch_size: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """(batch_size, seq_len + 1) int64 windows at random offsets of a token array (a memory-mapped token file reads
    just these).

    Only ``generator`` is consumed, so restoring ``generator.get_state()`` from a checkpoint
    resumes the exact sequence of batches.
    """
    if len(tokens) < seq_len + 1:
        raise CorpusError(
            f"corpus has {len(tokens)} tokens but a training window needs seq_len + 1 = {seq_len + 1}; "
            "use a larger corpus or a smaller seq_len"
        )
    starts = torch.randint(0, len(tokens) - seq_len, (batch_size,), generator=generator)
    index = (starts[:, None] + torch.arange(seq_len + 1)).numpy()  # (b, seq_len + 1)
    return torch.as_tensor(np.asarray(tokens[index]).astype(np.int64))


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


def iter_corpus(uri: str | None, text_column: str = "text",
                storage_options: dict | None = None) -> Iterator[tuple[str, bool]]:
    """The corpus behind ``uri`` as (text, ends a document) pieces; None or ``BUILTIN_CORPUS_URI`` is the built-in
    one. Files come in sorted order. Memory holds one piece (or one batch of table rows) at a time."""
    if uri is None or uri == BUILTIN_CORPUS_URI:
        for paragraph in builtin_corpus().split("\n"):
            yield paragraph, True
        return
    fs, paths = expand(uri, storage_options, CorpusError)
    for path in paths:
        shown = redact_uri(fs.unstrip_protocol(path))
        if suffix(path) in (".parquet", ".jsonl", ".json"):
            for text in _table_rows(fs, path, shown, text_column):
                yield from _pieces(text)
        else:
            yield from _text_file(fs, path, shown)


def _pieces(document: str) -> Iterator[tuple[str, bool]]:
    while len(document) > PIECE_CHARS:
        cut = document.rfind("\n", 0, PIECE_CHARS) + 1 or PIECE_CHARS
        yield document[:cut], False
        document = document[cut:]
    yield document, True


def _open(fs, path: str, shown: str):
    try:
        return fs.open(path, "rb")
    except FileNotFoundError:
        raise CorpusError(f"file not found: {shown}") from None
    except Exception as exc:
        raise unreadable(shown, exc, CorpusError) from None


def _text_file(fs, path: str, shown: str) -> Iterator[tuple[str, bool]]:
    """A UTF-8 text file, decoded as it streams; `<|endoftext|>` ends a document, and so does the file's end."""
    decoder, buffer, offset = codecs.getincrementaldecoder("utf-8")("strict"), "", 0
    f = _open(fs, path, shown)
    with f:
        while True:
            try:
                chunk = f.read(CHUNK_BYTES)
            except Exception as exc:
                raise unreadable(shown, exc, CorpusError) from None
            try:
                buffer += decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as exc:
                raise CorpusError(f"{shown} is not UTF-8 text (byte {offset + exc.start})") from None
            offset += len(chunk)
            *documents, buffer = buffer.split(DOCUMENT_MARKER)
            for document in documents:
                yield from _pieces(document)
            if not chunk:
                break
            if len(buffer) > PIECE_CHARS:  # a long document: hand on its whole lines, keep a marker's worth back
                keep = len(buffer) - len(DOCUMENT_MARKER)
                cut = buffer.rfind("\n", 0, keep) + 1 or keep
                yield buffer[:cut], False
                buffer = buffer[cut:]
    yield buffer, True


def _table_rows(fs, path: str, shown: str, text_column: str) -> Iterator[str]:
    """The text column of a Parquet or JSON-lines table, a batch of rows at a time; empty cells skipped."""
    f = _open(fs, path, shown)
    with f:
        try:
            if suffix(path) == ".parquet":
                import pyarrow.parquet as pq

                table = pq.ParquetFile(f)
                if text_column not in table.schema_arrow.names:
                    raise CorpusError(f"{shown} has no column {text_column!r}; columns present: "
                                      f"{table.schema_arrow.names}")
                batches = (b.column(0).to_pylist() for b in table.iter_batches(TABLE_ROWS, columns=[text_column]))
            else:
                import pandas as pd

                frames = pd.read_json(f, lines=True, dtype=False, chunksize=TABLE_ROWS)
                batches = (_column(frame, text_column, shown) for frame in frames)
            for batch in batches:
                yield from (str(v) for v in batch if v is not None and v == v)  # v == v: not NaN
        except CorpusError:
            raise
        except Exception as exc:  # a parser's error, or the store failing mid-read
            error = unreadable(shown, exc, CorpusError)
            if isinstance(error, CorpusError):
                raise CorpusError(f"cannot read {shown}: {exc}") from None
            raise error from None


def _column(frame, column: str, shown: str) -> list:
    require_columns(frame, (column,), shown, CorpusError)
    return frame[column].tolist()


def read_corpus(uri: str | None, text_column: str = "text", storage_options: dict | None = None,
                *, min_chars: int = 1) -> str:
    """The whole corpus as one string (documents joined by newlines), for small corpora and people: the pipeline
    itself streams it (iter_corpus). ``min_chars``: refuse a corpus with less text."""
    parts: list[str] = []
    for text, ends in iter_corpus(uri, text_column, storage_options):
        parts.append(text)
        if ends and not text.endswith("\n"):  # the last word of one document must not fuse with the next's first
            parts.append("\n")
    if parts and parts[-1] == "\n":
        parts.pop()
    text = "".join(parts)
    validate_corpus(text, min_chars, BUILTIN_CORPUS_URI if uri in (None, BUILTIN_CORPUS_URI) else redact_uri(uri))
    return text


def check_corpus(uri: str | None, text_column: str, min_chars: int) -> None:
    """Before any compute, cheaply: the corpus is readable and holds at least `min_chars` of text (it stops reading
    there)."""
    shown = BUILTIN_CORPUS_URI if uri in (None, BUILTIN_CORPUS_URI) else redact_uri(uri)
    seen = 0
    for text, _ in iter_corpus(uri, text_column):
        seen += len(text.strip()) and len(text)
        if seen >= min_chars:
            return
    if seen == 0:
        raise CorpusError(f"corpus {shown} is empty")
    raise CorpusError(f"corpus {shown} has {seen} characters, fewer than the {min_chars} required")


def validate_corpus(text: str, min_chars: int, source: str) -> None:
    if not text.strip():
        raise CorpusError(f"corpus {source} is empty")
    if len(text) < min_chars:
        raise CorpusError(f"corpus {source} has {len(text)} characters, fewer than the {min_chars} required")
