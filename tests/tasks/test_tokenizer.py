"""Tokenizers: any text round-trips, end-of-text and padding are tokens no text encodes to, a BPE trained twice on the
same text is the same file, and a tokenizer file loads back as the same tokenizer."""

from __future__ import annotations

import pytest

from tasks.data.corpus import builtin_corpus
from tasks.data.tokenizer import (EOT, PAD, ByteTokenizer, TokenizerError, digest, tokenizer_from_file, train_bpe)

TEXTS = ["naïve café, 東京, emoji 🙂 and a tab\there", "", " leading and trailing spaces ", "line\n\nbreaks\r\n",
         f"text that spells {EOT} and {PAD}", "\x00 control \x1f chars", "Ωμέγα ∑ ∫ √ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢"]


@pytest.fixture(scope="module")
def bpe():
    return train_bpe(builtin_corpus().split("\n"), 1024)


@pytest.mark.parametrize("kind", ["bytes", "bpe"])
def test_any_unicode_text_round_trips_and_never_encodes_to_a_special_token(kind, bpe):
    tok = ByteTokenizer() if kind == "bytes" else bpe
    for text in TEXTS:
        ids = tok.encode(text)
        assert tok.decode(ids) == text, repr(text)
        assert tok.eos_id not in ids and tok.pad_id not in ids and all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode([*tok.encode("done"), tok.eos_id, tok.pad_id]) == "done"


def test_bpe_is_smaller_than_bytes_on_english_and_deterministic(bpe):
    text = builtin_corpus()[:20000]
    assert len(bpe.encode(text)) < 0.4 * len(ByteTokenizer().encode(text))
    again = train_bpe(builtin_corpus().split("\n"), 1024)
    assert again.to_file() == bpe.to_file() and digest(again) == digest(bpe)
    assert bpe.vocab_size == 1024 and {bpe.eos_id, bpe.pad_id} == {0, 1}


@pytest.mark.parametrize("kind", ["bytes", "bpe"])
def test_a_tokenizer_file_loads_back_as_the_same_tokenizer(kind, bpe):
    tok = ByteTokenizer() if kind == "bytes" else bpe
    loaded = tokenizer_from_file(tok.to_file())
    assert loaded.kind == kind and digest(loaded) == digest(tok)
    assert [loaded.encode(t) for t in TEXTS] == [tok.encode(t) for t in TEXTS]
    assert loaded.encode(f"a {EOT} b") == tok.encode(f"a {EOT} b")  # a loaded BPE still encodes the marker as text


def test_bad_tokenizer_files_and_sizes_are_refused():
    with pytest.raises(TokenizerError, match="must be JSON"):
        tokenizer_from_file(b"\x80 not json")
    with pytest.raises(TokenizerError, match="not a tokenizer file"):
        tokenizer_from_file(b'{"type": "something else"}')
    with pytest.raises(TokenizerError, match="at least 258"):
        train_bpe(["text"], 100)
