"""The corpus, prepared once for every stage after it: a token file and a text sample, made in two streaming passes.

    pass 1  the corpus's digest, and a sample of its paragraphs (all of them, up to SAMPLE_CHARS; beyond that the
            ones whose hashes are smallest, a uniform choice that does not depend on where they sit), kept in corpus
            order; a BPE tokenizer is trained on that sample
    pass 2  every document's tokens, an end-of-text token after each, appended to tokens.bin (uint16, or uint32 for
            vocabularies over 65,536 ids) without the corpus ever being in memory

Pretraining reads windows from tokens.bin memory-mapped; later stages cut prompts and build raters from sample.txt.
Neither reads the corpus again. Memory stays bounded by the sample and one batch of pieces, whatever the corpus size.
"""

from __future__ import annotations

import hashlib
import heapq
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks.data.tokenizer import ByteTokenizer, Tokenizer

SAMPLE_CHARS = 8_000_000  # the text sample's size: all of the built-in corpus (335k characters), a slice of a big one
DOCUMENT_SEPARATOR = b"\x1e"  # between documents in the digest: two documents are not their concatenation
BATCH_CHARS = 1 << 20  # pieces tokenized together: the BPE tokenizer encodes a batch on all cores


@dataclass
class Scan:
    digest: str  # "sha256:..." of the documents
    documents: int
    chars: int
    sample: list[str]  # paragraphs, in corpus order
    sample_complete: bool  # every paragraph of the corpus is in the sample


def scan(pieces: Iterable[tuple[str, bool]], sample_chars: int = SAMPLE_CHARS) -> Scan:
    """Pass 1 over (text, ends a document) pieces (tasks.data.corpus.iter_corpus): the digest and the text sample. A
    paragraph is a line of a document."""
    digest, count, chars, kept, kept_chars, dropped = hashlib.sha256(), 0, 0, [], 0, False
    position = 0
    for text, ends in pieces:
        digest.update(text.encode("utf-8"))
        if ends:
            digest.update(DOCUMENT_SEPARATOR)
            count += 1
        chars += len(text)
        for paragraph in text.split("\n"):
            if not paragraph.strip():
                continue
            position += 1
            rank = int.from_bytes(hashlib.blake2b(paragraph.encode(), digest_size=8).digest(), "big")
            heapq.heappush(kept, (-rank, position, paragraph))  # a max-heap on the hash: the largest leaves first
            kept_chars += len(paragraph) + 1
            while kept_chars > sample_chars and len(kept) > 1:
                _, _, gone = heapq.heappop(kept)
                kept_chars -= len(gone) + 1
                dropped = True
    sample = [paragraph for _, _, paragraph in sorted(kept, key=lambda item: item[1])]
    return Scan("sha256:" + digest.hexdigest(), count, chars, sample, not dropped)


def token_dtype(tokenizer: Tokenizer):
    return np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32


def write_tokens(pieces: Iterable[tuple[str, bool]], tokenizer: Tokenizer, path: Path,
                 progress: Callable[[int], None] | None = None) -> dict:
    """Pass 2 over the same pieces: tokens.bin at `path`; returns its count, dtype, documents and sha256, and the
    documents' digest (as scan computes it: the caller checks the corpus did not change between the passes). A piece
    is encoded whole: a long document is cut only at line breaks, where a BPE merge could differ from the whole
    document's in trailing spaces at most."""
    dtype, digest, documents_digest = token_dtype(tokenizer), hashlib.sha256(), hashlib.sha256()
    count = documents_done = done_chars = 0
    with open(path, "wb") as out:
        for batch in _batches(pieces):
            texts = [text for text, _ in batch]
            encoded = _encode_all(tokenizer, texts)
            for (text, ends), ids in zip(batch, encoded):
                documents_digest.update(text.encode("utf-8"))
                if ends:
                    documents_digest.update(DOCUMENT_SEPARATOR)
                    ids = np.append(ids, tokenizer.eos_id)
                    documents_done += 1
                data = ids.astype(dtype).tobytes()
                out.write(data)
                digest.update(data)
                count += len(ids)
                done_chars += len(text)
            if progress is not None:
                progress(done_chars)
    return {"file": path.name, "dtype": np.dtype(dtype).name, "count": count, "documents": documents_done,
            "sha256": digest.hexdigest(), "digest": "sha256:" + documents_digest.hexdigest()}


def _batches(items: Iterable[tuple[str, bool]]) -> Iterator[list[tuple[str, bool]]]:
    batch, size = [], 0
    for text, ends in items:
        batch.append((text, ends))
        size += len(text)
        if size >= BATCH_CHARS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _encode_all(tokenizer: Tokenizer, texts: list[str]) -> list[np.ndarray]:
    if isinstance(tokenizer, ByteTokenizer):  # UTF-8 bytes are the ids: no per-token Python objects
        return [np.frombuffer(text.encode("utf-8"), dtype=np.uint8) for text in texts]
    encode_batch = getattr(tokenizer, "encode_batch", None)
    rows = encode_batch(texts) if encode_batch else [tokenizer.encode(text) for text in texts]
    return [np.asarray(row, dtype=np.int64) for row in rows]


def open_tokens(path: Path, dtype: str, count: int) -> np.ndarray:
    """The token file, memory-mapped: windows are read from disk as training asks for them."""
    tokens = np.memmap(path, dtype=np.dtype(dtype), mode="r")
    if len(tokens) != count:
        raise ValueError(f"{path} holds {len(tokens)} tokens, its records say {count}")
    return tokens
