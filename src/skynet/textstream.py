"""Incremental detokenisation with stop strings.

The streamed deltas concatenate to exactly `tokenizer.decode(ids, skip_special_tokens=True)`
(cut before the first stop string, if one appears). Text that could still turn into a stop string,
or an incomplete UTF-8 character, is held back until it is certain.
"""
from __future__ import annotations


class Detokenizer:
    def __init__(self, tokenizer, stop: list[str] = ()):
        self.tok = tokenizer
        self.stop = [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.emitted = 0
        self.stopped = False

    def _text(self) -> str:
        return self.tok.decode(self.ids, skip_special_tokens=True)

    def add(self, token: int) -> tuple[str, bool]:
        """Add a token; returns (new text that is safe to show, whether a stop string appeared)."""
        if self.stopped:
            return "", True
        self.ids.append(token)
        text = self._text()
        if self.stop:
            start = max(0, self.emitted - self.hold)
            hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.stopped = True
                delta = text[self.emitted:min(hits)]
                self.emitted = min(hits)
                return delta, True
        if text.endswith("\ufffd"):
            return "", False
        end = max(self.emitted, len(text) - self.hold)
        delta = text[self.emitted:end]
        self.emitted = end
        return delta, False

    def flush(self) -> str:
        """Whatever was held back, once the sequence has finished."""
        if self.stopped:
            return ""
        delta = self._text()[self.emitted:]
        self.emitted += len(delta)
        return delta
