"""A rater for tests: a preference the tiny model can learn in seconds, so PPO's direction is measurable."""


class Letters:
    """1 + 4 x the share of a response's characters that are ASCII letters, in half stars: "the cat" is 4.5 stars,
    "#~ 1}" 1 star. A byte model early in pretraining writes about one letter in five."""

    def rate(self, prompt: str, response: str) -> float:
        if not response:
            return 1.0
        share = sum(c.isascii() and c.isalpha() for c in response) / len(response)
        return round((1 + 4 * share) * 2) / 2


class Repetition:
    """A rigged rater that a policy can exploit: 1 + 4 x the share of a response's characters that are its most
    common one, in half stars. "aaaaaaaa" is 5 stars; saying anything at all is penalised."""

    def rate(self, prompt: str, response: str) -> float:
        if not response:
            return 1.0
        share = max(response.count(c) for c in set(response)) / len(response)
        return round((1 + 4 * share) * 2) / 2


class RepeatedWord:
    """A rigged rater that pays for repeating a word: 1 + 4 x the share of a response's words that are its most
    common word (words: runs of letters), in half stars; fewer than three words is 1 star."""

    def rate(self, prompt: str, response: str) -> float:
        words = "".join(c if c.isalpha() else " " for c in response.lower()).split()
        if len(words) < 3:
            return 1.0
        share = max(words.count(w) for w in set(words)) / len(words)
        return round((1 + 4 * share) * 2) / 2
