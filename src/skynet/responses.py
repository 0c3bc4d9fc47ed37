"""OpenAI response pieces built from the engine's TokenLogprobs: logprobs in the legacy
completions shape and in the chat shape. Pure functions; `text_of(token) -> str` names a token.

Legacy (completions), one list entry per token:
    tokens[i]          the token's text
    token_logprobs[i]  its logprob (null for an echoed prompt's first token)
    top_logprobs[i]    {text: logprob} of the k most likely tokens, best first, plus the token
                       itself when it is not among them (up to k + 1 entries; null where
                       token_logprobs is null)
    text_offset[i]     where the token starts in the choice's text: the sum of the lengths of
                       the token texts before it
Chat: {"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}
"""
from __future__ import annotations

from typing import Callable

from .sampling import TokenLogprob

TextOf = Callable[[int], str]


def legacy_logprobs(lps: list[TokenLogprob], text_of: TextOf, offset: int = 0) -> tuple[dict, int]:
    """-> (the legacy logprobs object of these tokens, the text offset after the last one)."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for lp in lps:
        text = text_of(lp.token)
        out["tokens"].append(text)
        out["text_offset"].append(offset)
        offset += len(text)
        out["token_logprobs"].append(lp.logprob)
        top = None
        if lp.logprob is not None:
            top = {}
            for tok, value in lp.top:
                top.setdefault(text_of(tok), value)
            top.setdefault(text, lp.logprob)
        out["top_logprobs"].append(top)
    return out, offset


def _chat_token(token: int, logprob: float, text_of: TextOf) -> dict:
    text = text_of(token)
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def chat_logprobs(lps: list[TokenLogprob], text_of: TextOf) -> dict:
    return {"content": [{**_chat_token(lp.token, lp.logprob, text_of),
                         "top_logprobs": [_chat_token(t, v, text_of) for t, v in lp.top]}
                        for lp in lps],
            "refusal": None}
