"""Incremental detokenisation with stop strings, at a constant cost per token.

The streamed deltas concatenate to exactly `tokenizer.decode(ids, skip_special_tokens=True)`
(cut before the first stop string, if one appears). Text that could still turn into a stop string,
or an incomplete UTF-8 character, is held back until it is certain.

Only a window of recent tokens is decoded, as vLLM and TGI do: `ids[prefix:read]` are the tokens
whose text was taken last time, and the new text is

    decode(ids[prefix:])[len(decode(ids[prefix:read])):]

Decoding the window from `prefix` rather than from `read` keeps whatever a tokenizer does at the
start of a string (SentencePiece drops a leading space) out of the difference. The window moves on
only once its text does not end in an incomplete character, so `read` is always a character
boundary and the pieces join up exactly. A tokenizer that rewrites text across token boundaries
when decoding (`clean_up_tokenization_spaces`) cannot be windowed: for it the window never moves,
which is exact but costs O(n) per token.
"""
from __future__ import annotations


class Detokenizer:
    def __init__(self, tokenizer, stop: list[str] = ()):
        self.tok = tokenizer
        self.stop = [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.prefix = self.read = 0   # ids[prefix:read]: the window whose text was taken last
        self.held = ""                # text taken but not shown yet (could start a stop string)
        self.stopped = False
        self.windowed = not getattr(tokenizer, "clean_up_tokenization_spaces", False)

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def _take(self, final: bool = False) -> str:
        """The text of the tokens not taken yet; '' while it ends in an incomplete character
        (unless final)."""
        old = self._decode(self.ids[self.prefix:self.read])
        new = self._decode(self.ids[self.prefix:])
        if new.endswith("\ufffd") and not final:
            return ""
        if self.windowed:
            self.prefix = self.read
        self.read = len(self.ids)
        return new[len(old):]

    def add(self, token: int) -> tuple[str, bool]:
        """Add a token; returns (new text that is safe to show, whether a stop string appeared)."""
        if self.stopped:
            return "", True
        self.ids.append(token)
        text = self.held + self._take()
        if self.stop:   # a stop string ends in the new text and starts at most `hold` before it
            hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
            if hits:
                self.stopped, self.held = True, ""
                return text[:min(hits)], True
        cut = max(0, len(text) - self.hold)
        self.held = text[cut:]
        return text[:cut], False

    def flush(self) -> str:
        """Whatever was held back, once the sequence has finished."""
        if self.stopped:
            return ""
        text, self.held = self.held + self._take(final=True), ""
        return text
