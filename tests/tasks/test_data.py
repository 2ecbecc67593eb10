import json

import numpy as np
import pandas as pd
import pytest
import torch

from tasks.data.corpus import (BUILTIN_CORPUS_URI, CorpusError, builtin_corpus, read_corpus, sample_windows,
                               split_tokens)
from tasks.data.files import frame_digest, text_digest
from tasks.data.prompts import make_prompts, read_prompts
from tasks.data.tables import FeedbackError, pairs_from_ratings, read_feedback, write_feedback
from tasks.data.tokenfile import open_tokens, write_tokens
from tasks.data.tokenizer import ByteTokenizer

# ----------------------------------------------------------------- tokens


def test_tokenizer_round_trips_non_ascii_text():
    tok = ByteTokenizer()
    text = "naïve café, 東京, emoji 🙂"
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.decode(torch.tensor(ids)) == text


def test_decode_of_a_cut_character_does_not_fail():
    ids = ByteTokenizer().encode("é")[:1]
    assert ByteTokenizer().decode(ids) == "\ufffd"


def test_a_token_file_holds_each_document_then_end_of_text_and_splits_contiguously(tmp_path):
    tok = ByteTokenizer()
    info = write_tokens([("abcd", True), ("efg", False), ("hi", True)], tok, tmp_path / "tokens.bin")
    tokens = open_tokens(tmp_path / "tokens.bin", info["dtype"], info["count"])
    assert tokens.dtype == np.uint16 and tokens.tolist() == [*b"abcd", tok.eos_id, *b"efghi", tok.eos_id]
    assert info["documents"] == 2 and info["count"] == 11
    train, val = split_tokens(tokens, 0.2)
    assert train.tolist() == tokens[:9].tolist() and val.tolist() == tokens[9:].tolist()
    window = sample_windows(train, 1, 8, torch.Generator().manual_seed(0))
    assert window.dtype == torch.long and window[0].tolist() == tokens[:9].tolist()


def test_sample_windows_resumes_exactly_from_saved_generator_state():
    tokens = torch.arange(1000) % 256
    gen = torch.Generator().manual_seed(7)
    sample_windows(tokens, 4, 16, gen)
    state = gen.get_state()
    expected = [sample_windows(tokens, 4, 16, gen) for _ in range(3)]

    resumed = torch.Generator()
    resumed.set_state(state)
    torch.manual_seed(123)  # the global RNG must not matter
    got = [sample_windows(tokens, 4, 16, resumed) for _ in range(3)]
    for a, b in zip(expected, got):
        assert torch.equal(a, b)
    assert got[0].shape == (4, 17) and got[0].dtype == torch.long
    # each window is a contiguous slice of the corpus
    start = int(got[0][0, 0])
    assert got[0][0].tolist() == tokens[start:start + 17].tolist()


def test_sample_windows_names_both_lengths_when_corpus_is_too_short():
    with pytest.raises(CorpusError, match=r"10 tokens.*seq_len \+ 1 = 17"):
        sample_windows(torch.zeros(10, dtype=torch.uint8), 2, 16, torch.Generator())


# ----------------------------------------------------------------- corpus


def test_builtin_corpus_is_large_english_and_deterministic():
    text = builtin_corpus()
    assert len(text) > 200_000
    assert text.isascii()
    assert ">>>" not in text
    assert " the " in text and "\n\n" not in text
    assert text_digest(read_corpus(None)) == text_digest(read_corpus(BUILTIN_CORPUS_URI)) == text_digest(text)


def test_read_corpus_txt_file_folder_and_glob_in_sorted_order(tmp_path):
    (tmp_path / "b.txt").write_text("second file")
    (tmp_path / "a.txt").write_text("first file\n")
    (tmp_path / "notes.md").write_text("markdown")
    assert read_corpus(str(tmp_path / "a.txt")) == "first file\n"
    assert read_corpus(f"file://{tmp_path}/*.txt") == "first file\nsecond file"
    assert read_corpus(str(tmp_path)) == "first file\nsecond file\nmarkdown"


def test_read_corpus_tables_use_the_text_column(tmp_path):
    pd.DataFrame({"text": ["one", "two"], "id": [1, 2]}).to_parquet(tmp_path / "c.parquet")
    (tmp_path / "d.jsonl").write_text('{"body": "three"}\n{"body": "four"}\n')
    assert read_corpus(str(tmp_path / "c.parquet")) == "one\ntwo"
    assert read_corpus(str(tmp_path / "d.jsonl"), text_column="body") == "three\nfour"


def test_read_corpus_errors_are_clear(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"body": "three"}\n')
    with pytest.raises(CorpusError, match=r"no column 'text'; columns present: \['body'\]"):
        read_corpus(str(tmp_path / "d.jsonl"))
    with pytest.raises(CorpusError, match="no file matches"):
        read_corpus(str(tmp_path / "*.txt"))
    with pytest.raises(CorpusError, match="no file matches"):
        read_corpus(str(tmp_path / "missing.txt"))
    (tmp_path / "blank.txt").write_text("  \n\n")
    with pytest.raises(CorpusError, match="is empty"):
        read_corpus(str(tmp_path / "blank.txt"))
    (tmp_path / "short.txt").write_text("tiny")
    with pytest.raises(CorpusError, match="has 4 characters, fewer than the 100 required"):
        read_corpus(str(tmp_path / "short.txt"), min_chars=100)


@pytest.mark.parametrize(
    "read",
    [read_corpus, read_prompts, read_feedback, lambda uri: write_feedback(RATINGS, uri)],
    ids=["corpus", "prompts", "feedback", "write_feedback"],
)
def test_credentials_inside_a_uri_are_refused_without_being_shown(read):
    # AWS secrets may contain "/", which ends the URL's host part for a plain parser
    with pytest.raises(ValueError, match="credentials inside a URI") as info:
        read("s3://AKIAEXAMPLE:top/secret@bucket/data/f.csv")
    assert "top" not in str(info.value) and "AKIAEXAMPLE" not in str(info.value)
    assert "s3://***@bucket/data/f.csv" in str(info.value)


# ----------------------------------------------------------------- prompts


def test_prompts_are_deterministic_disjoint_and_cut_at_words():
    text = builtin_corpus()
    train = make_prompts(text, 50, 40, split="train", seed=0)
    assert train == make_prompts(text, 50, 40, split="train", seed=0)
    assert train != make_prompts(text, 50, 40, split="train", seed=1)
    heldout = make_prompts(text, 50, 40, split="heldout", seed=0) + make_prompts(text, 50, 40, split="heldout", seed=1)
    assert not set(train) & set(heldout)
    assert len(set(train)) == 50
    for prompt in train:
        assert 20 <= len(prompt) <= 40 and prompt == prompt.strip()
        at = text.index(prompt)  # a verbatim piece of the corpus that starts and ends at word boundaries
        assert at == 0 or text[at - 1] in " \n"
        assert text[at + len(prompt)] in " \n"


def test_make_prompts_says_when_material_runs_out():
    with pytest.raises(CorpusError, match="found only"):
        make_prompts("one short paragraph of words\nanother one here", 5, 10, split="train", seed=0)


def test_read_prompts_from_text_and_tables(tmp_path):
    (tmp_path / "p.txt").write_text("first prompt\n\n  \nsecond prompt\n")
    assert read_prompts(str(tmp_path / "p.txt")) == ["first prompt", "second prompt"]
    (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
    assert read_prompts(str(tmp_path / "p.jsonl")) == ["a", "b"]
    pd.DataFrame({"prompt": ["x", "y"]}).to_parquet(tmp_path / "p.parquet")
    assert read_prompts(str(tmp_path / "p.parquet")) == ["x", "y"]


def test_read_prompts_errors(tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(CorpusError, match="holds no prompts"):
        read_prompts(str(tmp_path / "empty.txt"))
    pd.DataFrame({"question": ["x"]}).to_parquet(tmp_path / "q.parquet")
    with pytest.raises(CorpusError, match=r"no column 'prompt'; columns present: \['question'\]"):
        read_prompts(str(tmp_path / "q.parquet"))


# ----------------------------------------------------------------- digests

RATINGS = pd.DataFrame(
    {"prompt": ["p1", "p1", "p1", "p2", "p2"], "response": ["good", "ok", "bad", "fine", "poor"],
     "rating": [5, 3.5, 1, 4, 3]}
)
PAIRS = pd.DataFrame({"prompt": ["p1", "p2"], "chosen": ["good", "fine"], "rejected": ["bad", "poor"]})


def _write(frame, path):
    if path.suffix == ".csv":
        frame.to_csv(path, index=False)
    elif path.suffix == ".parquet":
        frame.to_parquet(path, index=False)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in frame.to_dict("records")))


def test_frame_digest_ignores_file_format_and_sees_value_changes(tmp_path):
    _write(RATINGS, tmp_path / "r.csv")
    _write(RATINGS, tmp_path / "r.parquet")
    from_csv = pd.read_csv(tmp_path / "r.csv")
    from_parquet = pd.read_parquet(tmp_path / "r.parquet")
    assert frame_digest(from_csv) == frame_digest(from_parquet) == frame_digest(RATINGS)
    changed = RATINGS.copy()
    changed.loc[2, "rating"] = 2
    assert frame_digest(changed) != frame_digest(RATINGS)
    assert frame_digest(RATINGS.rename(columns={"rating": "stars"})) != frame_digest(RATINGS)


# ----------------------------------------------------------------- feedback


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".jsonl"])
def test_read_feedback_both_shapes_in_every_format(tmp_path, suffix):
    _write(RATINGS, tmp_path / f"r{suffix}")
    _write(PAIRS, tmp_path / f"p{suffix}")
    ratings = read_feedback(str(tmp_path / f"r{suffix}"))
    pairs = read_feedback(str(tmp_path / f"p{suffix}"))
    assert ratings.kind == "ratings" and ratings.frame["rating"].tolist() == [5, 3.5, 1, 4, 3]
    assert pairs.kind == "pairs" and pairs.frame["chosen"].tolist() == ["good", "fine"]
    assert ratings.digest == frame_digest(RATINGS) and pairs.digest == frame_digest(PAIRS)


def test_read_feedback_keeps_number_like_text_as_text(tmp_path):
    frame = pd.DataFrame({"prompt": ["2 + 2 =", "3 + 3 ="], "response": ["4", "6"], "rating": [5, 5]})
    for suffix in (".csv", ".jsonl"):
        _write(frame, tmp_path / f"n{suffix}")
        read = read_feedback(str(tmp_path / f"n{suffix}")).frame
        assert read["response"].tolist() == ["4", "6"]


def test_write_feedback_round_trips_with_the_same_digest(tmp_path):
    uri = f"file://{tmp_path}/deep/folder/ratings.parquet"
    digest = write_feedback(RATINGS, uri)
    assert read_feedback(uri).digest == digest
    with pytest.raises(FeedbackError, match="Parquet"):
        write_feedback(RATINGS, str(tmp_path / "ratings.csv"))


def _feedback_error(tmp_path, frame, name="f.csv", **kwargs) -> str:
    _write(frame, tmp_path / name)
    with pytest.raises(FeedbackError) as info:
        read_feedback(str(tmp_path / name), **kwargs)
    return str(info.value)


def test_feedback_file_missing_or_unknown_type(tmp_path):
    with pytest.raises(FeedbackError, match="not found"):
        read_feedback(str(tmp_path / "none.csv"))
    with pytest.raises(FeedbackError, match=r"unknown file type; use one of \.csv"):
        read_feedback(str(tmp_path / "f.xlsx"))


def test_feedback_empty_table(tmp_path):
    assert "has no rows" in _feedback_error(tmp_path, RATINGS.iloc[:0])


def test_feedback_missing_columns_names_them_and_the_shapes(tmp_path):
    message = _feedback_error(tmp_path, RATINGS.drop(columns="rating"))
    assert "as ratings it lacks 'rating'" in message
    assert "pairs (prompt, chosen, rejected)" in message
    assert "Columns present: ['prompt', 'response']" in message


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_feedback_bad_ratings_give_count_and_first_row(tmp_path, suffix):
    frame = RATINGS.astype({"rating": object})
    frame.loc[1, "rating"] = "great"
    frame.loc[3, "rating"] = None
    frame.loc[2, "rating"] = 9
    message = _feedback_error(tmp_path, frame, name=f"f{suffix}", rating_scale=(1, 5))
    assert "column 'rating' is NaN, empty or not a number in 2 rows (first: row 1; rows 1, 3)" in message
    assert "column 'rating' is outside [1, 5] in 1 row (first: row 2)" in message


def test_feedback_rating_range_is_configurable(tmp_path):
    message = _feedback_error(tmp_path, RATINGS, rating_scale=(0, 1))
    assert "outside [0, 1] in 4 rows (first: row 0" in message


def test_feedback_empty_strings_and_identical_pairs(tmp_path):
    frame = RATINGS.copy()
    frame.loc[4, "response"] = ""
    assert "column 'response' is an empty string in 1 row (first: row 4)" in _feedback_error(tmp_path, frame)
    pairs = PAIRS.copy()
    pairs.loc[1, "rejected"] = "fine"
    assert "chosen == rejected, which states no preference, in 1 row (first: row 1)" in _feedback_error(tmp_path, pairs)


def test_pairs_from_ratings_keeps_pairs_with_enough_margin():
    pairs = pairs_from_ratings(RATINGS, min_margin=1.0)
    assert list(map(tuple, pairs[["prompt", "chosen", "rejected"]].values)) == [
        ("p1", "good", "ok"), ("p1", "good", "bad"), ("p1", "ok", "bad"), ("p2", "fine", "poor"),
    ]
    assert pairs["margin"].tolist() == [1.5, 4.0, 2.5, 1.0]
    assert len(pairs_from_ratings(RATINGS, min_margin=2.0)) == 2
    capped = pairs_from_ratings(RATINGS, min_margin=1.0, max_pairs_per_prompt=1, seed=3)
    assert capped.groupby("prompt").size().tolist() == [1, 1]
    assert capped.equals(pairs_from_ratings(RATINGS, min_margin=1.0, max_pairs_per_prompt=1, seed=3))


def test_pairs_from_ratings_averages_repeated_ratings():
    repeated = pd.DataFrame({"prompt": ["p"] * 4, "response": ["a", "a", "b", "b"], "rating": [5, 3, 2, 2]})
    pairs = pairs_from_ratings(repeated)
    assert pairs[["chosen", "rejected", "margin"]].values.tolist() == [["a", "b", 2.0]]


def test_ratings_on_any_scale_are_read_as_they_come(tmp_path):
    thumbs = pd.DataFrame({"prompt": ["p1", "p1", "p2"], "response": ["yes", "no", "maybe"], "rating": [1, 0, 1]})
    _write(thumbs, tmp_path / "thumbs.jsonl")
    table = read_feedback(str(tmp_path / "thumbs.jsonl"))
    assert table.rating_scale == (0.0, 1.0) and table.frame["rating"].tolist() == [1.0, 0.0, 1.0]
    assert read_feedback(str(tmp_path / "thumbs.jsonl"), rating_scale=(0, 10)).rating_scale == (0, 10)
    same = pd.DataFrame({"prompt": ["p"], "response": ["r"], "rating": [7]})
    _write(same, tmp_path / "same.csv")
    assert read_feedback(str(tmp_path / "same.csv")).rating_scale is None  # one value says nothing of the scale


def test_exact_duplicate_rows_are_dropped_and_counted(tmp_path):
    doubled = pd.concat([RATINGS, RATINGS.iloc[[0, 2]], RATINGS.iloc[[0]]], ignore_index=True)
    _write(doubled, tmp_path / "d.csv")
    table = read_feedback(str(tmp_path / "d.csv"))
    assert table.duplicates_dropped == 3 and len(table.frame) == len(RATINGS)
    assert table.frame["response"].tolist() == RATINGS["response"].tolist() and table.digest == frame_digest(RATINGS)


def test_pairs_of_whole_dialogues_take_their_shared_beginning_as_the_prompt(tmp_path):
    human = "\n\nHuman: Can you summarise this?\n\nAssistant: Sure.\n\nHuman: Go on.\n\nAssistant:"
    frame = pd.DataFrame({"chosen": [human + " Here it is.", "The answer is yes"],
                          "rejected": [human + " No.", "The answer is no"]})
    _write(frame, tmp_path / "hh.jsonl")
    table = read_feedback(str(tmp_path / "hh.jsonl"))
    assert table.kind == "pairs" and table.prompts_derived == 2
    assert table.frame["prompt"].tolist() == [human, "The answer is "]
    assert table.frame["chosen"].tolist() == [" Here it is.", "yes"]
    assert table.frame["rejected"].tolist() == [" No.", "no"]
    unrelated = pd.DataFrame({"chosen": ["abc", "same start a"], "rejected": ["xyz", "same start b"]})
    message = _feedback_error(tmp_path, unrelated, name="u.jsonl")
    assert "share no beginning" in message and "1 row (first: row 0)" in message


def test_missing_text_is_refused_with_its_row_numbers(tmp_path):
    frame = RATINGS.astype({"response": object})
    frame.loc[[1, 3], "response"] = None
    message = _feedback_error(tmp_path, frame, name="m.jsonl")
    assert "column 'response' is missing or not text in 2 rows (first: row 1; rows 1, 3)" in message
