"""Text of a generated token sequence, released in safe pieces, with stop strings (used by every decode)."""

from __future__ import annotations


class TextStream:
    """Text of a growing token sequence, released in safe pieces.

    ``push`` decodes only the tail since the last complete character (the window trick of vLLM and TGI: decode
    ``ids[prefix:]`` and ``ids[prefix:read]`` and keep the difference, unless it ends in an incomplete UTF-8
    sequence). A stop string ends the text before it; ``take`` returns what is new, holding back a tail that could
    still grow into a stop string.
    """

    def __init__(self, tokenizer, stop: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = list(stop)
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
        start = max(0, len(self.text) - max((len(s) for s in self.stop), default=0) + 1)
        self.text += piece
        found = [index for index in (self.text.find(s, start) for s in self.stop) if index >= 0]
        if found:
            self.text, self.stopped = self.text[:min(found)], True

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        return max((k for s in self.stop for k in range(len(s) - 1, 0, -1) if self.text.endswith(s[:k])),
                   default=0)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
