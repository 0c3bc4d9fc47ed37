"""Test-only fault injection: make a real node process send malformed MLP replies.

A node started with the environment variable `SKYNET_TEST_LIE=<mode>` passes every `MlpOut` it
sends through `lie(mode, reply)`. Nothing reads it in normal use; it exists so that tests can
check, against live processes, that the server computes around a node that lies:

    rows   twice the rows asked for (right width)
    width  one column too many
    nan    a NaN in the partial
    dtype  float16 instead of float32
    stale  the previous step's tag
"""
from __future__ import annotations

import os

import numpy as np

from . import wire

ENV = "SKYNET_TEST_LIE"
MODES = ("rows", "width", "nan", "dtype", "stale")


def lie_mode() -> str:
    """The mode this process was started with ('' = honest); an unknown one is an error."""
    mode = os.environ.get(ENV, "")
    if mode and mode not in MODES:
        raise ValueError(f"{ENV}={mode!r}: expected one of {', '.join(MODES)}")
    return mode


def lie(mode: str, m: wire.MlpOut) -> wire.MlpOut:
    y = m.y                                                             # (N, H)
    if mode == "rows":
        y = np.concatenate([y, y])                                      # (2N, H)
    elif mode == "width":
        y = np.concatenate([y, y[..., :1]], axis=-1)                    # (N, H + 1)
    elif mode == "nan":
        y = y.copy()
        y[..., 0] = np.nan
    elif mode == "dtype":
        y = y.astype(np.float16)
    elif mode == "stale":
        return wire.MlpOut(max(0, m.step - 1), m.epoch, m.layer, y, m.start, m.end)
    return wire.MlpOut(m.step, m.epoch, m.layer, y, m.start, m.end)
