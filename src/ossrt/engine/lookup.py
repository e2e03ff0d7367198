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
