"""Token ids -> text pieces for streaming: never half a multi-byte character, stop strings cut and held back."""

from __future__ import annotations


class TextStreamer:
    """Turns a growing list of token ids into text pieces: never splits a multi-byte character (a piece
    ending in U+FFFD waits for the next token) and holds back text that may be the start of a stop string."""

    def __init__(self, decode, stop_strings: list[str] | None = None) -> None:
        self.decode = decode  # list[int] -> str
        self.stop_strings = list(stop_strings or [])
        self.ids: list[int] = []
        self.emitted = 0  # characters of the decoded text already given out
        self.stopped = False

    def put(self, token: int) -> str:
        """Add one token; return the new text that is safe to show (may be '')."""
        if self.stopped:
            return ""
        self.ids.append(token)
        text = self.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""  # an incomplete UTF-8 sequence: wait for its remaining bytes
        cut = self._stop_at(text)
        if cut is not None:
            self.stopped = True
            piece, self.emitted = text[self.emitted:cut], cut
            return piece
        safe = len(text) - self._held(text)
        piece = text[self.emitted:safe] if safe > self.emitted else ""
        self.emitted = max(self.emitted, safe)
        return piece

    def end(self) -> str:
        """Flush what was held back at the end of generation."""
        if self.stopped:
            return ""
        text = self.decode(self.ids)
        piece, self.emitted = text[self.emitted:], len(text)
        return piece

    def _stop_at(self, text: str) -> int | None:
        hits = [i for s in self.stop_strings if (i := text.find(s, max(0, self.emitted - len(s)))) >= 0]
        return min(hits) if hits else None

    def _held(self, text: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of some stop string."""
        held = 0
        for s in self.stop_strings:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    held = max(held, k)
                    break
        return held
