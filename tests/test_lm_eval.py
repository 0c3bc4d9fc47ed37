"""lm-evaluation-harness, for real: `lm-eval` in its own temporary venv runs the tasks shipped in
tests/data/lm_eval (46 multiple-choice questions scored by loglikelihood, 10 generate_until
questions) against a live SkyNet cluster (server + 2 nodes, --precision exact) through
`--model local-completions`, and with its `hf` backend on the same float32 checkpoint.
Accuracy must be equal and every (question, choice) loglikelihood within 1e-3.

Slow (installing lm-eval alone takes minutes): runs with SKYNET_SLOW=1. The temporary venv sees
this venv's packages (torch, transformers) through a .pth file, so pip adds only lm-eval's own.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from conftest import child_env
from skynet.launch import LocalCluster

TASKS = Path(__file__).resolve().parent / "data" / "lm_eval"
LL_TOL = 1e-3

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(os.environ.get("SKYNET_SLOW") != "1", reason="slow: set SKYNET_SLOW=1")]


@pytest.fixture(scope="module")
def lm_eval_bin(tmp_path_factory) -> Path:
    venv = tmp_path_factory.mktemp("lm-eval-venv")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    Path(site, "_skynet_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", "lm-eval[api,hf]"], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"could not install lm-eval: {r.stderr[-2000:]}")
    return venv / "bin" / "lm_eval"


def run_lm_eval(lm_eval: Path, out: Path, model: str, model_args: str, extra: list[str] = ()) -> dict:
    """Run both tasks; returns {"results": ..., "samples": {task: [sample, ...]}}."""
    env = child_env(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                    OPENAI_API_KEY="unused", TOKENIZERS_PARALLELISM="false")
    cmd = [str(lm_eval), "--model", model, "--model_args", model_args, "--tasks", "skynet_mc,skynet_gen",
           "--include_path", str(TASKS), "--output_path", str(out), "--log_samples", "--batch_size", "1", *extra]
    r = subprocess.run(cmd, cwd=TASKS, env=env, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, f"lm_eval {model} failed:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    results = json.loads(max(out.rglob("results_*.json")).read_text())
    samples = {}
    for task in ("skynet_mc", "skynet_gen"):
        path = max(out.rglob(f"samples_{task}_*.jsonl"))
        samples[task] = sorted((json.loads(l) for l in path.read_text().splitlines()),
                               key=lambda s: s["doc_id"])
    return {"results": results["results"], "samples": samples}


def test_lm_eval_skynet_equals_hf(lm_eval_bin, default_model_dir, tmp_path):
    args = "model=skynet,base_url={url}/v1/completions,tokenizer_backend=huggingface," \
           f"tokenizer={default_model_dir},tokenized_requests=True,num_concurrent=1,max_retries=1"
    with LocalCluster(model=None, nodes=2, server_args=["--precision", "exact"],
                      env={"SKYNET_NO_PROGRESS": "1"}) as lc:
        ours = run_lm_eval(lm_eval_bin, tmp_path / "skynet", "local-completions", args.format(url=lc.url))
        assert lc.cluster()["mlp"]["calls"] > 0
    hf = run_lm_eval(lm_eval_bin, tmp_path / "hf", "hf",
                     f"pretrained={default_model_dir},dtype=float32", ["--device", "cpu"])

    acc = {k: ours["results"]["skynet_mc"][k] for k in ours["results"]["skynet_mc"] if k.startswith("acc")}
    print(f"\n[lm-eval] skynet_mc skynet {acc}; hf "
          f"{ {k: hf['results']['skynet_mc'][k] for k in acc} }")
    assert len(ours["samples"]["skynet_mc"]) == 46
    for k in acc:
        if not k.endswith("stderr,none"):
            assert ours["results"]["skynet_mc"][k] == hf["results"]["skynet_mc"][k], k
    worst = 0.0
    for a, b in zip(ours["samples"]["skynet_mc"], hf["samples"]["skynet_mc"]):
        assert a["doc_id"] == b["doc_id"]
        for (ll_a, greedy_a), (ll_b, greedy_b) in zip(a["filtered_resps"], b["filtered_resps"]):
            worst = max(worst, abs(float(ll_a) - float(ll_b)))
            assert abs(float(ll_a) - float(ll_b)) <= LL_TOL, (a["doc_id"], ll_a, ll_b)
    print(f"[lm-eval] max |loglikelihood skynet - hf| = {worst:.2g}")
    gen_ours = [s["filtered_resps"] for s in ours["samples"]["skynet_gen"]]
    gen_hf = [s["filtered_resps"] for s in hf["samples"]["skynet_gen"]]
    assert gen_ours == gen_hf
    assert ours["results"]["skynet_gen"] == hf["results"]["skynet_gen"]
