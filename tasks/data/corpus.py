"""The training corpus: the built-in English prose, or a user's text files and tables, as one string; and the token
windows pretraining samples from it.
"""

from __future__ import annotations

import functools
import re

import torch

from tasks.data.files import expand, read_bytes, read_table, require_columns, suffix
from tasks.redact import redact_uri

BUILTIN_CORPUS_URI = "builtin://cpython-docs"


class CorpusError(ValueError):
    """The training corpus (or a prompt file) cannot be used as given."""


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
    fs, paths = expand(uri, storage_options, CorpusError)
    parts: list[str] = []
    for path in paths:
        shown = redact_uri(fs.unstrip_protocol(path))
        if suffix(path) in (".parquet", ".jsonl", ".json"):
            frame = read_table(fs, path, CorpusError)
            require_columns(frame, (text_column,), shown, CorpusError)
            part = "\n".join(frame[text_column].dropna().astype(str))
        else:
            try:
                part = read_bytes(fs, path, CorpusError).decode("utf-8")
            except UnicodeDecodeError as exc:
                raise CorpusError(f"{shown} is not UTF-8 text (byte {exc.start})") from None
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
