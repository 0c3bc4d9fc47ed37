"""A fixed binary header for the per-layer `Mlp` / `MlpOut` on the direct data link.

The msgpack header (wire.py) costs ~8 µs to build and ~15 µs to parse and check in Python, paid
on both ends of every layer's round trip. On the data link the two hot messages instead carry a
40-byte header that one `struct` call packs or unpacks:

    offset  size  field
    0       1     magic 0xC1 (a byte msgpack never uses, so a header frame says which it is)
    1       1     wire.VERSION
    2       1     kind: 1 = mlp, 2 = mlp_out
    3       1     dtype code: index into wire.DTYPES (mlp: float32; mlp_out: float32 or float64)
    4       4     rows  u32                     the tensor is (rows, cols), C order
    8       4     cols  u32
    12      8     step  u64  (< 2**62, as wire.py)
    20      8     epoch u64  (< 2**62)
    28      4     layer u32
    32      4     start u32  the sub-range of the node's holding to compute (replicas.py);
    36      4     end   u32  0, 0 = the whole holding
    little-endian; then the tensor frame, rows * cols * itemsize bytes

The same checks as wire.decode apply (version, kind, dtype whitelist, byte length against shape,
frame cap, then wire's per-message semantics: dtype per kind, hidden size, layer index), and the
result is the same frozen `wire.Mlp` / `wire.MlpOut`. Anything else on the link (the hello, or a
tensor that is not 2-D) keeps the msgpack header: `decode` reads both. ZeroMQ carries msgpack
headers only (`Outgoing`), so peers that speak only wire.py keep working over it.
"""
from __future__ import annotations

import struct

import numpy as np

from . import wire

MAGIC = 0xC1
HEADER = struct.Struct("<BBBBIIQQIII")
KINDS = {1: wire.Mlp, 2: wire.MlpOut}
_KIND_OF = {cls: k for k, cls in KINDS.items()}
_DTYPES = list(wire.DTYPES.values())
_CODE_OF = {dt: i for i, dt in enumerate(_DTYPES)}
_LIMIT = 2 ** 62


def encode(msg: wire.Message) -> list:
    """Mlp / MlpOut with a 2-D tensor -> [40-byte header, tensor buffer (no copy)]; any other
    message (or shape) -> wire.encode(msg), which `decode` reads as well."""
    kind = _KIND_OF.get(type(msg))
    a = getattr(msg, msg.TENSORS[0]) if kind else None
    code = _CODE_OF.get(a.dtype) if kind else None
    if code is None or a.ndim != 2 or not (msg.step < _LIMIT and msg.epoch < _LIMIT
                                           and max(msg.layer, msg.start, msg.end) < 2**32):
        return wire.encode(msg)
    a = np.ascontiguousarray(a)
    head = HEADER.pack(MAGIC, wire.VERSION, kind, code, a.shape[0], a.shape[1], msg.step, msg.epoch, msg.layer,
                       msg.start, msg.end)
    return [head, a.data]


class Outgoing:
    """One Mlp for many nodes, encoded once per transport: `link` (fixed header, data links)
    now, `zmq` (msgpack, what any ZeroMQ peer reads) only if some node needs it."""

    def __init__(self, msg: wire.Message):
        self.msg, self.link = msg, encode(msg)
        self._zmq: list | None = None

    @property
    def zmq(self) -> list:
        if self._zmq is None:
            self._zmq = wire.encode(self.msg)
        return self._zmq


def decode(frames: list, limits: wire.Limits = wire.Limits()) -> wire.Message:
    """Frames of a data-link message -> Message (fixed or msgpack header), or WireError."""
    if not frames:
        raise wire.WireError("empty message")
    head = _view(frames[0])
    if head.nbytes == 0 or head[0] != MAGIC:
        return wire.decode(frames, limits)
    if head.nbytes != HEADER.size:
        raise wire.WireError(f"fixed header of {head.nbytes} bytes, expected {HEADER.size}")
    _, version, kind, code, rows, cols, step, epoch, layer, start, end = HEADER.unpack(head)
    if version != wire.VERSION:
        raise wire.WireError(f"protocol version {version}, expected {wire.VERSION}")
    cls = KINDS.get(kind)
    if cls is None:
        raise wire.WireError(f"unknown fixed-header kind {kind}")
    if code >= len(_DTYPES):
        raise wire.WireError(f"{cls.TYPE}: dtype code {code} not allowed")
    if step >= _LIMIT or epoch >= _LIMIT:
        raise wire.WireError(f"{cls.TYPE}: step {step} or epoch {epoch} out of range")
    if len(frames) != 2:
        raise wire.WireError(f"{cls.TYPE}: expected 1 tensor frame, got {len(frames) - 1}")
    dtype = _DTYPES[code]
    body = _view(frames[1])
    expect = rows * cols * dtype.itemsize   # Python ints: no wrap-around
    if expect > limits.max_frame:
        raise wire.WireError(f"{cls.TYPE}: {expect} bytes exceeds the {limits.max_frame} cap")
    if body.nbytes != expect:
        raise wire.WireError(f"{cls.TYPE}: {body.nbytes} bytes, shape ({rows}, {cols}) needs {expect}")
    msg = cls(step, epoch, layer, np.frombuffer(body, dtype=dtype).reshape(rows, cols), start, end)   # (rows, cols)
    wire.check_semantics(msg, limits)
    return msg


def _view(frame) -> memoryview:
    """Bytes of a frame: a buffer, or a zmq.Frame (received with copy=False)."""
    return memoryview(frame.buffer if hasattr(frame, "buffer") else frame).cast("B")
