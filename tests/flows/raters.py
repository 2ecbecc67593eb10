"""A rater for tests: a preference the tiny model can learn in seconds, so PPO's direction is measurable."""


class Letters:
    """1 + 4 x the share of a response's characters that are ASCII letters, in half stars: "the cat" is 4.5 stars,
    "#~ 1}" 1 star. A byte model early in pretraining writes about one letter in five."""

    def rate(self, prompt: str, response: str) -> float:
        if not response:
            return 1.0
        share = sum(c.isascii() and c.isalpha() for c in response) / len(response)
        return round((1 + 4 * share) * 2) / 2
