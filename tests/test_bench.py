"""`skynet bench --quick` end to end: it runs, exits 0 and writes complete results (no speed targets)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

KEYS = {"meta", "hf", "skynet", "scaling", "elastic"}


def test_quick_bench_writes_results(tmp_path, default_model_dir):
    pytest.importorskip("matplotlib", reason="the bench extra is not installed (pip install -e '.[bench]')")
    out = tmp_path / "bench"
    env = {**os.environ, "SKYNET_NO_PROGRESS": "1", "PYTHONUNBUFFERED": "1"}
    p = subprocess.run([sys.executable, "-m", "skynet.cli", "bench", "--quick", "--tokens", "8", "--nodes", "1",
                        "--out", str(out)], capture_output=True, text=True, timeout=240, env=env,
                       stdin=subprocess.DEVNULL)
    assert p.returncode == 0, f"stdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-3000:]}"
    assert "HF transformers" in p.stdout and (out / "bench.png").stat().st_size > 0

    r = json.loads((out / "results.json").read_text())
    assert KEYS <= r.keys()
    assert r["meta"]["tokens"] == 8 and r["meta"]["nodes"] == 1 and r["elastic"] is None  # --quick skips it
    hf, sky = r["hf"], r["skynet"]
    for d in (hf, sky):
        for k in ("decode_tok_s", "ttft_short_s", "ttft_s"):
            assert d[k] > 0, k
    assert set(hf["batch_tok_s"]) == set(sky["concurrency_tok_s"]) == {"1", "4", "8"}
    assert all(v > 0 for v in [*hf["batch_tok_s"].values(), *sky["concurrency_tok_s"].values()])
    assert isinstance(sky["identical"], bool)
    assert set(r["scaling"]) == {"0", "1", "2"}
    assert all(s["decode_tok_s"] > 0 for s in r["scaling"].values())
    wire = sky["wire"]
    assert wire["bytes_per_token"] > 0
    assert wire["theory_bytes_per_token"] == 2 * 1 * wire["layers"] * wire["hidden"] * 4
    bd = sky["breakdown_ms_per_token"]
    assert bd["total (wall)"] > 0 and bd["waiting on nodes (mlp wait)"] > 0
