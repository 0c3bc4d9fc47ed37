"""The one wire format between server and nodes.

A message is a ZeroMQ multipart: one msgpack header, then one raw frame per tensor.

    header = {"v": VERSION, "t": <type>, <scalar fields>..., "tensors": [[dtype, shape], ...]}
    frames = [header_bytes, tensor_0_bytes, tensor_1_bytes, ...]

Nothing is pickled. Every incoming message is validated (version, type whitelist, field types,
dtype whitelist, shape against byte length, frame size, layer index and hidden size when the
receiver knows them) and a bad one raises `WireError`, which receivers log, count and drop.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, fields
from typing import ClassVar

import msgpack
import numpy as np

from . import quant

VERSION = 5          # 2: block weights, float64 MlpOut; 3: direct data link (Welcome.data_*, DataHello);
                     # 4: fixed header of mlp/mlp_out on the data link (fastframe.py);
                     # 5: slice cache (Welcome.model_hash, Holding), replica sub-ranges (Mlp/MlpOut start, end)
MAX_HEADER_BYTES = 64 * 1024
MAX_FRAME_BYTES = 256 * 1024 * 1024
MAX_DIMS = 4
DTYPES = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "int32": np.dtype("<i4"),
          "float64": np.dtype("<f8"), "uint8": np.dtype("u1")}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class WireError(ValueError):
    """A frame or message that does not follow this protocol."""


@dataclass(frozen=True)
class Limits:
    """What the receiver knows, to check a message against: model shape and frame cap."""

    hidden: int | None = None
    layers: int | None = None
    max_frame: int = MAX_FRAME_BYTES
    qtypes: bytes = b""       # fast precision: (gate, up, down) ggml types per layer (Welcome.qtypes)


@dataclass(frozen=True)
class Message:
    TYPE: ClassVar[str] = ""
    TENSORS: ClassVar[tuple[str, ...]] = ()


# ---------------------------------------------------------------- node -> server
@dataclass(frozen=True)
class Hello(Message):
    """A node registers: who it is and what it can hold and compute."""

    TYPE: ClassVar[str] = "hello"
    name: str
    cores: int
    mem_bytes: int            # free memory the node offers for weights
    gflops: float             # measured matmul throughput (micro-benchmark)
    weight: float = 0.0       # user override of the planning weight, 0 = measured
    nonce: bytes = b""        # the node's challenge to the server (cluster key)


@dataclass(frozen=True)
class Ready(Message):
    """The node holds every row of plan `epoch` and can serve it."""

    TYPE: ClassVar[str] = "ready"
    epoch: int


@dataclass(frozen=True)
class MlpOut(Message):
    """Partial MLP output of the node's neuron range for one layer of one step."""

    TYPE: ClassVar[str] = "mlp_out"
    TENSORS: ClassVar[tuple[str, ...]] = ("y",)
    step: int
    epoch: int
    layer: int
    y: np.ndarray = field(repr=False, compare=False, default=None)  # (..., H)
    start: int = 0   # the Mlp's sub-range, echoed (0, 0: the node's whole held range)
    end: int = 0


@dataclass(frozen=True)
class Holding(Message):
    """After a Welcome: the rows this node has cached for the model whose hash the Welcome named,
    neurons [start, end) of every layer (0, 0 = none). The server plans it in once this arrives
    and ships only the rows outside that range; the node fills the rest from its cache."""

    TYPE: ClassVar[str] = "holding"
    model_hash: bytes
    start: int = 0
    end: int = 0


# ---------------------------------------------------------------- server -> node
@dataclass(frozen=True)
class Welcome(Message):
    """Registration accepted: the node's id and the model's shape."""

    TYPE: ClassVar[str] = "welcome"
    node_id: int
    model: str
    hidden: int
    layers: int
    neurons: int
    heartbeat_s: float
    qtypes: bytes = b""   # empty: float32 weights (exact); else 3 ggml type ids per layer (fast)
    data_port: int = 0    # the direct data link's TCP port (datalink.py), 0 = none: Mlp over ZeroMQ
    data_token: bytes = b""  # what the link's DataHello presents; empty with a cluster key (derived)
    model_hash: bytes = b""  # sha256 of the MLP weights as shipped, with their format (slicecache.py)


@dataclass(frozen=True)
class Assign(Message):
    """Plan `epoch` gives this node neurons [start, end) in every layer.

    Rows it holds in epoch `base` (0 = none) are kept; the rest arrive as `Load` messages.
    The node answers `Ready(epoch)` once it holds them all."""

    TYPE: ClassVar[str] = "assign"
    epoch: int
    start: int
    end: int
    base: int


@dataclass(frozen=True)
class Load(Message):
    """Weights for neurons [start, end) of one layer: gate and up rows, down columns.

    exact: float32, down transposed as rows (n, H), so every slice is a contiguous block.
    fast: uint8 GGML blocks in the layer's Welcome.qtypes: gate and up (n, row_bytes(H)), down
    (H, row_bytes(n)) -- its blocks run along the neuron axis, so start and end are multiples
    of the down type's block size."""

    TYPE: ClassVar[str] = "load"
    TENSORS: ClassVar[tuple[str, ...]] = ("gate", "up", "down_t")
    epoch: int
    layer: int
    start: int
    end: int
    gate: np.ndarray = field(repr=False, compare=False, default=None)    # (n, H) | (n, rb(H))
    up: np.ndarray = field(repr=False, compare=False, default=None)      # (n, H) | (n, rb(H))
    down_t: np.ndarray = field(repr=False, compare=False, default=None)  # (n, H) | (H, rb(n))


@dataclass(frozen=True)
class Mlp(Message):
    """MLP input (normalised hidden states) of every row in this step, for one layer."""

    TYPE: ClassVar[str] = "mlp"
    TENSORS: ClassVar[tuple[str, ...]] = ("x",)
    step: int
    epoch: int
    layer: int
    x: np.ndarray = field(repr=False, compare=False, default=None)  # (..., H)
    start: int = 0   # compute only neurons [start, end) of the held range (replicas.py);
    end: int = 0     # (0, 0) = the whole held range


@dataclass(frozen=True)
class DataHello(Message):
    """First message on a direct data link (node -> server): which registered node this is, and
    the proof: HMAC(K, "data" | Nn | Ns) with a cluster key, else Welcome.data_token."""

    TYPE: ClassVar[str] = "data_hello"
    node_id: int
    token: bytes


# ---------------------------------------------------------------- both ways
@dataclass(frozen=True)
class Ping(Message):
    TYPE: ClassVar[str] = "ping"
    ts: float  # not `t`: that header key is the message type


@dataclass(frozen=True)
class Pong(Message):
    TYPE: ClassVar[str] = "pong"
    ts: float  # not `t`: that header key is the message type


@dataclass(frozen=True)
class Bye(Message):
    """The sender leaves (node) or sends the node away (server), with a reason."""

    TYPE: ClassVar[str] = "bye"
    reason: str


@dataclass(frozen=True)
class Challenge(Message):
    """Cluster-key handshake (see auth.py): the server's nonce and proof, then the node's proof."""

    TYPE: ClassVar[str] = "challenge"
    nonce: bytes
    proof: bytes = b""


MESSAGES: dict[str, type[Message]] = {
    m.TYPE: m for m in (Hello, Ready, MlpOut, Welcome, Assign, Load, Mlp, Ping, Pong, Bye, Challenge,
                         DataHello, Holding)
}
_PY_TYPES = {"int": (int,), "float": (float, int), "str": (str,), "bytes": (bytes,)}


@functools.cache
def _scalar_fields(cls: type[Message]) -> tuple[tuple[str, str, tuple], ...]:
    """(name, declared type, accepted Python types) of each non-tensor field, once per class."""
    return tuple((f.name, f.type, _PY_TYPES[f.type.split(" ")[0]]) for f in fields(cls)
                 if f.name not in cls.TENSORS)


def encode(msg: Message) -> list:
    """Message -> multipart frames. Tensor frames are the arrays' own buffers (no copy)."""
    header = {"v": VERSION, "t": msg.TYPE}
    for name, _, _ in _scalar_fields(type(msg)):
        header[name] = getattr(msg, name)
    frames, specs = [], []
    for name in msg.TENSORS:
        a = np.ascontiguousarray(getattr(msg, name))
        if a.dtype not in _DTYPE_NAMES:
            raise WireError(f"{msg.TYPE}.{name}: dtype {a.dtype} cannot be sent")
        specs.append([_DTYPE_NAMES[a.dtype], list(a.shape)])
        frames.append(a.data)
    header["tensors"] = specs
    return [msgpack.packb(header, use_bin_type=True), *frames]


def _buf(frame) -> memoryview:
    return memoryview(frame.buffer if hasattr(frame, "buffer") else frame)


def decode(frames: list, limits: Limits = Limits()) -> Message:
    """Multipart frames -> Message, or WireError saying what is wrong."""
    if not frames:
        raise WireError("empty message")
    head = _buf(frames[0])
    if head.nbytes > MAX_HEADER_BYTES:
        raise WireError(f"header of {head.nbytes} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        header = msgpack.unpackb(head, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several types for garbage
        raise WireError(f"header is not msgpack: {e.__class__.__name__}") from None
    if not isinstance(header, dict):
        raise WireError("header is not a map")
    if header.get("v") != VERSION:
        raise WireError(f"protocol version {header.get('v')!r}, expected {VERSION}")
    t = header.get("t")
    cls = MESSAGES.get(t) if isinstance(t, str) else None  # a list or map here is unhashable
    if cls is None:
        raise WireError(f"unknown message type {header.get('t')!r}")
    kwargs = {}
    for name, typ, ok in _scalar_fields(cls):
        if name not in header:
            raise WireError(f"{cls.TYPE}: missing field {name!r}")
        value = header[name]
        if not isinstance(value, ok) or isinstance(value, bool):
            raise WireError(f"{cls.TYPE}.{name}: expected {typ}, got {type(value).__name__}")
        if typ == "int" and not 0 <= value < 2**62:
            raise WireError(f"{cls.TYPE}.{name}: {value} out of range")
        kwargs[name] = value
    kwargs.update(_decode_tensors(cls, header.get("tensors"), frames[1:], limits))
    msg = cls(**kwargs)
    check_semantics(msg, limits)
    return msg


def _decode_tensors(cls, specs, frames, limits: Limits) -> dict:
    if not isinstance(specs, list) or len(specs) != len(cls.TENSORS) or len(frames) != len(specs):
        raise WireError(f"{cls.TYPE}: expected {len(cls.TENSORS)} tensor frame(s), got "
                        f"{len(frames)} frame(s) and {specs!r:.80} specs")
    out = {}
    for name, spec, frame in zip(cls.TENSORS, specs, frames):
        if not (isinstance(spec, list) and len(spec) == 2 and isinstance(spec[1], list)):
            raise WireError(f"{cls.TYPE}.{name}: bad tensor spec")
        dtype = DTYPES.get(spec[0]) if isinstance(spec[0], str) else None
        if dtype is None:
            raise WireError(f"{cls.TYPE}.{name}: dtype {spec[0]!r} not allowed")
        shape = spec[1]
        if not 1 <= len(shape) <= MAX_DIMS or not all(
                isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**31 for d in shape):
            raise WireError(f"{cls.TYPE}.{name}: bad shape {shape!r:.80}")
        buf = _buf(frame)
        expect = math.prod(shape) * dtype.itemsize  # exact: an int64 product can wrap around
        if expect > limits.max_frame:
            raise WireError(f"{cls.TYPE}.{name}: {expect} bytes exceeds the {limits.max_frame} cap")
        if buf.nbytes != expect:
            raise WireError(f"{cls.TYPE}.{name}: {buf.nbytes} bytes, shape {shape} needs {expect}")
        out[name] = np.frombuffer(buf, dtype=dtype).reshape(shape)
    return out


def _check_block_load(m: Load, limits: Limits) -> None:
    """A fast-precision Load: uint8 blocks of the layer's types, shapes and range on block bounds."""
    if limits.hidden is None or limits.layers is None or len(limits.qtypes) != 3 * limits.layers:
        raise WireError("load: block weights before the model's shape is known")
    g, u, d = limits.qtypes[3 * m.layer:3 * m.layer + 3]
    block = quant.BLOCKS[quant.QType(d)][0]
    if m.start % block or m.end % block:
        raise WireError(f"load: range [{m.start}, {m.end}) is not on {block}-neuron block bounds")
    n, h = m.end - m.start, limits.hidden
    want = {"gate": (n, quant.row_bytes(g, h)), "up": (n, quant.row_bytes(u, h)),
            "down_t": (h, quant.row_bytes(d, n))}
    for name, shape in want.items():
        a = getattr(m, name)
        if a.dtype != DTYPES["uint8"] or a.shape != shape:
            raise WireError(f"load.{name}: {a.dtype} {a.shape}, expected uint8 {shape}")


_FLOAT32 = (DTYPES["float32"],)
_FLOAT_REPLY = (DTYPES["float32"], DTYPES["float64"])


def check_semantics(msg: Message, limits: Limits) -> None:
    """What a decoded message must satisfy beyond its framing (fastframe.py decodes into it too)."""
    layer = getattr(msg, "layer", None)
    if layer is not None and limits.layers is not None and layer >= limits.layers:
        raise WireError(f"{msg.TYPE}: layer {layer} out of range (model has {limits.layers})")
    if isinstance(msg, Holding) and (msg.end < msg.start or (msg.end == msg.start and msg.start)):
        raise WireError(f"holding: bad range [{msg.start}, {msg.end})")
    if isinstance(msg, (Mlp, MlpOut)) and (msg.start or msg.end) and msg.end <= msg.start:
        raise WireError(f"{msg.TYPE}: empty sub-range [{msg.start}, {msg.end})")
    if isinstance(msg, (Assign, Load)) and msg.end <= msg.start:
        raise WireError(f"{msg.TYPE}: empty range [{msg.start}, {msg.end})")
    if isinstance(msg, Welcome) and msg.qtypes:
        if len(msg.qtypes) != 3 * msg.layers or any(t not in quant.BLOCKS for t in msg.qtypes):
            raise WireError(f"welcome.qtypes: {len(msg.qtypes)} bytes, need 3 kernel types per layer")
    if isinstance(msg, Load) and limits.qtypes:
        _check_block_load(msg, limits)
        return
    for name in msg.TENSORS:
        a = getattr(msg, name)
        ok = _FLOAT_REPLY if isinstance(msg, MlpOut) else _FLOAT32
        if a.dtype not in ok:   # every tensor message is Mlp, MlpOut or an exact Load here
            raise WireError(f"{msg.TYPE}.{name}: expected {' or '.join(map(str, ok))}, got {a.dtype}")
        if limits.hidden is not None and a.shape[-1] != limits.hidden:
            raise WireError(f"{msg.TYPE}.{name}: last dim {a.shape[-1]}, hidden size is {limits.hidden}")
    if isinstance(msg, Load):
        n = msg.end - msg.start
        for name in msg.TENSORS:
            if getattr(msg, name).shape[0] != n or getattr(msg, name).ndim != 2:
                raise WireError(f"load.{name}: shape {getattr(msg, name).shape} does not hold {n} rows")
