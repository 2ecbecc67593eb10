"""The simulated labeler: a deterministic rater standing in for people who rate responses.

A labeler is anything with ``rate(prompt, response) -> float`` giving 1 to 5 stars. The reward
model learns only from the ratings it produces, never from this code, just as it would learn
from people's ratings without seeing their instructions.
"""

from __future__ import annotations

import collections
import hashlib
import importlib
import math
import re
from collections.abc import Iterable
from typing import Protocol, runtime_checkable

MIN_RATING, MAX_RATING = 1.0, 5.0
BUILTIN_LABELERS = ("builtin:real-words", "builtin:a-to-m")
_NON_LETTERS = re.compile(r"[^a-z]+")
# Single letters are nearly always variable names or fragments of broken words; only these are words.
_ONE_LETTER_WORDS = frozenset({"a", "i"})


class LabelerError(ValueError):
    """A labeler cannot be loaded, or it gave a rating outside 1 to 5 stars."""


@runtime_checkable
class Labeler(Protocol):
    def rate(self, prompt: str, response: str) -> float: ...


def words(text: str) -> list[str]:
    """Word tokens as the labeler sees them: lowercase, split on anything that is not a letter a-z."""
    return [w for w in _NON_LETTERS.split(text.lower()) if w]


class RealWordsLabeler:
    """Rates how much of a response is made of real English words.

    Rater instruction: read the response only (the prompt does not matter). Split it into words at
    anything that is not a letter, ignoring case. If it has fewer than ``min_words`` words, give
    1 star. Otherwise give 1 + 4 x (share of its words found in the vocabulary) stars, rounded to
    the nearest half star (halves round up): all real words is 5 stars, half is 3, none is 1.
    A strict rater (``floor`` > 0) gives 1 star to any response whose share is at or below
    ``floor`` and spreads the stars over the rest: 1 + 4 x (share - floor) / (1 - floor).
    Saying the same word over and over is not writing: a word counts as real at most
    ``max_repeats`` times in one response ("the the the the" is half real). A response that ends
    in a letter may have been cut off by the length limit in the middle of a word: its last word
    counts as real when some vocabulary word starts with it ("... the objec" is fine, "... the
    xqzt" is not), since the writer had no chance to finish it. Word order, grammar and
    truthfulness are not judged.
    """

    def __init__(self, vocabulary: Iterable[str], min_words: int = 3, max_repeats: int = 2, floor: float = 0.0):
        self.vocabulary = frozenset(w.lower() for w in vocabulary)
        if not self.vocabulary:
            raise LabelerError("RealWordsLabeler needs a non-empty vocabulary")
        if not 0 <= floor < 1:
            raise LabelerError(f"floor must be in [0, 1), got {floor}")
        self.min_words, self.max_repeats, self.floor = min_words, max_repeats, floor
        self._prefixes = frozenset(w[:i] for w in self.vocabulary for i in range(1, len(w) + 1))

    @property
    def identity(self) -> str:
        """What determines its ratings, for cache keys: feedback from another rater is other data."""
        digest = hashlib.sha256("\n".join(sorted(self.vocabulary)).encode()).hexdigest()[:12]
        return (f"real-words(vocab={digest}, min_words={self.min_words}, max_repeats={self.max_repeats}, "
                f"floor={self.floor}, cut-word=prefix)")

    @classmethod
    def from_corpus(cls, text: str, min_count: int = 3, min_words: int = 3, **options) -> RealWordsLabeler:
        """Vocabulary: the lowercase alphabetic words seen at least ``min_count`` times in ``text``.

        The count threshold keeps out typos and one-off identifiers; single letters other than
        "a" and "i" are left out so that shattered words do not count as real ones.
        """
        counts = collections.Counter(words(text))
        vocabulary = [w for w, c in counts.items() if c >= min_count and (len(w) > 1 or w in _ONE_LETTER_WORDS)]
        if not vocabulary:
            raise LabelerError(f"no word occurs {min_count} or more times in the corpus; cannot build a vocabulary")
        return cls(vocabulary, min_words=min_words, **options)

    def score(self, prompt: str, response: str) -> float:
        """The share of the response's words that are in the vocabulary, in [0, 1] (0 with no words);
        occurrences of a word beyond its ``max_repeats``-th do not count as real, and a last word cut off
        mid-word counts when it begins a vocabulary word."""
        tokens = words(response)
        cut_off = response[-1:].isascii() and response[-1:].isalpha()
        seen: collections.Counter = collections.Counter()
        real = 0
        for i, w in enumerate(tokens):
            seen[w] += 1
            known = w in (self._prefixes if cut_off and i == len(tokens) - 1 else self.vocabulary)
            real += known and seen[w] <= self.max_repeats
        return real / len(tokens) if tokens else 0.0

    def rate(self, prompt: str, response: str) -> float:
        if len(words(response)) < self.min_words:
            return MIN_RATING
        share = max(self.score(prompt, response) - self.floor, 0.0) / (1 - self.floor)
        stars = MIN_RATING + (MAX_RATING - MIN_RATING) * share
        return math.floor(stars * 2 + 0.5) / 2  # half stars, halves up (round() would round 2.25 down)


class FirstLettersLabeler(RealWordsLabeler):
    """Rates which real words a response uses: the more of them begin with a letter from a to m, the better.

    Rater instruction: read the response only. Split it into words as for the real-words rater and keep the real
    ones (in the vocabulary; a last word cut off by the length limit counts when it begins a vocabulary word). Count
    the real words that begin with a to m, a word at most ``max_repeats`` times ("and and and and" is half a-to-m).
    Give 1 + 4 x (a-to-m words + 1/2) / (real words + 1) stars, rounded to the nearest half star (halves up): the
    share as if half a word of each kind had been added, so that a response with few real words says little either
    way and is rated near the middle (none at all is 3 stars), and each further word moves it toward its own share.
    Words that are not real neither help nor hurt.

    Why not 1 star for a response with few words, as the real-words rater gives: it would rate the base model's
    sharpness, not its taste. At lower temperatures the base model writes more real words and fewer near-empty
    answers; with that rule the demo-hard pretrained policy gained 0.13 stars from T = 0.7 alone (512 answers; 0.19 in
    an evaluation) while its a-to-m share did not move (0.549 at T = 1, 0.553 at T = 0.7). With this one: 0.03.

    It is a taste a language model does not learn from text: what makes a response likely (real, common words, in
    an order the corpus uses) is what it shares with every other response, and which half of the alphabet its words
    start with is not. "the", "to", "of", "that" and "was" begin in the second half; "and", "a", "in", "is", "it",
    "he", "for" and "had" in the first.
    """

    LETTERS = frozenset("abcdefghijklm")
    PRIOR = 0.5  # imagined words of each kind

    @property
    def identity(self) -> str:
        return f"a-to-m(prior={self.PRIOR})/" + super().identity

    def shares(self, response: str) -> tuple[int, float]:
        """(the number of real words, the share of them beginning with a to m, repeats capped)."""
        tokens = words(response)
        cut_off = response[-1:].isascii() and response[-1:].isalpha()
        seen: collections.Counter = collections.Counter()
        real = early = 0
        for i, w in enumerate(tokens):
            if w not in (self._prefixes if cut_off and i == len(tokens) - 1 else self.vocabulary):
                continue
            seen[w] += 1
            real += 1
            early += w[0] in self.LETTERS and seen[w] <= self.max_repeats
        return real, early / real if real else 0.0

    def score(self, prompt: str, response: str) -> float:
        """The share the stars are made of: (a-to-m words + PRIOR) / (real words + 2 PRIOR)."""
        real, share = self.shares(response)
        return (share * real + self.PRIOR) / (real + 2 * self.PRIOR)

    def rate(self, prompt: str, response: str) -> float:
        stars = MIN_RATING + (MAX_RATING - MIN_RATING) * self.score(prompt, response)
        return math.floor(stars * 2 + 0.5) / 2


def load_labeler(spec: str, corpus_text: str) -> Labeler:
    """A labeler from its spec: "builtin:real-words", "builtin:a-to-m" (vocabulary from ``corpus_text``) or
    "package.module:attr".

    The built-in raters know every word the corpus uses (min_count 1: what the pretrained model could have learnt).
    real-words is strict (floor 0.5): half the words misspelt is 1 star, which spreads the ratings of a small model's
    English-looking text over the whole scale. a-to-m (the demo-hard preset's) rates which real words are used.

    ``attr`` may be a labeler object, or a class or factory that is called with no arguments.
    """
    if spec == "builtin:real-words":
        return RealWordsLabeler.from_corpus(corpus_text, min_count=1, floor=0.5)
    if spec == "builtin:a-to-m":
        return FirstLettersLabeler.from_corpus(corpus_text, min_count=1)
    if spec.startswith("builtin:"):
        raise LabelerError(f"unknown labeler {spec!r}; built-in labelers: {', '.join(BUILTIN_LABELERS)}")
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise LabelerError(f"labeler spec {spec!r} must be one of {', '.join(BUILTIN_LABELERS)} or "
                           "'package.module:attr'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise LabelerError(f"labeler {spec!r}: cannot import module {module_name!r} ({exc})") from None
    target = getattr(module, attr, None)
    if target is None:
        raise LabelerError(f"labeler {spec!r}: module {module_name!r} has no attribute {attr!r}")
    if isinstance(target, type) or (callable(target) and not hasattr(target, "rate")):
        try:
            target = target()
        except TypeError as exc:
            raise LabelerError(f"labeler {spec!r}: calling {attr} with no arguments failed ({exc})") from None
    if not callable(getattr(target, "rate", None)):
        kind = type(target).__name__
        raise LabelerError(f"labeler {spec!r} resolves to a {kind!r} object, which has no rate(prompt, response)")
    return target


def rate_all(labeler: Labeler, prompts: list[str], responses: list[str]) -> list[float]:
    """Ratings for each (prompt, response) pair; a rating outside 1 to 5 stars is an error, not clipped."""
    if len(prompts) != len(responses):
        raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses")
    ratings = []
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        rating = float(labeler.rate(prompt, response))
        if not MIN_RATING <= rating <= MAX_RATING:  # NaN fails this too
            name = type(labeler).__name__
            raise LabelerError(f"{name} rated response {i} {rating}, outside {MIN_RATING:g} to {MAX_RATING:g} stars")
        ratings.append(rating)
    return ratings


def labeler_identity(labeler: Labeler, spec: str) -> str:
    """The spec plus, where the labeler says, what its ratings depend on."""
    return f"{spec} {getattr(labeler, 'identity', '')}".strip()
