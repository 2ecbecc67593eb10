"""Tokenizers: UTF-8 bytes, or a byte-level BPE trained on the corpus with Hugging Face `tokenizers` (Sennrich et al.
2016, https://arxiv.org/abs/1508.07909; byte-level as in GPT-2). Both have an end-of-text token (between documents in
pretraining; it ends a response) and a padding token that no text encodes to.

A tokenizer is a file, tokenizer.json, stored in every checkpoint and served model made with it; the sha256 of that file
is the tokenizer's identity (`digest`), so a checkpoint can never be paired with another tokenizer.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Protocol

EOT, PAD = "<|endoftext|>", "<|pad|>"
KINDS = ("bytes", "bpe")
_BYTES_FILE = {"type": "palm-rlhf-bytes", "version": 1, "eos_id": 256, "pad_id": 257}


class TokenizerError(ValueError):
    """A tokenizer file that cannot be read, or settings that cannot make one."""


class Tokenizer(Protocol):
    kind: str
    vocab_size: int  # ids are 0 .. vocab_size - 1, the special tokens included
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids) -> str: ...

    def to_file(self) -> bytes: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0-255; 256 is end-of-text, 257 padding. Any text round-trips, and no file is trained."""

    kind, vocab_size, eos_id, pad_id = "bytes", 258, 256, 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        # A sampled sequence can stop inside a multi-byte character: U+FFFD rather than an error. The special tokens
        # (and ids a model with spare vocabulary may sample) are not text.
        return bytes(int(i) for i in _ids(ids) if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def to_file(self) -> bytes:
        return json.dumps(_BYTES_FILE, sort_keys=True).encode()


class BPETokenizer:
    """A byte-level BPE: any text encodes (no unknown token) and round-trips. Text that spells a special token
    ("<|endoftext|>") is encoded as text, never as the token itself."""

    kind = "bpe"

    def __init__(self, tokenizer):
        tokenizer.encode_special_tokens = True  # not kept in the file: set on every load
        self._tok = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()
        self.eos_id, self.pad_id = tokenizer.token_to_id(EOT), tokenizer.token_to_id(PAD)
        if self.eos_id is None or self.pad_id is None:
            raise TokenizerError(f"a BPE tokenizer file needs the special tokens {EOT} and {PAD}")

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # encode_batch_fast: no character offsets, which nothing here reads; twice the throughput measured
        return [e.ids for e in self._tok.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in _ids(ids) if 0 <= int(i) < self.vocab_size],
                                skip_special_tokens=True)

    def to_file(self) -> bytes:
        return self._tok.to_str().encode()


def _ids(ids):
    return ids.flatten().tolist() if hasattr(ids, "flatten") else ids


def digest(tokenizer: Tokenizer) -> str:
    return "sha256:" + hashlib.sha256(tokenizer.to_file()).hexdigest()


def record(tokenizer: Tokenizer) -> dict:
    """What a checkpoint's manifest says of the tokenizer file it carries (tokenizer.json)."""
    return {"kind": tokenizer.kind, "digest": digest(tokenizer), "vocab_size": tokenizer.vocab_size,
            "eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id}


def tokenizer_from_file(data: bytes) -> Tokenizer:
    """The tokenizer a tokenizer.json describes (this project's bytes file, or a Hugging Face tokenizer file)."""
    try:
        spec = json.loads(data)
    except ValueError as err:
        raise TokenizerError(f"a tokenizer file must be JSON ({err})") from None
    if spec == _BYTES_FILE:
        return ByteTokenizer()
    if isinstance(spec, dict) and spec.get("model", {}).get("type") == "BPE":
        from tokenizers import Tokenizer as HFTokenizer

        return BPETokenizer(HFTokenizer.from_str(data.decode()))
    raise TokenizerError("not a tokenizer file of this project (bytes) or a byte-level BPE tokenizer.json")


def train_bpe(texts: Iterable[str], vocab_size: int, length: int | None = None) -> BPETokenizer:
    """A byte-level BPE of `vocab_size` ids (the 256 byte symbols and the two special tokens included), trained on
    `texts`. Deterministic: the same texts and size give the same file."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 2:
        raise TokenizerError(f"a byte-level BPE needs a vocabulary of at least {len(alphabet) + 2} (the 256 byte "
                             f"symbols and the two special tokens), got {vocab_size}")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT, PAD], initial_alphabet=alphabet,
                                  min_frequency=2, show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    return BPETokenizer(tok)
