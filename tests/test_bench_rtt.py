"""`skynet bench-rtt` runs end to end on a small shape: every transport measured, no fallbacks,
and the direct variant really went over the data links."""
from skynet.bench_rtt import measure, table


def test_bench_rtt_measures_all_three_transports():
    r = measure(hidden=64, layers=2, steps=4, rounds=1)
    assert r["calls"] == {"raw": 2, "direct": 2, "zmq": 2}
    assert r["raw_tcp_us"] > 0 and r["direct_us"] > 0 and r["zmq_us"] > 0
    assert r["fallbacks"] == 0 and r["direct_reply_share"] == 1.0
    assert "raw TCP" in table(r)


def test_an_added_link_delay_shows_in_the_round_trip():
    from skynet.bench_rtt import measure_delays
    rows = measure_delays((0.0, 2.0), hidden=64, layers=2, steps=3)
    assert [r["delay_ms"] for r in rows] == [0.0, 2.0]
    # The node pauses at least 2 ms after each message in and before each out, and both pauses lie
    # inside the server's clock, so 4 ms is a floor by construction. Not rtt(0) + 4 ms: on a busy
    # box rtt(0) is mostly waiting for a core, and a pausing node sleeps its core free (CI once
    # measured rtt(0) = 1.3 ms and rtt(2 ms) = 4.59 ms).
    assert rows[1]["rtt_us"] >= 4000
