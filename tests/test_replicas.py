"""Replica policy (replicas.py): every range held by min(R, nodes) nodes, holdings contiguous and
within memory caps, and a latency-derived hedge / miss deadline that one slow reply cannot move far."""
import pytest
from hypothesis import given, settings, strategies as st

from skynet.plan import Member, plan
from skynet.replicas import (HEDGE_FLOOR_S, MIN_SAMPLES, holders, hedge_after, miss_after, observe,
                             replica_caps, replicate, takeover)


def _within(r, h):
    return h[0] <= r[0] and r[1] <= h[1]


@settings(max_examples=300, deadline=None)
@given(n=st.integers(1, 9), r=st.integers(1, 5), granule=st.sampled_from([1, 32]),
       weights=st.lists(st.floats(0.1, 10), min_size=9, max_size=9), units=st.integers(10, 40),
       local=st.sampled_from([0.0, 1.0]))
def test_every_range_has_min_r_holders_and_holdings_are_contiguous(n, r, granule, weights, units, local):
    nodes = [Member(i + 1, weights[i]) for i in range(n)]
    p = replicate(plan(units * granule, nodes, local, granule), r)
    assert p.covers()
    hs = holders(p)
    assert set(hs) == set(p.ranges.values())
    for rng, who in hs.items():
        assert len(who) >= min(r, n), (rng, who)
        assert who[0] == next(i for i, x in p.ranges.items() if x == rng)   # primary first
        assert all(_within(rng, p.held(i)) for i in who)
    for nid, (s, e) in p.ranges.items():
        hs_, he = p.held(nid)
        assert hs_ <= s < e <= he and hs_ % granule == 0 and he % granule == 0
        assert p.holds == {} or p.held(nid) == p.holds[nid]
    if r == 1 or n == 1:
        assert p.holds == {}


def test_groups_of_r_and_the_remainder_joins_the_last():
    p = replicate(plan(100, [Member(i, 1.0) for i in range(1, 6)]), 2)   # 5 nodes: groups 2 + 3
    assert [p.held(i) for i in range(1, 6)] == [(0, 40), (0, 40), (40, 100), (40, 100), (40, 100)]
    assert holders(p)[(0, 20)] == (1, 2) and holders(p)[(60, 80)] == (4, 3, 5)


def test_more_replicas_than_nodes_means_every_node_holds_everything():
    p = replicate(plan(60, [Member(1, 1.0), Member(2, 2.0)]), 3)
    assert p.held(1) == p.held(2) == (0, 60)
    assert all(len(w) == 2 for w in holders(p).values())


def test_a_node_whose_cap_cannot_take_the_group_holds_only_its_primary():
    p0 = plan(100, [Member(1, 1.0), Member(2, 1.0, cap=60)])
    p = replicate(p0, 2, {1: None, 2: 60})
    assert p.held(1) == (0, 100) and p.held(2) == (50, 100)
    assert holders(p) == {(0, 50): (1,), (50, 100): (2, 1)}


def test_replica_caps_leave_room_for_r_ranges_on_granule_bounds():
    assert replica_caps({1: 100, 2: None, 3: 10}, 2, 32) == {1: 32, 2: None, 3: 32}
    assert replica_caps({1: 100}, 2) == {1: 50}


def test_bad_replica_count_is_a_clear_error():
    with pytest.raises(ValueError, match="replicas"):
        replicate(plan(10, [Member(1, 1.0)]), 0)


def test_hedge_deadline_follows_the_distribution_not_the_floor():
    assert hedge_after(None, 1.0, 0.3) == 0.3                     # nothing observed: the fallback
    lat = None
    for _ in range(MIN_SAMPLES):
        lat = observe(lat, 0.004)
    assert HEDGE_FLOOR_S <= hedge_after(lat, 1.0, 0.3) < 0.05     # steady 4 ms: hedge within tens of ms
    assert miss_after(lat, 1.0, 0.1, 0.3) == 0.1                  # ... and a miss counts after the floor
    jittery = lat
    for s in [0.004, 0.030] * 10:
        jittery = observe(jittery, s)
    assert hedge_after(jittery, 1.0, 0.3) > hedge_after(lat, 1.0, 0.3)   # noise widens it


def test_one_slow_reply_does_not_make_the_next_normal_one_late():
    lat = None
    for _ in range(20):
        lat = observe(lat, 0.005)
    spiked = observe(lat, 0.250)   # one 250 ms hiccup
    assert spiked.mean < 0.06
    assert 0.005 < hedge_after(spiked, 1.0, 0.3)
    assert miss_after(spiked, 1.0, 0.1, 0.3) >= 0.1   # never below the floor


def test_status_shows_each_ranges_holders():
    from skynet.client import print_status
    view = {"model": "m", "layers": 2, "hidden": 4, "neurons": 100, "epoch": 3, "pending_epoch": None,
            "active_requests": 0, "queued_requests": 0, "local_neurons": [], "replicas": 2,
            "nodes": [{"id": i, "name": f"n{i}", "state": "active", "neurons": [r], "holds": [[0, 100]],
                       "weight": 1.0, "latency_ms": 1.0, "mem_bytes": 1 << 30, "last_heartbeat_s": 0.1}
                      for i, r in ((1, [0, 50]), (2, [50, 100]))],
            "ranges": [{"neurons": [0, 50], "primary": "n1", "holders": ["n1", "n2"]},
                       {"neurons": [50, 100], "primary": "n2", "holders": ["n2", "n1"]}]}
    out = print_status(view)
    assert "[0,50)  n1, n2" in out and "[50,100)  n2, n1" in out
    assert out.count("9.6 KB /") == 2   # held memory counts the whole holding (100 rows), not the primary


@settings(max_examples=200, deadline=None)
@given(n=st.integers(2, 8), r=st.integers(2, 4), lost=st.integers(0, 7),
       weights=st.lists(st.floats(0.1, 10), min_size=8, max_size=8))
def test_a_lost_nodes_range_is_taken_over_without_moving_rows(n, r, lost, weights):
    p = replicate(plan(64, [Member(i + 1, weights[i]) for i in range(n)]), r)
    gone = lost % n + 1
    t = takeover(p, gone)
    assert t is not None                       # with R >= 2 a group always has an adjacent survivor
    assert gone not in t.ranges and t.covers()
    assert all(t.held(i) == p.held(i) for i in t.ranges)   # nothing to ship
    assert all(_within(t.ranges[i], t.held(i)) for i in t.ranges)
    assert all(len(w) >= 1 for w in holders(t).values())


def test_no_takeover_without_replicas():
    p = replicate(plan(40, [Member(1, 1.0), Member(2, 1.0)]), 1)
    assert takeover(p, 1) is None and takeover(p, 3) is None


def test_a_sub_range_computes_bit_identical_partials_to_a_slice_of_it_alone():
    """exact: F32Format.sub of a held slice == the server's slice of that range, bit for bit."""
    import numpy as np
    from skynet.mlp import MLPWeights
    rng = np.random.default_rng(1)
    w = MLPWeights(*[[rng.standard_normal((96, 40), dtype=np.float32) for _ in range(2)] for _ in range(3)])
    held = w.slice(1, 16, 80)
    x = rng.standard_normal((3, 40), dtype=np.float32)
    for s, e in [(16, 48), (48, 80), (20, 21), (16, 80)]:
        part = w.format.sub(1, held, s, e)
        assert np.array_equal(part(x), w.slice(1, s, e)(x)), (s, e)


def test_slices_serve_only_held_sub_ranges():
    import numpy as np
    from skynet import wire
    from skynet.assembly import Slices
    from skynet.mlp import F32Format, MLPWeights
    rng = np.random.default_rng(2)
    w = MLPWeights(*[[rng.standard_normal((64, 8), dtype=np.float32) for _ in range(2)] for _ in range(3)])
    sl = Slices(wire.Welcome(1, "m", 8, 2, 64, 1.0), F32Format(8))
    assert sl.assign(wire.Assign(1, 16, 48, 0)) is None
    for layer in range(2):
        assert sl.load(wire.Load(1, layer, 16, 48, *w.rows(layer, 16, 48))) in (None, 1)
    x = rng.standard_normal((2, 8), dtype=np.float32)
    assert np.array_equal(sl.part(1, 1, 20, 30)(x), w.slice(1, 20, 30)(x))
    assert sl.part(1, 0, 0, 0).end == 48 and sl.part(1, 1, 16, 48) is sl.part(1, 1, 0, 0)
    assert sl.part(1, 0, 8, 20) is None and sl.part(1, 0, 40, 50) is None and sl.part(2, 0, 16, 20) is None
    assert sl.part(1, 5, 16, 20) is None
    assert sl.assign(wire.Assign(2, 16, 48, 1)) == 2        # same rows under a takeover: shared at once
    assert sl.part(2, 1, 20, 30) is sl.part(1, 1, 20, 30)
