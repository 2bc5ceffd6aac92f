"""Stop strings: text-level stopping over token output.

A stop string may span several tokens and may end inside a token, so the check works on the
decoded text of everything generated so far. When one appears, the output ends right before it:
`text` is cut exactly there and `output_ids` keep the tokens that lie wholly before it (a token
that straddles the cut is dropped from the ids; its leading part stays in the text).

While the text ends with the beginning of a stop string, the tokens that make it are held back
from streaming: they may turn out to be part of the stop string and never belong to the output.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

DecodeText = Callable[[Sequence[int]], str]


@dataclass(frozen=True)
class StopHit:
    keep: int   # how many of the generated tokens stay in output_ids
    text: str   # the generated text, cut before the stop string


class StopStrings:
    def __init__(self, stops: Sequence[str], decode_text: DecodeText):
        self.stops = tuple(stops)
        self.decode = decode_text

    def find(self, ids: Sequence[int]) -> StopHit | None:
        """The earliest stop string in the text of `ids`, if any."""
        text = self.decode(ids)
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if not found:
            return None
        cut = text[:min(found)]
        return StopHit(self._tokens_within(ids, cut), cut)

    def safe(self, ids: Sequence[int]) -> int:
        """How many leading tokens of `ids` can no longer become part of a stop string."""
        text = self.decode(ids)
        held = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])),
                   default=0)
        return len(ids) if held == 0 else self._tokens_within(ids, text[:len(text) - held])

    def _tokens_within(self, ids: Sequence[int], text: str) -> int:
        """The most leading tokens whose own text is a prefix of `text`."""
        for k in range(len(ids), 0, -1):
            if text.startswith(self.decode(ids[:k])):
                return k
        return 0
