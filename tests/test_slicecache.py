"""The node slice cache: pure policy (cachepolicy.py), the files (slicecache.py), and a real node
process restarted against a real server with its cache, intact and then corrupted."""
from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

from skynet import quant
from skynet.cachepolicy import (ModelEntry, RangeEntry, evict, pick, reported_range, rows_source,
                                sticky_order, superseded)
from skynet.mlp import F32Format, MLPWeights, QFormat
from skynet.slicecache import SliceCache, content_hash

H, LAYERS = 64, 2
KEY = b"\x11" * 32


# ---------------------------------------------------------------- policy
def test_evict_least_recently_used_models_first_never_the_one_in_use():
    models = [ModelEntry("a", 40, 3.0), ModelEntry("b", 40, 1.0), ModelEntry("c", 40, 2.0)]
    assert evict(models, 120) == []
    assert evict(models, 100) == ["b"]
    assert evict(models, 50) == ["b", "c"]
    assert evict(models, 50, keep="b") == ["c", "a"]
    assert evict(models, 10, keep="a") == ["b", "c"]   # the model in use stays, even over the cap
    assert evict([], 0) == []


def test_pick_and_superseded():
    rs = [RangeEntry(0, 256, 1.0), RangeEntry(256, 512, 5.0), RangeEntry(0, 512, 5.0)]
    assert [(r.start, r.end) for r in pick(rs)] == [(0, 512), (256, 512), (0, 256)]
    assert superseded([(0, 256), (256, 512), (0, 768), (512, 1024)], (0, 768)) == [(0, 256), (256, 512)]


def test_reported_range_needs_our_hash_and_a_range_on_block_bounds():
    assert reported_range(KEY, KEY, 256, 768, 1024, 256) == (256, 768)
    assert reported_range(KEY, b"\x22" * 32, 256, 768, 1024, 256) is None   # another model
    assert reported_range(KEY, KEY, 0, 0, 1024, 256) is None                # nothing cached
    assert reported_range(KEY, KEY, 100, 768, 1024, 256) is None            # off the blocks
    assert reported_range(KEY, KEY, 256, 2048, 1024, 256) is None           # outside the model
    assert reported_range(b"", b"", 0, 256, 1024, 256) is None              # no hash at all


def test_rows_source_prefers_served_rows():
    assert rows_source((0, 5), (5, 9)) == (0, 5)
    assert rows_source(None, (5, 9)) == (5, 9)
    assert rows_source(None, None) is None


def test_sticky_order_places_a_returning_node_where_its_rows_lie():
    # a cluster that only grew: join order
    assert sticky_order([(1, (0, 300)), (2, (300, 700)), (3, (700, 1000)), (4, None)]) == [1, 2, 3, 4]
    # node 1 left, node 2 took everything, node 3 returns with [0, 500) cached: 3 goes first ...
    assert sticky_order([(2, (0, 1000)), (3, (0, 500))]) == [3, 2]
    # ... and stays first once it serves [0, 250); nodes without rows follow, in join order
    assert sticky_order([(5, None), (2, (250, 1000)), (3, (0, 250)), (4, None)]) == [3, 2, 5, 4]
    assert sticky_order([(1, (0, 500)), (2, (0, 500))]) == [1, 2]   # ties: join order


# ---------------------------------------------------------------- files
def _pieces(fmt, n: int, seed: int) -> list:
    rng = np.random.default_rng(seed)
    out = []
    for li in range(LAYERS):
        bufs = fmt.pieces(li, n)
        for b in bufs:
            b[...] = rng.integers(0, 255, b.shape).astype(b.dtype) if b.dtype == np.uint8 else \
                rng.standard_normal(b.shape).astype(b.dtype)
        out.append(bufs)
    return out


FORMATS = {"exact": lambda: F32Format(H),
           "fast": lambda: QFormat(H, [(int(quant.QType.Q8_0),) * 3] * LAYERS)}


@pytest.mark.parametrize("precision", sorted(FORMATS))
def test_store_then_lookup_gives_the_same_bytes(tmp_path, precision):
    fmt = FORMATS[precision]()
    rows = _pieces(fmt, 64, 0)
    cache = SliceCache(tmp_path, 1 << 30)
    assert cache.lookup(KEY, fmt, LAYERS) is None
    path = cache.store(KEY, fmt, 64, 128, rows)
    assert path.name == "64-128.slice" and cache.store(KEY, fmt, 64, 128, rows) == path   # once
    c = cache.lookup(KEY, fmt, LAYERS)
    assert (c.start, c.end) == (64, 128)
    for got, want in zip(c.layers, rows):
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)
    assert SliceCache(tmp_path, 1 << 30).lookup(KEY, fmt, LAYERS) is None   # locked: another node skips it
    c.close()
    assert cache.lookup(b"\x22" * 32, fmt, LAYERS) is None                   # another model
    other = FORMATS["fast" if precision == "exact" else "exact"]()
    assert cache.lookup(KEY, other, LAYERS) is None                          # another format
    assert path.exists()   # neither lookup was a reason to delete it


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty", "header"])
def test_a_damaged_file_is_detected_and_deleted(tmp_path, damage):
    fmt = F32Format(H)
    cache = SliceCache(tmp_path, 1 << 30)
    path = cache.store(KEY, fmt, 0, 32, _pieces(fmt, 32, 1))
    raw = bytearray(path.read_bytes())
    if damage == "flip":
        raw[len(raw) // 2] ^= 0x01       # one bit inside a weight
    elif damage == "truncate":
        raw = raw[:len(raw) - 100]
    elif damage == "empty":
        raw = raw[:0]
    else:
        raw[-20] ^= 0xFF                  # inside the header
    path.write_bytes(bytes(raw))
    assert cache.lookup(KEY, fmt, LAYERS) is None
    assert not path.exists()


def test_store_evicts_least_recently_used_models_over_the_cap(tmp_path):
    fmt = F32Format(H)
    rows = _pieces(fmt, 16, 2)
    size = sum(a.nbytes for layer in rows for a in layer)
    cache = SliceCache(tmp_path, int(2.5 * size))
    keys = [bytes([k]) * 32 for k in (1, 2, 3)]
    for i, k in enumerate(keys[:2]):
        cache.store(k, fmt, 0, 16, rows)
        os.utime(tmp_path / k.hex(), (1000 + i, 1000 + i))
    cache.lookup(keys[0], fmt, LAYERS).close()     # model 1 used again: model 2 is now the oldest
    cache.store(keys[2], fmt, 0, 16, rows)
    assert sorted(m.key for m in cache.models()) == sorted([keys[0].hex(), keys[2].hex()])
    assert SliceCache(tmp_path, size // 2).store(keys[1], fmt, 0, 16, rows) is None   # over the cap alone


def test_a_dead_writers_temp_file_is_swept(tmp_path):
    fmt = F32Format(H)
    cache = SliceCache(tmp_path, 1 << 30)
    d = tmp_path / KEY.hex()
    d.mkdir()
    dead, alive = d / ".0-16.4194305.tmp", d / f".0-16.{os.getpid()}.tmp"   # above pid_max: no such process
    dead.write_bytes(b"half a file")
    alive.write_bytes(b"being written")
    cache.store(KEY, fmt, 16, 32, _pieces(fmt, 16, 4))
    assert not dead.exists() and alive.exists()


def test_content_hash_covers_every_weight_and_the_format():
    rng = np.random.default_rng(0)
    mats = [[rng.standard_normal((32, H), dtype=np.float32) for _ in range(LAYERS)] for _ in range(3)]
    h = content_hash(MLPWeights(*mats))
    assert len(h) == 32 and content_hash(MLPWeights(*[[m.copy() for m in ms] for ms in mats])) == h
    mats[2][1][31, 7] = np.nextafter(mats[2][1][31, 7], np.float32(np.inf))   # one ulp of one down weight
    assert content_hash(MLPWeights(*mats)) != h


def test_node_cache_fills_the_overlap_and_the_shipped_rows_complete_the_epoch(tmp_path):
    """The node's half of the contract: an Assign on no base takes the overlap with the reported
    range from disk; the rows the server ships (rows_to_ship against that range) complete it."""
    from skynet import wire
    from skynet.assembly import Slices
    from skynet.nodecache import NodeCache
    from skynet.placement import rows_to_ship
    rng = np.random.default_rng(5)
    w = MLPWeights(*[[rng.standard_normal((96, H), dtype=np.float32) for _ in range(LAYERS)] for _ in range(3)])
    key = content_hash(w)
    SliceCache(tmp_path, 1 << 30).store(key, w.format, 32, 96, [w.rows(li, 32, 96) for li in range(LAYERS)])
    welcome = wire.Welcome(1, "m", H, LAYERS, 96, 1.0, model_hash=key)
    too_small = NodeCache(str(tmp_path), 1 << 30)
    too_small.open(key, w.format, LAYERS, 64)            # [32, 96) is outside a 64-neuron model
    assert too_small.holding(key) == wire.Holding(key, 0, 0)
    nc = NodeCache(str(tmp_path), 1 << 30)
    nc.open(key, w.format, LAYERS, 96)
    assert nc.holding(key) == wire.Holding(key, 32, 96)
    slices, a = Slices(welcome, w.format), wire.Assign(7, 0, 64, 0)
    assert slices.assign(a) is None and nc.fill(slices, a) is None     # [32, 64) from disk
    done = None
    for s0, e0 in rows_to_ship((0, 64), (32, 96)):
        assert (s0, e0) == (0, 32)
        for li in range(LAYERS):
            done = slices.load(wire.Load(7, li, s0, e0, *w.rows(li, s0, e0)))
    assert done == 7
    x = rng.standard_normal((2, H)).astype(np.float32)
    for li, layer in enumerate(slices.layers(7)):
        np.testing.assert_allclose(layer(x), w.slice(li, 0, 64)(x), rtol=1e-6, atol=1e-6)
    nc.release()
    too_small.release()


# ---------------------------------------------------------------- a real node, restarted
def _node_view(lc, name: str) -> dict | None:
    return next((n for n in lc.cluster().get("nodes", []) if n["name"] == name and n["state"] == "active"
                 and n["neurons"]), None)


def _restart(lc, name: str, cache_dir) -> tuple[dict, float]:
    """Start node `name` with `cache_dir`; its /v1/cluster entry once active, and the seconds
    from process start to active."""
    t0 = time.monotonic()
    lc.add_node(name, ["--cache-dir", str(cache_dir)])
    lc.wait(lambda: _node_view(lc, name) is not None and lc.cluster()["pending_epoch"] is None, 120,
            f"{name} active")
    return _node_view(lc, name), time.monotonic() - t0


def _leave(lc, name: str) -> None:
    lc.signal_node(name, signal.SIGTERM)   # a graceful leave: its cache write is flushed first
    assert lc.nodes[name].wait(timeout=60) == 0
    lc.wait(lambda: not lc.cluster()["nodes"], 60, "the node released")


def test_a_restarted_node_ships_nothing_and_a_corrupt_cache_is_refetched(tmp_path):
    from skynet.launch import LocalCluster
    env = {"SKYNET_NO_PROGRESS": "1", "SKYNET_CLUSTER_KEY": "", "SKYNET_API_KEY": "", "OMP_NUM_THREADS": "1"}
    cache = tmp_path / "cache"
    lc = LocalCluster(nodes=0, node_args=["--gflops", "4"], env=env, log_dir=str(tmp_path))
    try:
        lc.start(timeout=120)
        first, _ = _restart(lc, "n0", cache)
        (s, e), = first["neurons"]
        slice_bytes = first["bytes_sent"]
        assert slice_bytes > 0
        ref = lc.complete("Once upon a time", 12)["choices"][0]["text"]
        lc.wait(lambda: list(cache.glob(f"*/{s}-{e}.slice")), 60, "the cache file")
        _leave(lc, "n0")

        again, secs = _restart(lc, "n0", cache)   # same rows back, none shipped
        assert again["neurons"] == [[s, e]]
        assert again["bytes_sent"] <= 0.01 * slice_bytes, (again, slice_bytes)
        assert lc.complete("Once upon a time", 12)["choices"][0]["text"] == ref
        assert "come from the cache" in lc.log_tail("n0", 400)
        _leave(lc, "n0")

        path, = cache.glob(f"*/{s}-{e}.slice")
        raw = bytearray(path.read_bytes())
        raw[len(raw) // 3] ^= 0x10   # one bit of one weight
        path.write_bytes(bytes(raw))
        third, _ = _restart(lc, "n0", cache)
        assert third["bytes_sent"] == slice_bytes   # detected: everything shipped again
        assert "is corrupt" in lc.log_tail("n0", 400)
        assert lc.complete("Once upon a time", 12)["choices"][0]["text"] == ref
        lc.wait(lambda: path.exists(), 60, "the cache file rewritten")
        print(f"restart with cache: {secs:.2f}s to active, {again['bytes_sent']} of {slice_bytes} bytes shipped")
    finally:
        for name in lc.nodes:
            lc.signal_node(name, signal.SIGKILL)
        lc.stop()


def test_a_node_returning_with_a_weight_change_is_shipped_only_the_rows_it_lacks(nodes, tiny_model, tmp_path):
    """Exact precision, in-process server: n1 holds one half and caches it, leaves, and comes back
    with 3x the weight. Sticky order puts it on the same side of n0: its new range (3/4 of the
    neurons) holds its cached half, so only the other 250 neurons are shipped, and the sum is exact."""
    from conftest import load_model, spawn_node, stop_procs
    from skynet.mlp import LocalMLP
    model = load_model(tiny_model("llama"))
    w, cache = model.mlp_weights, tmp_path / "cache"
    with nodes(model, 2, extra=[[], ["--cache-dir", str(cache)]]) as nc:
        c = nc.cluster
        held = nc.ranges()["n1"]   # (0, 500) or (500, 1000): whichever registered second is laid out last
        back = (0, 750) if held == (0, 500) else (250, 1000)

        def settle(what, cond):
            end = time.monotonic() + 60
            while not (cond() and c.pending is None):
                assert time.monotonic() < end, f"{what}\n{nc.logs()}"
                c.poll(20)

        settle("the cache file", lambda: list(cache.glob(f"*/{held[0]}-{held[1]}.slice")))
        nc.procs[1].send_signal(signal.SIGTERM)
        settle("n1 released", lambda: nc.ranges() == {"n0": (0, 1000)} and nc.procs[1].poll() == 0)
        nc.procs.append(spawn_node(c.cfg.node_port, "n1", tmp_path, 3.0, extra=["--cache-dir", str(cache)]))
        settle("n1 back", lambda: nc.ranges().get("n1") == back
               and all(n.state == "active" for n in c.nodes.values()))
        n1 = next(n for n in c.nodes.values() if n.name == "n1")
        assert n1.cached == held and n1.bytes_sent == w.nbytes(0, 250)
        nc.mlp.begin_step()
        x = np.random.default_rng(3).standard_normal((3, model.arch.hidden)).astype(np.float32)
        for layer in range(w.layers):
            np.testing.assert_allclose(nc.mlp(layer, x), LocalMLP(w)(layer, x), rtol=1e-5, atol=1e-5)
        assert nc.mlp.stats["fallbacks"] == 0
        settle("the new range cached", lambda: list(cache.glob(f"*/{back[0]}-{back[1]}.slice")))
        assert not list(cache.glob(f"*/{held[0]}-{held[1]}.slice"))   # inside the new one: deleted
        stop_procs(nc.procs[2:])
