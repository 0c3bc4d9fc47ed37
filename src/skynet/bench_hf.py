"""Helpers of `skynet bench`: the prompts, the HF transformers baseline, tables and the plot.

The baseline runs in the bench process with torch capped at 2 threads (the thread budget the
whole cluster gets on the 2-core reference machine), in float32, greedy, with min_new_tokens so
every run produces exactly the requested number of tokens.
"""
from __future__ import annotations

import statistics
import time

PROMPT = "The old lighthouse keeper climbed the stairs one last time and"
PARAGRAPH = (
    "The harbour town woke slowly. Fishing boats came in with the tide, gulls circled the market, "
    "and the baker opened his shutters while the church bell counted seven. Children ran along the "
    "sea wall, merchants argued over the price of salt, and an old map of the coast hung in the "
    "window of the inn, its edges curled by decades of damp air. ")


def long_prompt(tokenizer, n: int) -> list[int]:
    """Exactly n token ids: the paragraph repeated, tokenised, then truncated."""
    text, ids = PARAGRAPH, []
    while len(ids) < n:
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        text += PARAGRAPH
    return list(ids[:n])


def median(xs) -> float:
    return float(statistics.median(xs))


def decode_only(n: int, total_s: float, ttft_s: float) -> float | None:
    """Tokens/s after the first token, with the TTFT measured in separate runs (None if noise wins)."""
    return (n - 1) / (total_s - ttft_s) if total_s > ttft_s else None


def load_hf(model_dir):
    """HF transformers' float32 model of model_dir, eval mode, torch capped at 2 threads."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(2)
    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


def generator(model):
    """gen(ids, new, batch=1) -> (seconds, new ids (batch, new)): HF's greedy generate of exactly
    `new` tokens after ids, timed."""
    import torch

    pad = model.generation_config.pad_token_id
    if pad is None:
        pad = model.generation_config.eos_token_id
        pad = pad[0] if isinstance(pad, list) else pad

    def gen(ids: list[int], new: int, batch: int = 1):
        x = torch.tensor([ids] * batch, dtype=torch.long)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new,
                                 min_new_tokens=new, do_sample=False, pad_token_id=pad)
        return time.perf_counter() - t0, out[:, len(ids):]
    return gen


def run_hf(model, prompt_ids: list[int], long_ids: list[int], n: int, batches, reps: int,
           say=print) -> dict:
    """HF transformers figures of a loaded model (load_hf); returns a dict with the greedy ids of
    the single-stream run. The caller owns (and frees) the model."""
    gen = generator(model)
    gen(prompt_ids, 4)   # warm-up: first-call allocations, kernels
    ttft_short = median(gen(prompt_ids, 1)[0] for _ in range(reps))
    runs = [gen(prompt_ids, n) for _ in range(reps)]
    t = median(r[0] for r in runs)
    ids = [int(i) for i in runs[0][1][0]]
    assert len(ids) == n, f"HF generated {len(ids)} tokens, expected {n}"
    say(f"  HF single stream: {n / t:.1f} tok/s")
    ttft_long = median(gen(long_ids, 1)[0] for _ in range(reps))
    say(f"  HF TTFT ({len(long_ids)}-token prompt): {ttft_long * 1000:.0f} ms")
    batch_tok_s = {}
    for b in batches:
        tb = t if b == 1 else gen(prompt_ids, n, b)[0]
        batch_tok_s[str(b)] = b * n / tb
        say(f"  HF batch {b}: {batch_tok_s[str(b)]:.1f} tok/s")
    return {"decode_tok_s": n / t, "decode_only_tok_s": decode_only(n, t, ttft_short),
            "ttft_short_s": ttft_short, "ttft_s": ttft_long, "batch_tok_s": batch_tok_s,
            "threads": 2, "ids": ids}


def long_context(timed, ids: list[int], new: int, reps: int) -> dict:
    """A long prompt's figures from `timed(ids, tokens) -> seconds` (HF's generate or a request):
    the time to its first token, and the decode rate of the `new` tokens after it, at a position
    of about len(ids) (medians of reps)."""
    ttft = median(timed(ids, 1) for _ in range(reps))
    total = median(timed(ids, 1 + new) for _ in range(reps))
    return {"prompt_tokens": len(ids), "new_tokens": new, "ttft_s": ttft,
            "decode_tok_s": new / (total - ttft) if total > ttft else None}


def paired(first, second, pairs: int, settle_s: float = 0.2) -> dict:
    """`pairs` timings of each of first() and second() (each returns seconds), taken as alternated
    pairs, the order swapped every pair, `settle_s` apart. On a shared, noisy box the median of the
    pairs' ratios (second / first) is steadier than a ratio of two medians taken minutes apart."""
    a, b = [], []
    for i in range(pairs):
        for f, out in ((first, a), (second, b)) if i % 2 == 0 else ((second, b), (first, a)):
            time.sleep(settle_s)   # whatever the other one left running (spinning threads) winds down
            out.append(f())
    return {"pairs": pairs, "first_s": a, "second_s": b, "first_median_s": median(a),
            "second_median_s": median(b), "ratio": median([y / x for x, y in zip(a, b)])}


# ---------------------------------------------------------------------------- output
def table(title: str, header: list[str], rows: list[list]) -> str:
    cells = [[_fmt(c) for c in r] for r in [header, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)   # noqa: E731
                               for i, (c, w) in enumerate(zip(r, widths)))
    sep = "  ".join("-" * w for w in widths)
    return "\n".join([title, line(cells[0]), sep, *(line(r) for r in cells[1:])])


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def ratio(a, b):
    return a / b if a is not None and b else None


def plot(path, hf: dict, scaling: dict, concurrency: dict, model: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    xs = sorted(int(k) for k in scaling)
    ax1.plot(xs, [scaling[str(x)]["decode_tok_s"] for x in xs], "o-", label="SkyNet (single stream)")
    ax1.axhline(hf["decode_tok_s"], color="gray", ls="--", label="HF transformers, 2 threads")
    ax1.set(xlabel="nodes", ylabel="tokens/s", title="single-stream tokens/s vs nodes", xticks=xs)
    ax1.set_ylim(bottom=0)
    ax1.legend()
    bs = sorted(int(k) for k in concurrency)
    ax2.plot(bs, [concurrency[str(b)] for b in bs], "o-", label="SkyNet (concurrent streams)")
    hb = sorted(int(k) for k in hf["batch_tok_s"])
    ax2.plot(hb, [hf["batch_tok_s"][str(b)] for b in hb], "s--", color="gray", label="HF transformers (batch)")
    ax2.set(xlabel="concurrent streams / batch size", ylabel="aggregate tokens/s",
            title="aggregate tokens/s vs concurrency", xticks=bs)
    ax2.set_ylim(bottom=0)
    ax2.legend()
    fig.suptitle(model)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
