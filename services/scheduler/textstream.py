"""Incremental detokenization with stop strings.

Text is released as tokens arrive, except a tail that is an incomplete UTF-8 sequence or could
still become a stop string; a stop string ends the text before it.
"""
from __future__ import annotations

from typing import Any


class TextStream:
    def __init__(self, tokenizer: Any, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.ids: list[int] = []
        self.emitted = 0
        self.stopped = False

    def _text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def push(self, tokens: list[int]) -> str:
        """Add tokens; returns the newly released text. Sets `stopped` on a stop string."""
        if self.stopped:
            return ""
        self.ids.extend(tokens)
        text = self._text()
        hits = [i for i in (text.find(s, max(0, self.emitted - len(s) + 1)) for s in self.stop) if i >= 0]
        if hits:
            end = min(hits)
            self.stopped = True
        else:
            # an incomplete UTF-8 tail decodes to U+FFFD; hold it, and check stop-string
            # prefixes against the text before it (else "a" of stop "a✓" leaks out while "✓"
            # is still incomplete)
            stable = text.rstrip("\ufffd")
            end = len(stable)
            for s in self.stop:
                for k in range(min(len(s) - 1, len(stable)), 0, -1):
                    if stable.endswith(s[:k]):
                        end = min(end, len(stable) - k)
                        break
        out = text[self.emitted : end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return out

    def flush(self) -> str:
        """The text held back, once generation has ended (nothing after a stop string)."""
        if self.stopped:
            return ""
        text = self._text()
        out = text[self.emitted :]
        self.emitted = len(text)
        return out
