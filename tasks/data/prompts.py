"""Prompts: cut from the corpus at word boundaries (train and held-out never overlap), or a user's prompt file."""

from __future__ import annotations

import hashlib
import itertools
import random

from tasks.data.corpus import CorpusError
from tasks.data.files import TABLE_SUFFIXES, expand, read_bytes, read_table, require_columns, suffix
from tasks.redact import redact_uri


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
    fs, paths = expand(uri, storage_options, CorpusError)
    shown = redact_uri(uri)
    if len(paths) > 1:
        raise CorpusError(f"{shown} matches {len(paths)} files; name one prompt file")
    if suffix(paths[0]) in TABLE_SUFFIXES:
        frame = read_table(fs, paths[0], CorpusError, keep_default_na=False, dtype=str)
        require_columns(frame, ("prompt",), shown, CorpusError)
        bad = [i for i, p in enumerate(frame["prompt"]) if not isinstance(p, str) or not p.strip()]
        if bad:
            raise CorpusError(f"{shown}: {len(bad)} empty or missing prompts (first: row {bad[0]}, counting from 0)")
        prompts = list(frame["prompt"])
    else:
        try:
            prompts = [line for line in read_bytes(fs, paths[0], CorpusError).decode("utf-8").splitlines()
                       if line.strip()]
        except UnicodeDecodeError as exc:
            raise CorpusError(f"{shown} is not UTF-8 text (byte {exc.start})") from None
    if not prompts:
        raise CorpusError(f"{shown} holds no prompts")
    return prompts
