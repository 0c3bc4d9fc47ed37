"""The latency model (latmodel.py): its terms by hand, and how they move with machines and links."""
import pytest

from skynet.latmodel import LLAMA3_70B, QWEN25_7B, Setup, rtt_us, t_node_ms, t_server_ms, t_token_ms


def test_terms_by_hand_for_qwen_7b_on_two_machines_at_1_gbe():
    u = Setup(mem_gbs=50, bytes_per_weight=0.5625, link_gbits=1, net_rtt_us=100, sw_rtt_us=20)
    assert QWEN25_7B.attn_params == 3584 * (2 * 3584 + 2 * 512)
    assert QWEN25_7B.mlp_params == 3 * 3584 * 18944
    server = 0.5625 * (28 * 3584 * 8192 + 152064 * 3584) / 50e6                  # ms
    node = 0.5625 * 28 * 3 * 3584 * 18944 / 50e6
    rtt = 100 + 20 + 3584 * 12 * 8 / 1e3                                           # µs
    got = t_token_ms(QWEN25_7B, u, 2)
    assert got["server"] == pytest.approx(server) and got["node"] == pytest.approx(node)
    assert got["rtt_total"] == pytest.approx(28 * rtt / 1000)
    assert got["total"] == pytest.approx(server + node + 28 * rtt / 1000)
    assert got["tok_s"] == pytest.approx(1000 / got["total"])


def test_one_machine_streams_the_whole_model_without_round_trips():
    u = Setup()
    one = t_token_ms(LLAMA3_70B, u, 1)
    assert one["rtt_total"] == 0 and one["total"] == pytest.approx(t_server_ms(LLAMA3_70B, u) + t_node_ms(LLAMA3_70B, u, 1))


@pytest.mark.parametrize("shape", [QWEN25_7B, LLAMA3_70B])
def test_more_machines_split_the_mlp_but_load_the_servers_nic(shape):
    u = Setup()
    times = [t_token_ms(shape, u, m) for m in (2, 4, 8)]
    assert times[0]["node"] > times[1]["node"] > times[2]["node"]
    assert times[0]["rtt_total"] < times[1]["rtt_total"] < times[2]["rtt_total"]
    assert rtt_us(shape, Setup(link_gbits=10, net_rtt_us=40), 7) < rtt_us(shape, u, 7)
    assert all(t["server"] == times[0]["server"] for t in times)


def test_machines_must_be_positive():
    with pytest.raises(ValueError, match="machines"):
        t_token_ms(QWEN25_7B, Setup(), 0)


def test_the_emulation_predicts_delayed_points_from_the_zero_delay_one_and_prints_them():
    from skynet.bench_emul import predict, table
    assert predict(40.0, 30, 0.25) == pytest.approx(40.0 + 30 * 2 * 0.25)
    row = lambda tok_s: {"tok_s_1": tok_s, "tok_s_8": 3 * tok_s}   # noqa: E731
    r = {"pinned": {"spin_us": 0.0, "alone": row(20.0), "pinned": row(17.0), "ratio_1": 0.85, "ratio_8": 0.85},
         "delayed": [{"delay_ms": 0.25, "tok_s": 18.0, "ms_per_token": 55.6, "model_ms_per_token": 55.0,
                      "measured_over_model": 1.011}]}
    text = table(r)
    assert "| 1 | 20.0 | 17.0 | 0.85 |" in text and "| 8 | 60.0 | 51.0 | 0.85 |" in text
    assert "| 0.25 ms | 18.0 | 55.6 | 55.0 | 1.011 |" in text and "TTFT" not in text
    r["pinned"].update(prompt_tokens=256)
    r["pinned"]["alone"]["ttft_long_s"], r["pinned"]["pinned"]["ttft_long_s"] = 0.30, 0.3204
    assert "TTFT, 256-token prompt: server alone 300 ms, server + 1 node 320 ms" in table(r)
