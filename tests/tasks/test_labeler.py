import random
import string

import pytest

from tasks.data.corpus import builtin_corpus
from tasks.data.prompts import make_prompts
from tasks.data.labeler import (FirstLettersLabeler, Labeler, LabelerError, RealWordsLabeler, load_labeler, rate_all,
                                words)

VOCAB = ["the", "cat", "sat", "on", "mat", "a", "dog"]


def test_word_tokens_are_lowercase_letter_runs():
    assert words("The CAT's mat-42,dog!") == ["the", "cat", "s", "mat", "dog"]


@pytest.mark.parametrize(
    "response, stars",
    [
        ("The cat sat on the mat.", 5.0),  # every word is real
        ("Xq zzv plonk vrrt.", 1.0),  # none is
        ("the cat sat qqq zzz www", 3.0),  # half
        ("the cat sat on zzz", 4.0),  # 4 of 5: 1 + 4 * 0.8 = 4.2 -> 4.0
        ("the cat sat on the mat zzz qqq", 4.0),  # 6 of 8: exactly 4
        ("the cat sat on the mat a zzz qqq", 4.0),  # 7 of 9: 4.11 -> 4.0
        ("the cat sat on the mat a dog zzz qqq qqq", 4.0),  # 8 of 11: 3.91 -> 4.0
        ("the cat sat zzz qqq qqq qqq qqq", 2.5),  # 3 of 8: exactly 2.5
        ("the cat sat on a" + " zzz" * 11, 2.5),  # 5 of 16: 2.25 rounds up to 2.5
        ("the cat", 1.0),  # fewer than min_words words
        ("", 1.0),
    ],
)
def test_hand_checked_ratings(response, stars):
    labeler = RealWordsLabeler(VOCAB)
    assert labeler.rate("any prompt", response) == stars


def test_score_is_the_unquantised_share_and_prompt_is_ignored():
    labeler = RealWordsLabeler(VOCAB)
    assert labeler.score("", "the cat sat qqq") == 0.75
    assert labeler.score("", "...") == 0.0
    assert labeler.rate("the cat", "zz qq ww") == labeler.rate("something else", "zz qq ww")
    assert isinstance(labeler, Labeler)


def test_from_corpus_counts_words_and_skips_stray_letters():
    text = "Alpha beta beta. ALPHA x x x a a a gamma alpha"
    labeler = RealWordsLabeler.from_corpus(text, min_count=3)
    assert labeler.vocabulary == {"alpha", "a"}
    with pytest.raises(LabelerError, match="3 or more times"):
        RealWordsLabeler.from_corpus("one two three", min_count=3)


def _corrupt(text: str, rate: float, rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_lowercase) if c.isalpha() and rng.random() < rate else c for c in text)


def test_ratings_fall_as_corruption_rises_on_unseen_text():
    corpus = builtin_corpus()
    labeler = RealWordsLabeler.from_corpus(corpus)
    samples = make_prompts(corpus, 100, 120, split="heldout", seed=0)
    rng = random.Random(0)
    means = []
    for rate in (0.0, 0.1, 0.3, 0.6):
        ratings = [labeler.rate("", _corrupt(s, rate, rng)) for s in samples]
        means.append(sum(ratings) / len(ratings))
        assert len(set(ratings)) > 1  # a spread, not one value for everything
    assert means == sorted(means, reverse=True) and means[0] > 4.5 and means[-1] < 2


def test_load_builtin_labeler():
    labeler = load_labeler("builtin:real-words", "cat cat cat mat mat mat sat sat sat")
    assert labeler.rate("", "cat sat mat") == 5.0


def test_load_custom_labeler_class_factory_or_instance(tmp_path, monkeypatch):
    (tmp_path / "my_raters.py").write_text(
        "class Lengthy:\n"
        "    def rate(self, prompt, response):\n"
        "        return min(5.0, 1.0 + len(response) / 10)\n"
        "def make():\n"
        "    return Lengthy()\n"
        "instance = Lengthy()\n"
        "not_a_labeler = 42\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    for attr in ("Lengthy", "make", "instance"):
        labeler = load_labeler(f"my_raters:{attr}", "")
        assert rate_all(labeler, ["p", "p"], ["", "x" * 20]) == [1.0, 3.0]
    with pytest.raises(LabelerError, match="'my_raters:not_a_labeler' resolves to a 'int' object, which has no rate"):
        load_labeler("my_raters:not_a_labeler", "")
    with pytest.raises(LabelerError, match="has no attribute 'missing'"):
        load_labeler("my_raters:missing", "")


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no_such_module_xyz:Rater", "cannot import module 'no_such_module_xyz'"),
        ("just-a-name", "must be one of builtin:real-words, builtin:a-to-m or 'package.module:attr'"),
        ("builtin:typo", "unknown labeler 'builtin:typo'; built-in labelers: builtin:real-words, builtin:a-to-m"),
    ],
)
def test_bad_labeler_specs_are_named(spec, message):
    with pytest.raises(LabelerError, match=message):
        load_labeler(spec, "")


def test_rate_all_rejects_ratings_outside_the_scale():
    class Broken:
        def rate(self, prompt, response):
            return 7

    with pytest.raises(LabelerError, match="Broken rated response 0 7.0, outside 1 to 5 stars"):
        rate_all(Broken(), ["p"], ["r"])
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        rate_all(RealWordsLabeler(VOCAB), ["p", "q"], ["r"])


def test_repeating_a_word_does_not_buy_stars():
    labeler = RealWordsLabeler(["the", "cat", "sat"])
    assert labeler.score("", "the the the the") == 0.5  # only two of the four count
    assert labeler.rate("", "the cat sat the cat sat") == 5.0  # twice each is still writing
    assert labeler.rate("", "the the the the the the the the") == 2.0


@pytest.mark.parametrize("response, stars", [
    ("the cat sat on the mat", 5.0),  # share 1
    ("the cat sat qqq zzz www", 1.0),  # share 4/8 = 0.5: at the floor
    ("the cat sat on the qqq zzz www", 2.0),  # 5/8 = 0.625: 1 + 4 * 0.25
    ("the cat sat on the mat qqq zzz", 3.0),  # 6/8 = 0.75: 1 + 4 * 0.5
    ("the cat sat on the mat a qqq", 4.0),  # 7/8 = 0.875: 1 + 4 * 0.75
])
def test_strict_rater_spreads_stars_above_the_floor(response, stars):
    assert RealWordsLabeler(VOCAB, floor=0.5).rate("", response) == stars


def test_builtin_labeler_is_strict_and_names_what_it_depends_on():
    labeler = load_labeler("builtin:real-words", "the cat sat on the mat " * 3)
    assert labeler.floor == 0.5
    assert "floor=0.5" in labeler.identity and "cut-word=prefix" in labeler.identity


@pytest.mark.parametrize("response, stars", [
    ("the cat sat on the ma", 5.0),  # cut off inside "mat": the start of a real word counts
    ("the cat sat on the ma.", 4.5),  # ended by the writer, not by the length limit: "ma" is no word (5/6)
    ("the cat sat on the xq", 4.5),  # cut off, but no word starts with "xq" (5/6)
    ("the ca sat on the mat", 4.5),  # only the last word can have been cut off (5/6)
    ("the cat sat on the d", 5.0),  # one letter is the start of "dog"
])
def test_a_word_cut_off_by_the_length_limit_counts_when_it_begins_a_real_word(response, stars):
    assert RealWordsLabeler(VOCAB).rate("", response) == stars


A_TO_M_VOCABULARY = ["the", "cat", "and", "a", "dog", "is", "in", "it", "to", "of", "was", "that", "he", "had"]


@pytest.mark.parametrize(
    "response, stars",
    [
        # 1 + 4 x (a-to-m + 0.5) / (real + 1), to the nearest half star
        ("the cat and a dog", 4.0),  # 4 of 5 real words begin a-m: 1 + 4 x 4.5 / 6 = 4.0
        ("and a cat is", 4.5),  # all four: 1 + 4 x 4.5 / 5 = 4.6 -> 4.5
        ("to of the was that", 1.5),  # none of five: 1 + 4 x 0.5 / 6 = 1.33 -> 1.5
        ("the dog was in it", 3.5),  # 3 of 5: 1 + 4 x 3.5 / 6 = 3.33 -> 3.5
        ("and and and and a", 3.5),  # "and" counts twice: (2 + 1) of 5 -> 3.33 -> 3.5
        ("xq zz and", 4.0),  # one real word, a-m: 1 + 4 x 1.5 / 2 = 4.0
        ("xq zz", 3.0),  # no real word says nothing: the middle, 1 + 4 x 0.5 / 1
        ("xq zz and a it to", 4.0),  # non-words neither help nor hurt: 3 of 4 -> 1 + 4 x 3.5 / 5 = 3.8 -> 4.0
        ("the cat and a dogg", 4.0),  # "dogg" begins no real word and is left out: 3 of 4 -> 3.8 -> 4.0
        ("the cat and a do", 4.0),  # "do" begins "dog": 4 of 5
        ("and a in is it he had cat and a in is it he had cat", 5.0),  # 16 of 16, with repeats: 1 + 4 x 16.5 / 17
    ],
)
def test_a_to_m_rater_by_hand(response, stars):
    labeler = FirstLettersLabeler(A_TO_M_VOCABULARY)
    assert labeler.rate("any prompt", response) == stars


def test_a_to_m_is_builtin_and_told_apart_from_real_words_in_cache_keys():
    corpus = " ".join(A_TO_M_VOCABULARY)
    hard, easy = load_labeler("builtin:a-to-m", corpus), load_labeler("builtin:real-words", corpus)
    assert isinstance(hard, FirstLettersLabeler) and hard.identity != easy.identity
    assert hard.rate("", "to of the was that") == 1.5 and easy.rate("", "to of the was that") == 5.0
