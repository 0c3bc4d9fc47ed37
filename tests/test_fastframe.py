"""The fixed binary header of Mlp/MlpOut on the data link (fastframe.py): round trips, each
check, fuzzing, and that anything else still travels with the msgpack header."""
from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from skynet import fastframe, wire

H, LAYERS = 8, 4
LIMITS = wire.Limits(hidden=H, layers=LAYERS)


def _frames(kind=1, code=0, rows=2, cols=H, step=5, epoch=2, layer=1, body=None, version=wire.VERSION,
            start=0, end=0):
    head = fastframe.HEADER.pack(fastframe.MAGIC, version, kind, code, rows, cols, step, epoch, layer, start, end)
    itemsize = list(wire.DTYPES.values())[code].itemsize if code < len(wire.DTYPES) else 4
    return [head, bytes(rows * cols * itemsize) if body is None else body]


@pytest.mark.parametrize("msg", [wire.Mlp(3, 1, 0, np.arange(2 * H, dtype=np.float32).reshape(2, H)),
                                 wire.MlpOut(2**62 - 1, 7, 3, np.full((1, H), -1.5, np.float64)),
                                 wire.MlpOut(1, 1, 1, np.ones((3, H), np.float32)),
                                 wire.Mlp(1, 1, 0, np.zeros((0, H), np.float32)),
                                 wire.Mlp(1, 1, 0, np.ones((1, H), np.float32), 32, 64),      # a replica's
                                 wire.MlpOut(1, 1, 0, np.ones((1, H), np.float64), 32, 64)])  # sub-range
def test_round_trip(msg):
    frames = fastframe.encode(msg)
    assert len(frames[0]) == fastframe.HEADER.size == 40 and frames[0][0] == fastframe.MAGIC
    got = fastframe.decode([bytes(f) for f in frames], LIMITS)
    assert type(got) is type(msg) and got == msg
    a, b = getattr(got, msg.TENSORS[0]), getattr(msg, msg.TENSORS[0])
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(a, b)


def test_tensor_travels_without_copy_and_non_contiguous_input_is_made_contiguous():
    x = np.ones((2, H), np.float32)
    assert np.shares_memory(np.frombuffer(fastframe.encode(wire.Mlp(1, 1, 0, x))[1], np.float32), x)
    t = np.arange(2 * H, dtype=np.float32).reshape(H, 2).T        # (2, H), not C-contiguous
    got = fastframe.decode(fastframe.encode(wire.Mlp(1, 1, 0, t)), LIMITS)
    np.testing.assert_array_equal(got.x, t)


@pytest.mark.parametrize("msg", [wire.DataHello(1, b"t" * 32), wire.Ping(1.0),
                                 wire.Mlp(1, 1, 0, np.ones((1, 1, H), np.float32)),   # not 2-D
                                 wire.Mlp(1, 1, 0, np.ones(H, np.float32))])
def test_other_messages_and_shapes_keep_the_msgpack_header_and_decode_the_same(msg):
    frames = fastframe.encode(msg)
    assert frames[0][0] != fastframe.MAGIC
    got = fastframe.decode(frames, LIMITS)
    assert got == msg
    for name in msg.TENSORS:
        assert getattr(got, name).shape == getattr(msg, name).shape


@pytest.mark.parametrize("frames,match", [
    ([b""], "not msgpack"),
    ([], "empty"),
    ([_frames()[0][:39], bytes(2 * H * 4)], "fixed header of 39"),
    (_frames(start=64, end=32), "empty sub-range"),
    (_frames(version=wire.VERSION + 1), "version"),
    (_frames(kind=3), "kind"),
    (_frames(kind=0), "kind"),
    (_frames(code=99), "dtype code"),
    (_frames(code=list(wire.DTYPES).index("float64")), "expected float32"),      # mlp: float32 only
    (_frames(kind=2, code=list(wire.DTYPES).index("uint8")), "expected float32 or float64"),
    (_frames(cols=H + 1), "hidden size"),
    (_frames(layer=LAYERS), "layer 4 out of range"),
    (_frames(step=2**62), "out of range"),
    (_frames(epoch=2**64 - 1), "out of range"),
    (_frames(body=bytes(2 * H * 4 - 1)), "needs"),
    (_frames()[:1], "1 tensor frame"),
    (_frames() + [b""], "1 tensor frame"),
    (_frames(rows=2**32 - 1, cols=2**32 - 1, body=b""), "cap"),
])
def test_rejects(frames, match):
    with pytest.raises(wire.WireError, match=match):
        fastframe.decode(frames, LIMITS)


def test_frame_cap_applies():
    with pytest.raises(wire.WireError, match="cap"):
        fastframe.decode(_frames(rows=4), wire.Limits(hidden=H, max_frame=4 * H * 4 - 1))


@settings(max_examples=400, deadline=None)
@given(st.binary(min_size=40, max_size=40), st.binary(max_size=200))
def test_fuzz_any_fixed_header(head, body):
    """Any 40 bytes behind the magic: a valid Mlp/MlpOut within the limits, or a WireError."""
    head = bytes([fastframe.MAGIC]) + head[1:]
    try:
        msg = fastframe.decode([head, body], LIMITS)
    except wire.WireError:
        return
    a = getattr(msg, msg.TENSORS[0])
    assert a.shape[-1] == H and msg.layer < LAYERS and a.nbytes == len(body)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 31), st.integers(1, 255))
def test_fuzz_every_flipped_header_byte(pos, xor):
    head = bytearray(fastframe.encode(wire.MlpOut(9, 3, 2, np.ones((2, H), np.float64)))[0])
    head[pos] ^= xor
    try:
        msg = fastframe.decode([bytes(head), bytes(2 * H * 8)], LIMITS)
    except wire.WireError:
        return
    assert msg.y.nbytes == 2 * H * 8 and msg.y.shape[-1] == H   # only step/epoch/layer/rows may differ


def test_outgoing_is_fixed_on_the_link_and_msgpack_on_zeromq():
    out = fastframe.Outgoing(wire.Mlp(4, 2, 1, np.ones((1, H), np.float32)))
    assert out.link[0][0] == fastframe.MAGIC and out._zmq is None    # msgpack only when needed
    assert wire.decode(out.zmq, LIMITS) == out.msg == fastframe.decode(out.link, LIMITS)
    assert out.zmq is out.zmq                                          # encoded once
