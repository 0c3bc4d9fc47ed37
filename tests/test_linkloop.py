"""The per-layer exchange in C (_link.c, clink.py): a node's compiled loop, the server's compiled send and
gather, and the one C MLP slice (quant.qmlp) they and everyone else compute with.

The loops take only the messages the Python path would accept with the same meaning, and leave
everything else unread for it: checked with hand-made bad messages and with random mutations."""
from __future__ import annotations

import socket
import struct
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import expf_reference
from skynet import calls, clink, datalink, fastframe, quant, wire
from skynet.datalink import DataConn
from skynet.mlp import QSliceLayer, link_table, silu_mul
from skynet.quant import QMatrix, QType

H, N_HELD, LAYERS = 64, 64, 2
LIMITS = wire.Limits(hidden=H, layers=LAYERS)
EPOCH, HELD = 5, (32, 96)
fuzz = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
pytestmark = pytest.mark.skipif(not clink.NATIVE, reason="the compiled data link needs POSIX sockets")


def _pair() -> tuple[DataConn, DataConn]:
    with socket.create_server(("127.0.0.1", 0)) as srv:
        a = socket.create_connection(srv.getsockname())
        b, _ = srv.accept()
    return DataConn(a), DataConn(b)


def _slice(rng, n: int = N_HELD, start: int = HELD[0], types=(QType.Q4_1, QType.Q8_0, QType.Q4_0)) -> QSliceLayer:
    def q(t, rows, cols):
        w = rng.standard_normal((rows, cols), dtype=np.float32) * 0.1
        return QMatrix(QType.Q8_0, quant.quantize_q8_0(w), cols) if t == QType.Q8_0 else _random_blocks(rng, t, rows, cols)
    return QSliceLayer(start, start + n, q(types[0], n, H), q(types[1], n, H), q(types[2], H, n))


def _random_blocks(rng, t, rows, cols) -> QMatrix:
    """Random bytes with small finite fp16 scales are valid blocks of any format."""
    data = rng.integers(0, 256, (rows, quant.row_bytes(t, cols)), dtype=np.uint8)
    size = quant.BLOCKS[t][1]
    blocks = data.reshape(rows, -1, size)
    scales = rng.uniform(0.001, 0.01, blocks.shape[:2] + (2,)).astype(np.float16)
    blocks[..., :4] = scales.view(np.uint8).reshape(blocks.shape[:2] + (4,))[..., :4]
    return QMatrix(t, data, cols)


@pytest.fixture(scope="module")
def served():
    rng = np.random.default_rng(1)
    return {EPOCH: [_slice(rng) for _ in range(LAYERS)]}


# ---------------------------------------------------------------- the C MLP slice
def test_qmlp_is_the_numpy_composition_up_to_exp_and_does_not_depend_on_rows_or_threads():
    rng = np.random.default_rng(0)
    sl = _slice(rng, n=96, start=0)
    x = rng.standard_normal((9, H), dtype=np.float32)
    y = sl(x)
    assert y.dtype == np.float64 and y.shape == (9, H)
    xq = quant.quantize_act(x)
    ref = sl.down(silu_mul(sl.gate(xq), sl.up(xq)), dtype=np.float64)   # numpy's exp instead of ours
    np.testing.assert_allclose(y, ref, rtol=1e-3, atol=1e-4 * float(np.abs(ref).max()))
    for threads in (1, 2, 3):
        sl.threads = threads
        assert np.array_equal(sl(x), y)
        for i in range(9):
            assert np.array_equal(sl(x[i:i + 1]), y[i:i + 1])


def _silu_mul_reference(g: np.ndarray, u: np.ndarray) -> np.ndarray:
    """The silu loop of _qkernels.c, step by step in numpy float32."""
    return g / (expf_reference(-g) + np.float32(1.0)) * u


def test_silu_is_the_documented_formula_bit_for_bit_and_accurate():
    """silu(g) * u in C (our own e^x, so no libm difference between machines): the exact bits
    of the formula evaluated in numpy float32, and near the float64 value over the whole range
    (e^x clamped to [-87, 88]; NaN stays NaN)."""
    from skynet import _qkernels
    rng = np.random.default_rng(4)
    g = np.concatenate([rng.uniform(-100, 100, 20000), rng.standard_normal(20000) * 4,
                        [0.0, -0.0, 87.5, -87.5, 88.5, -88.5, 89.0, -89.0, 1e-30, -1e-30, 1e38, -3e38, np.nan]]).astype(np.float32)
    u = rng.uniform(0.5, 1.5, g.size).astype(np.float32)
    out = g.copy()
    _qkernels.silu_mul(out, u, g.size)
    ref = _silu_mul_reference(g, u)
    assert np.array_equal(out, ref, equal_nan=True)
    assert np.isnan(out[-1])
    with np.errstate(over="ignore"):
        want = g[:-1].astype(np.float64) / (1 + np.exp(-g[:-1].astype(np.float64))) * u[:-1]
    err = np.abs(out[:-1] - want)
    assert float((err - 1e-6 * np.abs(want)).max()) < 1e-35   # where e^x is clamped, g e^g is ~1e-36


def test_qmlp_rejects_bad_input():
    sl = _slice(np.random.default_rng(0))
    with pytest.raises(ValueError):
        sl(np.ones((1, H + 32), np.float32))
    with pytest.raises(ValueError):
        sl(np.ones((2, H), np.float32)[:, ::1].T.copy().T)   # not C-contiguous
    with pytest.raises(ValueError):
        sl(np.ones((1, H), np.float64))


# ---------------------------------------------------------------- a node's compiled loop
def _mlp_bytes(msg: wire.Mlp) -> bytes:
    return b"".join(bytes(memoryview(f).cast("B")) for f in datalink.pack(fastframe.encode(msg)))


def _serve(served, raw: bytes, budget: float = 0.05):
    """Send raw bytes to a node end, run its compiled loop once: (other, served, epoch, node end, server end)."""
    server, node = _pair()
    server.sock.sendall(raw)
    other, n, epoch = clink.serve_mlp(node, link_table(served), LIMITS, 1, budget)
    return other, n, epoch, node, server


def test_node_loop_answers_like_the_python_path(served):
    x = np.random.default_rng(2).standard_normal((3, H), dtype=np.float32)
    msgs = [wire.Mlp(7, EPOCH, layer, x, *sub) for layer in range(LAYERS) for sub in ((0, 0), HELD)]
    # the loop returns once the budget is spent after a message: 1 s serves all four even on a
    # loaded box, and then waits out the rest of it
    other, n, epoch, node, server = _serve(served, b"".join(_mlp_bytes(m) for m in msgs), budget=1.0)
    assert (other, n, epoch) == (False, len(msgs), EPOCH)
    for m in msgs:
        got = fastframe.decode(server.recv_multipart(timeout=2), LIMITS)
        assert isinstance(got, wire.MlpOut) and (got.step, got.epoch, got.layer, got.start, got.end) == \
            (m.step, m.epoch, m.layer, m.start, m.end)
        assert got.y.dtype == np.float64 and np.array_equal(got.y, served[EPOCH][m.layer](x))


def test_node_loop_returns_when_idle_and_when_the_link_closes(served):
    server, node = _pair()
    assert clink.serve_mlp(node, link_table(served), LIMITS, 1, 0.02) == (False, 0, -1)
    server.close()
    with pytest.raises(datalink.LinkError):
        clink.serve_mlp(node, link_table(served), LIMITS, 1, 0.5)


def _bad_messages():
    x = np.ones((2, H), np.float32)
    good = _mlp_bytes(wire.Mlp(1, EPOCH, 0, x))
    head = bytearray(good)

    def patch(off, fmt, *values):
        b = bytearray(head)
        struct.pack_into(fmt, b, datalink.PREFIX.size + off, *values)
        return bytes(b)
    return {
        "msgpack header": b"".join(bytes(memoryview(f).cast("B")) for f in datalink.pack(wire.encode(wire.Mlp(1, EPOCH, 0, x)))),
        "version": patch(1, "B", wire.VERSION + 1), "kind mlp_out": patch(2, "B", 2), "dtype float64": patch(3, "B", 3),
        "rows vs bytes": patch(4, "<I", 3), "cols": patch(8, "<I", H // 2), "step 2^62": patch(12, "<Q", 2 ** 62),
        "epoch not held": patch(20, "<Q", EPOCH + 1), "layer": patch(28, "<I", LAYERS),
        "sub-range inside": _mlp_bytes(wire.Mlp(1, EPOCH, 0, x, 32, 64)),
        "empty sub-range": patch(32, "<II", 9, 9),
        "data hello": b"".join(bytes(memoryview(f).cast("B")) for f in datalink.pack(wire.encode(wire.DataHello(1, b"t" * 32)))),
    }


def test_node_loop_leaves_an_epoch_older_than_one_it_served_to_the_python_path(served):
    """Python drops older epochs once it serves a newer one (Slices.switched): after serving
    epoch E + 1, the loop leaves an mlp for E unread, and reports E + 1 as the epoch served."""
    both = {EPOCH: served[EPOCH], EPOCH + 1: served[EPOCH]}
    x = np.ones((1, H), np.float32)
    older = _mlp_bytes(wire.Mlp(2, EPOCH, 0, x))
    other, n, epoch, node, _ = _serve(both, _mlp_bytes(wire.Mlp(1, EPOCH + 1, 0, x)) + older, budget=1.0)
    assert (other, n, epoch) == (True, 1, EPOCH + 1)
    assert b"".join(bytes(f) for f in datalink.pack(node.recv_multipart(timeout=1))) == older


def test_node_loop_serves_a_replica_sub_range_once_its_slices_exist(served):
    """A sub-range of the holding (a replica's, replicas.py) goes to the Python path until
    Slices.part has built it for every layer; then the table lists it and the loop serves it."""
    from skynet.mlp import QFormat
    fmt = QFormat(H, [(sl.gate._t, sl.up._t, sl.down._t) for sl in served[EPOCH]])
    sub = (HELD[0] + 32, HELD[1])
    parts = {(EPOCH, i, *sub): fmt.sub(i, sl, *sub) for i, sl in enumerate(served[EPOCH])}
    x = np.random.default_rng(5).standard_normal((2, H), dtype=np.float32)
    raw = _mlp_bytes(wire.Mlp(4, EPOCH, 1, x, *sub))
    assert _serve(served, raw)[:2] == (True, 0)                        # not listed yet
    half = {k: v for k, v in parts.items() if k[1] == 0}
    server, node = _pair()
    server.sock.sendall(raw)
    assert clink.serve_mlp(node, link_table(served, half), LIMITS, 1, 0.05)[:2] == (True, 0)   # not every layer
    assert clink.serve_mlp(node, link_table(served, parts), LIMITS, 1, 0.05) == (False, 1, EPOCH)
    got = fastframe.decode(server.recv_multipart(timeout=2), LIMITS)
    assert (got.start, got.end) == sub and np.array_equal(got.y, parts[(EPOCH, 1, *sub)](x))


@pytest.mark.parametrize("name", sorted(_bad_messages()))
def test_node_loop_leaves_any_other_message_to_the_python_path(served, name):
    raw = _bad_messages()[name]
    other, n, _, node, _ = _serve(served, raw)
    assert other and n == 0
    frames = node.recv_multipart(timeout=1)   # the very bytes, still unread
    assert b"".join(bytes(f) for f in datalink.pack(frames)) == raw


@fuzz
@given(pos=st.integers(0, 200), value=st.integers(0, 255), rows=st.integers(1, 3))
def test_node_loop_takes_only_what_python_accepts_with_the_same_meaning(served, pos, value, rows):
    x = np.random.default_rng(rows).standard_normal((rows, H), dtype=np.float32)
    raw = bytearray(_mlp_bytes(wire.Mlp(3, EPOCH, 1, x)))
    pos %= len(raw)
    if 8 <= pos < 12:   # a longer tensor length waits for bytes that never come: both paths time out
        return
    raw[pos] = value
    other, n, _, node, server = _serve(served, bytes(raw), budget=0.002)
    try:
        if n:
            frames = [memoryview(bytes(raw[12:52])), memoryview(bytes(raw[52:]))]
            msg = fastframe.decode(frames, LIMITS)   # must not raise
            sl = served.get(msg.epoch)
            assert sl is not None and (msg.start, msg.end) in ((0, 0), HELD)
            got = fastframe.decode(server.recv_multipart(timeout=2), LIMITS)
            assert (got.step, got.epoch, got.layer) == (msg.step, msg.epoch, msg.layer)
            assert np.array_equal(got.y, sl[msg.layer](msg.x), equal_nan=True)
    finally:
        node.close()
        server.close()


# ---------------------------------------------------------------- the server's compiled send and gather
KEY = (11, EPOCH, 1)


def _reply(y, key=KEY, sub=(0, 0)) -> bytes:
    return b"".join(bytes(memoryview(f).cast("B")) for f in datalink.pack(fastframe.encode(wire.MlpOut(*key, y, *sub))))


def _gather(raws: list[bytes | None], rows: int = 2, timeout: float = 0.05):
    pairs = [_pair() for _ in raws]
    for (node, _), raw in zip(pairs, raws):
        if raw is None:
            node.close()
        elif raw:
            node.sock.sendall(raw)
    status = np.zeros(len(raws), np.int64)
    out = np.zeros((len(raws), rows, H))
    _, errs = clink.gather_mlp([srv for _, srv in pairs], status, out, KEY, 1 << 20, timeout)
    return status, out, errs, pairs


def test_send_then_gather_round_trip():
    node, server = _pair()
    x = np.arange(2 * H, dtype=np.float32).reshape(2, H)
    clink.send_mlp(server, clink.link_head(*KEY, 2, H), x)
    msg = fastframe.decode(node.recv_multipart(timeout=2), LIMITS)
    assert msg == wire.Mlp(*KEY, x) and np.array_equal(msg.x, x)
    y = np.random.default_rng(3).standard_normal((2, H))
    node.send_multipart(fastframe.encode(wire.MlpOut(*KEY, y)))
    status, out = np.zeros(1, np.int64), np.zeros((1, 2, H))
    clink.gather_mlp([server], status, out, KEY, 1 << 20, 2.0)
    assert status[0] == 1 and np.array_equal(out[0], y)
    node.send_multipart(fastframe.encode(wire.MlpOut(*KEY, y, 32, 64)))   # a replica's sub-range
    status[0] = 0
    clink.gather_mlp([server], status, out, KEY, 1 << 20, 2.0, subs=[(32, 96)])
    assert status[0] == 2   # not the sub-range asked: left for the Python path
    server.recv_multipart(timeout=1)
    node.send_multipart(fastframe.encode(wire.MlpOut(*KEY, y, 32, 64)))
    status[0] = 0
    clink.gather_mlp([server], status, out, KEY, 1 << 20, 2.0, subs=[(32, 64)])
    assert status[0] == 1


def test_gather_takes_good_replies_leaves_others_and_reports_broken_links():
    y = np.ones((2, H))
    nan = y.copy()
    nan[1, 3] = np.nan
    cases = {"good": (_reply(y), 1), "nan": (_reply(nan), 2), "late step": (_reply(y, (9, EPOCH, 1)), 2),
             "other layer": (_reply(y, (11, EPOCH, 0)), 2), "sub-range": (_reply(y, sub=(32, 64)), 2),
             "rows": (_reply(np.ones((3, H))), 2), "float32": (_reply(y.astype(np.float32)), 2),
             "msgpack": (b"".join(bytes(memoryview(f).cast("B")) for f in datalink.pack(wire.encode(wire.MlpOut(*KEY, y)))), 2),
             "silent": (b"", 0), "closed": (None, 3)}
    status, out, errs, pairs = _gather([raw for raw, _ in cases.values()])
    assert dict(zip(cases, status.tolist())) == {k: want for k, (_, want) in cases.items()}
    assert np.array_equal(out[0], y) and errs[-1] and errs[0] is None
    for (raw, want), (_, srv) in zip(cases.values(), pairs):
        if want == 2:   # left unread for the Python path, byte for byte
            assert b"".join(bytes(f) for f in datalink.pack(srv.recv_multipart(timeout=1))) == raw


def test_gather_takes_a_reply_that_came_just_before_the_link_closed():
    y = np.full((2, H), 0.5)
    node, server = _pair()
    node.sock.sendall(_reply(y))
    node.close()
    time.sleep(0.05)
    status, out = np.zeros(1, np.int64), np.zeros((1, 2, H))
    clink.gather_mlp([server], status, out, KEY, 1 << 20, 1.0)
    assert status[0] == 1 and np.array_equal(out[0], y)
    status[0] = 0
    _, errs = clink.gather_mlp([server], status, out, KEY, 1 << 20, 1.0)
    assert status[0] == 3 and "closed" in errs[0]


def _call(nodes: int, rows: int = 2, timeout: float = 2.0, subs=None):
    """A compiled whole call's ends: the server's links, its Gather, headers and times arrays."""
    pairs = [_pair() for _ in range(nodes)]
    subs = subs or [(0, 0)] * nodes
    g = clink.Gather([srv for _, srv in pairs], rows, H, subs)
    heads = bytearray(b"".join(clink.link_head(0, 0, 0, rows, H, *sub) for sub in subs))
    return pairs, g, heads, np.zeros((2, nodes))


def test_whole_call_sends_each_link_its_frame_and_sums_the_replies_in_link_order():
    pairs, g, heads, t = _call(3, subs=[(0, 0), (32, 64), (0, 0)])
    x = np.arange(2 * H, dtype=np.float32).reshape(2, H) / 7
    ys = [np.random.default_rng(k).standard_normal((2, H)) * 10 ** k for k in range(3)]
    for k, (node, _) in enumerate(pairs):   # replies wait on the sockets before the call reads them
        node.sock.sendall(_reply(ys[k], sub=[(0, 0), (32, 64), (0, 0)][k]))
    y, errs = g.call(KEY, heads, x, t, 2.0, 2.0)
    assert errs is None and g.status.tolist() == [1, 1, 1]
    assert y.dtype == np.float32 and y.tobytes() == calls.sum_parts([(k, v) for k, v in enumerate(ys)]).tobytes()
    assert (t[0] >= 0).all() and (t[1] >= t[0]).all()
    for k, (node, _) in enumerate(pairs):   # each link got exactly what link_send would have sent
        msg = fastframe.decode(node.recv_multipart(timeout=2), LIMITS)
        assert msg == wire.Mlp(*KEY, x, *[(0, 0), (32, 64), (0, 0)][k]) and np.array_equal(msg.x, x)
    assert all(srv._start == srv._end for _, srv in pairs)   # each reply consumed from its link's buffer
    quiet, g1, heads1, t1 = _call(1)
    y1, errs = g1.call(KEY, heads1, x, t1, 2.0, 0.05)
    assert y1 is None and errs == (None,) and g1.status.tolist() == [0]   # silence: nothing summed
    assert fastframe.decode(quiet[0][0].recv_multipart(timeout=2), LIMITS) == wire.Mlp(*KEY, x)
    one = np.random.default_rng(9).standard_normal((2, H)) * 1e3
    quiet[0][0].sock.sendall(_reply(one, (12, EPOCH, 1)) + b"\x01\x02")   # and the next message's first bytes
    y1, errs = g1.call((12, EPOCH, 1), heads1, x, t1, 2.0, 2.0)
    assert errs is None and y1.tobytes() == calls.sum_parts([(0, one)]).tobytes()   # one link: rounded once
    assert quiet[0][1]._end - quiet[0][1]._start == 2   # the reply taken, the bytes after it kept


def test_whole_call_leaves_what_it_does_not_take_and_reports_a_failed_send():
    pairs, g, heads, t = _call(2, timeout=0.1)
    y = np.ones((2, H))
    pairs[0][0].sock.sendall(_reply(y))
    pairs[1][0].sock.sendall(_reply(y, (9, EPOCH, 1)))   # another step's: left for the Python path
    got, errs = g.call(KEY, heads, np.ones((2, H), np.float32), t, 2.0, 0.2)
    assert got is None and g.status.tolist() == [1, 2] and errs == (None, None)
    assert b"".join(bytes(f) for f in datalink.pack(pairs[1][1].recv_multipart(timeout=1))) == _reply(y, (9, EPOCH, 1))
    pairs, g, heads, t = _call(2)
    pairs[1][0].close()
    pairs[1][1].sock.shutdown(socket.SHUT_WR)   # our side cannot send any more: link_send fails
    start = time.perf_counter()
    got, errs = g.call(KEY, heads, np.ones((2, H), np.float32), t, 2.0, 5.0)
    assert got is None and g.status.tolist() == [0, 4] and errs[0] is None and "send failed" in errs[1]
    assert time.perf_counter() - start < 1.0   # a failed send: nothing is waited for


def test_whole_call_refuses_headers_that_do_not_describe_x():
    _, g, heads, t = _call(2)
    other = bytearray(clink.link_head(0, 0, 0, 2, H) + clink.link_head(0, 0, 0, 2, H, 32, 64))
    with pytest.raises(ValueError):   # the second header asks a sub-range the link was not set up for
        g.call(KEY, other, np.ones((2, H), np.float32), t, 1.0, 0.01)
    with pytest.raises(ValueError):   # no links
        _k_call_without_links()
    with pytest.raises(ValueError):
        g.call(KEY, heads, np.ones((3, H), np.float32), t, 1.0, 0.01)
    with pytest.raises(ValueError):
        g.call(KEY, heads[:-1], np.ones((2, H), np.float32), t, 1.0, 0.01)
    with pytest.raises(ValueError):
        g.call(KEY, heads, np.ones((2, H), np.float32), np.zeros(2), 1.0, 0.01)


def _k_call_without_links():
    from skynet import _qkernels
    x = np.ones((2, H), np.float32)
    _qkernels.link_call([], [], [], np.zeros((0, 2), np.int64), np.zeros(0, np.int64), np.zeros((2, 0)),
                        np.zeros((0, 2, H)), bytearray(), x, np.empty_like(x), *KEY, 2, H, wire.VERSION, 1, 1 << 20,
                        1.0, 0.01, 0.0)


def test_send_refuses_rows_the_header_does_not_describe():
    _, server = _pair()
    with pytest.raises(ValueError):
        clink.send_mlp(server, clink.link_head(*KEY, 2, H), np.ones((3, H), np.float32))


@fuzz
@given(pos=st.integers(0, 200), value=st.integers(0, 255))
def test_gather_takes_only_what_python_accepts_with_the_same_meaning(pos, value):
    y = np.random.default_rng(pos).standard_normal((2, H))
    raw = bytearray(_reply(y))
    raw[pos % len(raw)] = value
    status, out, _, pairs = _gather([bytes(raw)], timeout=0.002)
    try:
        if status[0] == 1:
            msg = fastframe.decode([memoryview(bytes(raw[12:52])), memoryview(bytes(raw[52:]))], LIMITS)
            assert (msg.step, msg.epoch, msg.layer, msg.start, msg.end) == (*KEY, 0, 0)
            assert msg.y.dtype == np.float64 and msg.y.shape == (2, H) and np.isfinite(msg.y).all()
            assert np.array_equal(out[0], msg.y)
    finally:
        for a, b in pairs:
            a.close()
            b.close()
