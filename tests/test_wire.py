"""The wire format: every message round-trips, and anything malformed is a WireError, nothing else."""
from dataclasses import fields

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from skynet import wire
from skynet.wire import Limits, WireError, decode, encode

H = 8
rng = np.random.default_rng(0)


def f32(*shape):
    return rng.standard_normal(shape).astype(np.float32)


SAMPLES = {
    "hello": wire.Hello(name="node-1", cores=8, mem_bytes=2**33, gflops=123.5, weight=2.0, nonce=b"\x00p"),
    "ready": wire.Ready(epoch=3),
    "mlp_out": wire.MlpOut(step=7, epoch=1, layer=2, y=f32(2, 5, H), start=32, end=64),
    "welcome": wire.Welcome(node_id=4, model="smollm2", hidden=H, layers=30, neurons=1536, heartbeat_s=0.5,
                            data_port=7001, data_token=b"t" * 32, model_hash=b"\xab" * 32),
    "assign": wire.Assign(epoch=2, start=10, end=20, base=1),
    "load": wire.Load(epoch=2, layer=29, start=10, end=13, gate=f32(3, H), up=f32(3, H), down_t=f32(3, H)),
    "mlp": wire.Mlp(step=7, epoch=1, layer=0, x=f32(5, H), start=32, end=64),
    "ping": wire.Ping(ts=1.25),
    "pong": wire.Pong(ts=3.0),
    "bye": wire.Bye(reason="shutting down ✓"),
    "challenge": wire.Challenge(nonce=bytes(range(32)), proof=b"\xff" * 32),
    "data_hello": wire.DataHello(node_id=4, token=b"\x01" * 32),
    "holding": wire.Holding(model_hash=b"\xab" * 32, start=256, end=1024),
}
LIMITS = Limits(hidden=H, layers=30)


def frames_of(msg):
    return [bytes(f) for f in encode(msg)]


def header_of(msg):
    return msgpack.unpackb(frames_of(msg)[0], raw=False)


def with_header(msg, **changes):
    """The frames of `msg` with header keys replaced (value None deletes the key)."""
    frames = frames_of(msg)
    header = msgpack.unpackb(frames[0], raw=False)
    for k, v in changes.items():
        if v is None:
            header.pop(k, None)
        else:
            header[k] = v
    return [msgpack.packb(header, use_bin_type=True), *frames[1:]]


def rejects(frames, limits=Limits(), match=None):
    with pytest.raises(WireError, match=match):
        decode(frames, limits)


def test_samples_cover_every_message_type():
    assert set(SAMPLES) == set(wire.MESSAGES)


@pytest.mark.parametrize("cls", wire.MESSAGES.values(), ids=list(wire.MESSAGES))
def test_no_field_shadows_a_header_key(cls):
    assert not {"v", "t", "tensors"} & {f.name for f in fields(cls)}


@pytest.mark.parametrize("kind", sorted(wire.MESSAGES))
def test_round_trip(kind):
    msg = SAMPLES[kind]
    for frames in (encode(msg), frames_of(msg)):  # zero-copy memoryviews and plain bytes
        out = decode(frames, LIMITS)
        assert type(out) is type(msg) and out == msg
        for name in msg.TENSORS:
            a, b = getattr(msg, name), getattr(out, name)
            assert b.dtype == a.dtype and b.shape == a.shape
            np.testing.assert_array_equal(b, a)


def test_encode_sends_tensor_buffers_without_copy():
    msg = SAMPLES["mlp"]
    frames = encode(msg)
    assert len(frames) == 2 and np.shares_memory(np.asarray(frames[1]), msg.x)


def test_round_trip_non_contiguous_and_empty_batch():
    x = f32(H, 4).T  # (4, H), not C-contiguous
    out = decode(frames_of(wire.Mlp(step=0, epoch=0, layer=0, x=x)), LIMITS)
    np.testing.assert_array_equal(out.x, x)
    out = decode(frames_of(wire.Mlp(step=0, epoch=0, layer=0, x=np.zeros((0, H), np.float32))), LIMITS)
    assert out.x.shape == (0, H)


def test_encode_refuses_unsendable_dtypes():
    with pytest.raises(WireError):
        encode(wire.Mlp(step=0, epoch=0, layer=0, x=np.zeros((2, H), np.int64)))


# ---------------------------------------------------------------- rejections
MLP = SAMPLES["mlp"]
LOAD = SAMPLES["load"]


@pytest.mark.parametrize("frames,match", [
    ([], "empty"),
    ([b"\xc1"], "not msgpack"),                                   # reserved byte
    ([b"\x92\x01"], "not msgpack"),                               # truncated array
    ([b"\xa3abc" + b"x"], "not msgpack"),                          # trailing bytes
    ([msgpack.packb([1, "mlp"])], "not a map"),
    ([msgpack.packb(7)], "not a map"),
    ([msgpack.packb({1: 2})], "not msgpack"),                      # non-str map key
    ([msgpack.packb({"v": wire.VERSION, "t": ["mlp"]})], "unknown"),         # unhashable type
    ([msgpack.packb({"v": wire.VERSION, "t": {"a": 1}})], "unknown"),
    ([b"\xda\xff\xff" + b"a" * (wire.MAX_HEADER_BYTES + 1)], "header of"),
])
def test_rejects_bad_headers(frames, match):
    rejects(frames, match=match)


@pytest.mark.parametrize("changes,match", [
    ({"v": wire.VERSION - 1}, "version"), ({"v": wire.VERSION + 1}, "version"), ({"v": None}, "version"),
    ({"v": "1"}, "version"),
    ({"t": "exec"}, "unknown"), ({"t": None}, "unknown"), ({"t": b"mlp"}, "unknown"),
    ({"step": None}, "missing"), ({"layer": None}, "missing"),
    ({"step": "1"}, "expected int"), ({"step": 1.0}, "expected int"), ({"step": True}, "expected int"),
    ({"layer": [0]}, "expected int"), ({"epoch": -1}, "out of range"), ({"step": 2**63}, "out of range"),
    ({"tensors": None}, "tensor frame"), ({"tensors": []}, "tensor frame"), ({"tensors": "x"}, "tensor frame"),
    ({"tensors": [["float32", [5, H]], ["float32", [5, H]]]}, "tensor frame"),
    ({"tensors": [["float32"]]}, "spec"), ({"tensors": [["float32", 5]]}, "spec"), ({"tensors": [7]}, "spec"),
    ({"tensors": [["int64", [5, H]]]}, "not allowed"), ({"tensors": [["object", [5, H]]]}, "not allowed"),
    ({"tensors": [[7, [5, H]]]}, "not allowed"), ({"tensors": [["<f4", [5, H]]]}, "not allowed"),
    ({"tensors": [["float32", []]]}, "shape"), ({"tensors": [["float32", [-5, -H]]]}, "shape"),
    ({"tensors": [["float32", [1, 1, 1, 5, H]]]}, "shape"), ({"tensors": [["float32", [5.0, H]]]}, "shape"),
    ({"tensors": [["float32", ["5", H]]]}, "shape"), ({"tensors": [["float32", [True, 5 * H]]]}, "shape"),
    ({"tensors": [["float32", [2**31, H]]]}, "shape"),
    ({"tensors": [["float32", [2**16] * 4]]}, "exceeds"),        # would wrap an int64 product
    ({"tensors": [["float32", [4, H]]]}, "bytes"), ({"tensors": [["float32", [10, H]]]}, "bytes"),
    ({"tensors": [["float16", [10, H]]]}, "float32"), ({"tensors": [["int32", [5, H]]]}, "float32"),
])
def test_rejects_bad_mlp_fields(changes, match):
    rejects(with_header(MLP, **changes), match=match)


def test_rejects_wrong_scalar_types_on_other_messages():
    rejects(with_header(SAMPLES["hello"], name=b"node"), match="expected str")
    rejects(with_header(SAMPLES["hello"], nonce="text"), match="expected bytes")
    rejects(with_header(SAMPLES["hello"], gflops="fast"), match="expected float")
    rejects(with_header(SAMPLES["ping"], ts=False), match="expected float")
    assert decode(with_header(SAMPLES["ping"], ts=3)).ts == 3  # an int is a fine float


def test_rejects_wrong_frame_counts_and_sizes():
    frames = frames_of(MLP)
    rejects(frames[:1], match="tensor frame")
    rejects(frames + [b""], match="tensor frame")
    rejects([frames[0], frames[1][:-1]], match="bytes")
    rejects([frames[0], frames[1] + b"\0"], match="bytes")
    rejects(frames_of(SAMPLES["ready"]) + [b"x"], match="tensor frame")
    rejects(frames_of(LOAD)[:3], match="tensor frame")


def test_frame_cap():
    frames = frames_of(MLP)  # 5 x 8 float32 = 160 bytes
    assert decode(frames, Limits(max_frame=160)) == MLP
    rejects(frames, Limits(max_frame=159), match="exceeds")


def test_hidden_and_layer_limits():
    rejects(frames_of(MLP), Limits(hidden=H + 1), match="hidden")
    rejects(frames_of(SAMPLES["mlp_out"]), Limits(hidden=H - 1), match="hidden")
    rejects(frames_of(LOAD), Limits(hidden=4), match="hidden")
    assert decode(frames_of(LOAD), Limits(layers=30)) == LOAD
    rejects(frames_of(LOAD), Limits(layers=29), match="layer")
    rejects(frames_of(MLP), Limits(layers=0), match="layer")


def test_rejects_bad_load_ranges_and_rows():
    rejects(with_header(LOAD, end=10), match="empty range")
    rejects(with_header(LOAD, end=9), match="empty range")
    rejects(with_header(SAMPLES["assign"], end=10), match="empty range")
    rejects(frames_of(wire.Load(epoch=0, layer=0, start=0, end=4, gate=f32(3, H), up=f32(3, H),
                                down_t=f32(3, H))), match="rows")
    rejects(frames_of(wire.Load(epoch=0, layer=0, start=0, end=3, gate=f32(3, H), up=f32(3, H),
                                down_t=f32(2, H))), match="rows")
    rejects(frames_of(wire.Load(epoch=0, layer=0, start=0, end=3, gate=f32(3, 1, H), up=f32(3, H),
                                down_t=f32(3, H))), match="rows")


# ---------------------------------------------------------------- fuzzing
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def decodes_or_wire_error(frames, limits=LIMITS):
    try:
        msg = decode(frames, limits)
    except WireError:
        return None
    assert type(msg) in wire.MESSAGES.values()
    return msg


@FUZZ
@given(st.lists(st.binary(max_size=200), max_size=5))
def test_fuzz_random_frames(frames):
    decodes_or_wire_error(frames)


scalars = st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats() | st.text(max_size=8) \
    | st.binary(max_size=8)
values = st.recursive(scalars, lambda v: st.lists(v, max_size=4) | st.dictionaries(st.text(max_size=4), v,
                                                                                     max_size=3), max_leaves=8)
specs = st.lists(st.tuples(st.sampled_from(["float32", "float16", "int32", "float64", 7]),
                           st.lists(st.integers(-2, 2**32) | st.sampled_from([0, 1, H]) | values, max_size=5))
                 .map(list) | values, max_size=4)


@FUZZ
@given(st.sampled_from(sorted(wire.MESSAGES)), st.dictionaries(st.text(max_size=10) | st.sampled_from(
    ["v", "t", "step", "epoch", "layer", "start", "end", "name", "ts"]), values, max_size=6), specs,
    st.lists(st.binary(max_size=4 * 3 * H), max_size=4))
def test_fuzz_plausible_headers(kind, extra, tensors, frames):
    header = {**header_of(SAMPLES[kind]), **extra}
    if tensors:
        header["tensors"] = tensors
    decodes_or_wire_error([msgpack.packb(header, use_bin_type=True), *frames])


@FUZZ
@given(st.sampled_from([MLP, LOAD, SAMPLES["mlp_out"]]), st.data())
def test_fuzz_mutated_valid_messages(msg, data):
    frames = frames_of(msg)
    head = bytearray(frames[0])
    for _ in range(data.draw(st.integers(0, 4))):
        head[data.draw(st.integers(0, len(head) - 1))] = data.draw(st.integers(0, 255))
    frames[0] = bytes(head[:data.draw(st.integers(1, len(head)))] if data.draw(st.booleans()) else head)
    i = data.draw(st.integers(1, len(frames) - 1))
    action = data.draw(st.sampled_from(["keep", "truncate", "extend", "drop", "append"]))
    if action == "truncate":
        frames[i] = frames[i][:data.draw(st.integers(0, len(frames[i])))]
    elif action == "extend":
        frames[i] += data.draw(st.binary(min_size=1, max_size=16))
    elif action == "drop":
        del frames[i]
    elif action == "append":
        frames.append(data.draw(st.binary(max_size=16)))
    out = decodes_or_wire_error(frames)
    if out is not None and action in ("truncate", "extend", "drop", "append"):
        # A changed tensor frame can only pass if the header was mutated to match it.
        assert frames[0] != frames_of(msg)[0] or action == "truncate" and len(frames[i]) == len(frames_of(msg)[i])


# ---------------------------------------------------------------- fast precision: blocks and float64
def test_float64_partials_only_in_replies():
    y = rng.standard_normal((3, H))
    assert decode(frames_of(wire.MlpOut(step=1, epoch=1, layer=0, y=y)), LIMITS).y.dtype == np.float64
    rejects(frames_of(wire.Mlp(step=1, epoch=1, layer=0, x=y)), LIMITS, match="expected float32")


HB = 64   # block rows need a hidden size that is a multiple of 32


def _block_load(start=32, end=96, layer=1, **override):
    from skynet import quant
    n, rb = end - start, quant.row_bytes
    parts = {"gate": np.zeros((n, rb(3, HB)), np.uint8), "up": np.zeros((n, rb(8, HB)), np.uint8),
             "down_t": np.zeros((HB, rb(2, n)), np.uint8)}
    parts.update(override)
    return wire.Load(epoch=2, layer=layer, start=start, end=end, **parts)


QLIMITS = Limits(hidden=HB, layers=2, qtypes=bytes([3, 8, 2] * 2))   # Q4_1 gate, Q8_0 up, Q4_0 down


def test_block_load_is_checked_against_the_welcome_types():
    m = _block_load()
    out = decode(frames_of(m), QLIMITS)
    assert out == m and out.down_t.shape == m.down_t.shape and out.gate.dtype == np.uint8
    rejects(frames_of(_block_load(start=16, end=80)), QLIMITS, match="block bounds")
    rejects(frames_of(_block_load(up=np.zeros((64, 20 * HB // 32), np.uint8))), QLIMITS, match="load.up")
    rejects(frames_of(_block_load(down_t=np.zeros((HB, 1), np.uint8))), QLIMITS, match="load.down_t")
    rejects(frames_of(_block_load(gate=np.zeros((64, 20 * HB // 32), np.float32))), QLIMITS, match="load.gate")
    rejects(frames_of(_block_load(layer=2)), QLIMITS, match="layer")
    rejects(frames_of(LOAD), QLIMITS)                                   # float rows in a block cluster
    rejects(frames_of(_block_load()), Limits(hidden=HB, layers=2))                           # blocks in a float cluster


def test_welcome_block_types_are_validated():
    ok = wire.Welcome(node_id=1, model="m", hidden=HB, layers=2, neurons=64, heartbeat_s=1.0, qtypes=bytes([3, 3, 2] * 2))
    assert decode(frames_of(ok)) == ok
    for bad in (bytes([3, 3, 2]), bytes([3, 3, 7] * 2)):
        rejects(frames_of(wire.Welcome(node_id=1, model="m", hidden=HB, layers=2, neurons=64, heartbeat_s=1.0,
                                       qtypes=bad)), match="qtypes")


def test_holding_range_is_checked():
    ok = wire.Holding(model_hash=b"h" * 32)
    assert decode(frames_of(ok)) == ok   # (0, 0): nothing cached
    rejects(with_header(ok, start=5, end=5), match="holding: bad range")
    rejects(with_header(ok, start=8, end=4), match="holding: bad range")


def test_mlp_sub_range_is_whole_or_non_empty():
    """(0, 0) names the node's whole held range; any other sub-range must be non-empty."""
    for msg in (SAMPLES["mlp"], SAMPLES["mlp_out"]):
        assert (decode(frames_of(msg), LIMITS).start, decode(frames_of(msg), LIMITS).end) == (32, 64)
        rejects(with_header(msg, start=64, end=32), LIMITS, match="empty sub-range")
        rejects(with_header(msg, start=5, end=0), LIMITS, match="empty sub-range")
        rejects(with_header(msg, end=-1), LIMITS, match="out of range")
    whole = wire.Mlp(step=1, epoch=1, layer=0, x=f32(1, H))
    assert (decode(frames_of(whole), LIMITS).start, decode(frames_of(whole), LIMITS).end) == (0, 0)
