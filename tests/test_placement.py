"""Placement policy (placement.py): planning weights and caps, rows to ship. Pure functions."""
from hypothesis import given, settings, strategies as st

from skynet import placement
from skynet.placement import Candidate
from skynet.plan import Member, plan


def test_members_keep_order_and_use_override_then_observed_then_gflops():
    got = placement.planning_members(
        [Candidate(3, 2.0), Candidate(1, 5.0, weight_override=7.0), Candidate(2, 1.0, observed=400.0)], 1)
    assert [m.id for m in got] == [3, 1, 2]
    assert got[1].weight == 7.0 and got[2].weight == 400.0
    assert got[0].weight == 2.0 * 400.0   # put on the observed scale: 400 neurons/s per GFLOP/s


def test_members_without_observations_use_gflops_with_a_floor():
    got = placement.planning_members([Candidate(1, 3.0), Candidate(2, 0.0)], 1)
    assert [m.weight for m in got] == [3.0, 1e-3]


def test_memory_caps_count_whole_rows_and_at_least_one():
    got = placement.planning_members([Candidate(1, 1.0, mem_bytes=1000), Candidate(2, 1.0, mem_bytes=10),
                                      Candidate(3, 1.0)], row_bytes=100)
    assert [m.cap for m in got] == [5, 1, None]   # half: the old and the new epoch fit together
    got = placement.planning_members([Candidate(1, 1.0, mem_bytes=1000)], row_bytes=100, frame_bytes=100)
    assert got[0].cap == 3                        # (1000 - 3 frames) / 2 = 350 bytes


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 10**10), st.integers(0, 10**8), st.integers(1, 10**6))
def test_old_and_new_epoch_and_frames_in_flight_fit_the_offered_memory(offered, frame, row):
    cap = placement.slice_cap_bytes(offered, frame)
    rows = cap // row
    assert 2 * rows * row + placement.LOAD_FRAMES_IN_FLIGHT * frame <= max(offered, placement.LOAD_FRAMES_IN_FLIGHT * frame)
    assert cap >= (offered - placement.LOAD_FRAMES_IN_FLIGHT * frame) // 2   # and no more is held back


def test_joins_fold_until_quiet_or_the_longest_wait():
    due = placement.joins_due
    assert not due(10.5, 10.0, 10.0, 1.0, 5.0)      # one join, 0.5 s ago: wait for others
    assert due(11.0, 10.0, 10.0, 1.0, 5.0)          # quiet for settle_s
    assert not due(12.5, 10.0, 12.0, 1.0, 5.0)      # another came at 12: wait again
    assert due(15.0, 10.0, 14.5, 1.0, 5.0)          # joins keep coming: plan at max_wait_s anyway
    assert due(10.0, 10.0, 10.0, 0.0, 5.0)          # settle_s 0: at once


def test_rows_to_ship():
    assert placement.rows_to_ship((0, 10), None) == [(0, 10)]
    assert placement.rows_to_ship((0, 10), (0, 10)) == []
    assert placement.rows_to_ship((0, 10), (3, 6)) == [(0, 3), (6, 10)]
    assert placement.rows_to_ship((5, 10), (0, 7)) == [(7, 10)]
    assert placement.rows_to_ship((0, 5), (5, 9)) == [(0, 5)]


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 50), st.integers(1, 50), st.integers(0, 60), st.integers(1, 60))
def test_rows_to_ship_is_exactly_the_missing_rows(s, n, hs, hn):
    rng, held = (s, s + n), (hs, hs + hn)
    got = placement.rows_to_ship(rng, held)
    rows = [r for a, b in got for r in range(a, b)]
    assert rows == sorted(set(range(*rng)) - set(range(*held)))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 20), st.integers(1, 20)), max_size=2), st.integers(1, 5000),
       st.integers(1, 100_000), st.sampled_from([1, 32, 256]))
def test_load_chunks_cover_the_pieces_on_block_bounds(pieces, row_bytes, frame_bytes, granule):
    pieces = [(a * granule, (a + n) * granule) for a, n in pieces]
    chunks = placement.load_chunks(pieces, row_bytes, frame_bytes, granule)
    assert [r for a, b in chunks for r in range(a, b)] == [r for a, b in pieces for r in range(a, b)]
    for a, b in chunks:
        assert a % granule == 0 and b % granule == 0 and b > a
        assert (b - a) * row_bytes <= max(frame_bytes, granule * row_bytes)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0.01, 100), st.floats(0, 50), st.integers(0, 10**6)), min_size=1,
                max_size=8))
def test_any_candidates_can_be_planned(spec):
    cands = [Candidate(i + 1, g, mem, observed=o) for i, (g, o, mem) in enumerate(spec)]
    members = placement.planning_members(cands, row_bytes=64)
    assert all(isinstance(m, Member) and m.weight > 0 for m in members)
    assert plan(4096, members).covers()
