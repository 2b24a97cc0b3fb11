"""Text of a generated token sequence, released in safe pieces, with stop strings (used by every decode)."""

from __future__ import annotations


class StopMatcher:
    """Streaming Knuth-Morris-Pratt matcher for one stop string: ``feed`` reads new characters only, so the work per
    token is linear in the characters it added (amortised), never in the text so far or the stop string's length
    (only ``__init__`` is, once). ``matched`` is the length of the longest tail of the text read so far that is a
    prefix of the stop string: the part to hold back, or the whole string once it occurred."""

    def __init__(self, stop: str) -> None:
        self.stop = stop
        self.matched = 0
        self._fail = [0] * len(stop)  # _fail[i]: longest proper prefix of stop[:i + 1] that is also its suffix
        k = 0
        for i in range(1, len(stop)):
            while k and stop[i] != stop[k]:
                k = self._fail[k - 1]
            if stop[i] == stop[k]:
                k += 1
            self._fail[i] = k

    def feed(self, piece: str) -> int | None:
        """Read ``piece``; the index in ``piece`` just past the first complete occurrence, or None."""
        stop, fail, k = self.stop, self._fail, self.matched
        for index, char in enumerate(piece):
            while k and char != stop[k]:
                k = fail[k - 1]
            if char == stop[k]:
                k += 1
            if k == len(stop):
                self.matched = k
                return index + 1
        self.matched = k
        return None


class TextStream:
    """Text of a growing token sequence, released in safe pieces.

    ``push`` decodes only the tail since the last complete character (the window trick of vLLM and TGI: decode
    ``ids[prefix:]`` and ``ids[prefix:read]`` and keep the difference, unless it ends in an incomplete UTF-8
    sequence). A stop string ends the text before it; ``take`` returns what is new, holding back a tail that could
    still grow into a stop string. Stop strings are matched incrementally (``StopMatcher``), so a long one costs
    its length once, not per token.
    """

    def __init__(self, tokenizer, stop: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = list(stop)
        self._matchers = [StopMatcher(string) for string in self.stop if string]
        self.ids: list[int] = []
        self.text = ""
        self.stopped = False
        self._prefix = self._read = self._sent = 0

    def push(self, token: int) -> None:
        self.ids.append(token)
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._append(after[len(before):])
            self._prefix, self._read = self._read, len(self.ids)

    def finish(self) -> None:
        """Release the undecoded tail (an incomplete character becomes U+FFFD), unless a stop string ended it."""
        if self.stopped or self._read == len(self.ids):
            return
        before = self._decode(self.ids[self._prefix:self._read])
        self._append(self._decode(self.ids[self._prefix:])[len(before):])
        self._read = len(self.ids)

    def take(self, final: bool = False) -> str:
        end = len(self.text) if final or self.stopped else len(self.text) - self._held_back()
        if end <= self._sent:
            return ""
        piece, self._sent = self.text[self._sent:end], end
        return piece

    def _append(self, piece: str) -> None:
        if self.stopped or not piece:
            return
        before = len(self.text)
        self.text += piece
        # each matcher's first occurrence ending in this piece; the earliest start wins, as str.find would choose
        starts = [before + end - len(m.stop) for m in self._matchers if (end := m.feed(piece)) is not None]
        if starts:
            self.text, self.stopped = self.text[:min(starts)], True

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        return max((m.matched for m in self._matchers), default=0)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
