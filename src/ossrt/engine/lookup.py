"""Prompt lookup: drafting the next tokens from the sequence itself, for generation to check several at a pass.

When the text being written repeats earlier text (code being edited, a quoted passage, a name, a list's pattern),
the tokens that followed the latest earlier occurrence of the last few tokens are a good guess at what comes next.
The guess costs no model: an index of the sequence's n-grams, kept up to date as tokens are appended.
"""

from __future__ import annotations

from typing import Iterable

NGRAM_MIN, NGRAM_MAX = 2, 4  # the longest match is tried first; a single token predicts too little


class PromptLookup:
    """The sequence so far (`append`) and the tokens that followed the latest earlier occurrence of its last
    n tokens (`draft`), n from `ngram_max` down to `ngram_min`."""

    def __init__(self, tokens: Iterable[int] = (), *, ngram_min: int = NGRAM_MIN, ngram_max: int = NGRAM_MAX):
        if not 1 <= ngram_min <= ngram_max:
            raise ValueError(f"n-gram sizes must satisfy 1 <= min <= max, got {ngram_min}, {ngram_max}")
        self.ngram_min, self.ngram_max = ngram_min, ngram_max
        self.tokens: list[int] = []
        self._next: dict[tuple[int, ...], int] = {}  # an n-gram -> where the tokens after its latest occurrence start
        for token in tokens:
            self.append(token)

    def append(self, token: int) -> None:
        tokens, end = self.tokens, len(self.tokens)
        for n in range(self.ngram_min, min(self.ngram_max, end) + 1):
            self._next[tuple(tokens[end - n:end])] = end  # the n-gram ending here is followed by `token`
        tokens.append(int(token))

    def draft(self, limit: int) -> list[int]:
        """Up to `limit` tokens that followed the longest recurring suffix's latest earlier occurrence; [] if the
        last `ngram_min` tokens never occurred before."""
        tokens, end = self.tokens, len(self.tokens)
        for n in range(min(self.ngram_max, end), self.ngram_min - 1, -1):
            start = self._next.get(tuple(tokens[end - n:end]))
            if start is not None:
                return tokens[start:start + limit]
        return []


class DraftLength:
    """How many drafted tokens the next pass checks: the number that gives the most tokens a second, from this
    generation's record. A draft of d tokens is kept up to its first miss, so a pass yields 1 + p + ... + p^d tokens
    on average, p the chance that a drafted token is kept given that the one before it was; it costs the measured time
    of a pass of 1 + d tokens. Where extra tokens cost about as much as the first (a CPU bound by its arithmetic more
    than its memory), and where the text does not repeat its context, that leaves drafts off; every `PROBE`-th draft
    refused that way is checked one token long anyway, so the record follows the text."""

    PROBE = 8
    PRIOR_EXTRA_COST = 0.5  # a token beyond the first, relative to a one-token pass, until measured
    SMOOTHING = 0.2  # weight of the newest time in a pass size's moving average

    def __init__(self, most: int):
        self.most = most
        self.kept = self.missed = 0  # drafted tokens kept; drafts cut short by a token the sampler did not pick
        self.seconds: dict[int, float] = {}  # pass size -> moving average of its time
        self._refused = 0

    def record(self, drafted: int, kept: int, seconds: float) -> None:
        """A pass of 1 + `drafted` tokens took `seconds`, and the sampler kept the first `kept` drafted ones."""
        size = 1 + drafted
        old = self.seconds.get(size)
        self.seconds[size] = seconds if old is None else old + self.SMOOTHING * (seconds - old)
        self.kept += kept
        self.missed += kept < drafted

    def choose(self, available: int) -> int:
        """Drafted tokens to check, out of `available` (at most `most`)."""
        limit = min(self.most, available)
        if limit <= 0:
            return 0
        p = (self.kept + 2) / (self.kept + self.missed + 3)  # a match is a good guess more often than not
        one = self.seconds.get(1)
        best, best_rate, tokens = 0, 1.0, 1.0
        for d in range(1, limit + 1):
            tokens += p ** d
            measured = self.seconds.get(1 + d)
            cost = measured / one if measured is not None and one else 1 + self.PRIOR_EXTRA_COST * d
            if tokens / cost > best_rate:
                best, best_rate = d, tokens / cost
        if best == 0:
            self._refused += 1
            if self._refused % self.PROBE == 0:
                return 1
        return best
