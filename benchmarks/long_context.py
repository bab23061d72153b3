"""Capturing attention on a long prompt: what a trace holds, against its KV cache and a full capture.

    python benchmarks/long_context.py            # 8192 tokens; writes benchmarks/LONG_CONTEXT.md
    python benchmarks/long_context.py --quick    # 1024 tokens; prints, writes nothing

A stack of OLMo-3-7B attention layers (hidden 4096, 32 query and 32 key/value heads of 128, RoPE,
QK-norm; one sliding-window layer of 4096 and one full-attention layer, as the 7B alternates them), fp32,
random weights. The MLP is narrowed to 1024 and the vocabulary to 1024 (the last position's logits only):
neither touches what attention capture keeps, they only cost time. Each figure is measured in a fresh
process: the extra peak resident memory of a forward that records every layer's attention
(`olmo_lab.trace(model, attention=True)`, which keeps post-RoPE queries and keys and computes patterns
when read) over a plain forward, then reading one window of the pattern (the last 128 queries, every
head, every key). A full capture (every layer's heads x S x S probabilities, as `output_attentions=True`
returns them) is computed from the shapes, not run: at 8192 tokens it is 17 GiB.
Target (issue 19): capture at most twice the KV cache.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SHAPE = dict(model_type="olmo3", vocab_size=1024, hidden_size=4096, intermediate_size=1024, num_hidden_layers=2,
             num_attention_heads=32, num_key_value_heads=32, sliding_window=4096,
             layer_types=["sliding_attention", "full_attention"], max_position_embeddings=65536)
READ_QUERIES = 128

PROBE = r"""
import ctypes, gc, json, sys, torch
import olmo_lab
trim = ctypes.CDLL("libc.so.6").malloc_trim  # freed heap back to the system, so RSS counts live memory
S, mode = int(sys.argv[1]), sys.argv[2]
torch.set_num_threads(int(sys.argv[3]))
torch.manual_seed(0)
model = olmo_lab.OlmoModel(olmo_lab.OlmoConfig(**json.loads(sys.argv[4]))).eval()
ids = torch.randint(3, 1024, (1, S))

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

def reset():
    gc.collect(); trim(0)
    open("/proc/self/clear_refs", "w").write("5")  # VmHWM := the current RSS

out = {}
with torch.inference_mode():
    model(ids[:, :64], logits_to_keep=1)  # warm-up: kernels and allocator pools
    reset(); before = status("VmRSS:")
    if mode == "plain":
        model(ids, logits_to_keep=1)
        out["peak"] = status("VmHWM:") - before
    else:
        with olmo_lab.trace(model, attention=True, routing=False) as tr:
            model(ids, logits_to_keep=1)
        out["peak"] = status("VmHWM:") - before
        gc.collect(); trim(0)
        out["held"] = status("VmRSS:") - before  # what the finished trace keeps
        reset(); before = status("VmRSS:")
        window = tr.pattern(1, queries=slice(S - %(read)d, S))  # (1, heads, 128, S)
        out["read peak"] = status("VmHWM:") - before
        out["window sums to 1"] = bool(torch.allclose(window.sum(-1), torch.ones(1)))
print(json.dumps(out))
""" % {"read": READ_QUERIES}


def probe(S: int, mode: str, threads: int) -> dict:
    cmd = [sys.executable, "-c", PROBE, str(S), mode, str(threads), json.dumps(SHAPE)]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])


def measure(S: int, threads: int) -> dict:
    L, kv, hd, heads = SHAPE["num_hidden_layers"], SHAPE["num_key_value_heads"], 128, SHAPE["num_attention_heads"]
    kv_cache = L * 2 * S * kv * hd * 4  # keys and values, fp32 (the sliding layer's full prompt: it is one call)
    full = L * heads * S * S * 4
    plain, traced = probe(S, "plain", threads), probe(S, "trace", threads)
    capture = traced["peak"] - plain["peak"]
    return {"tokens": S, "layers": L, "KV cache bytes": kv_cache, "full capture bytes (computed)": full,
            "plain forward peak": plain["peak"], "traced forward peak": traced["peak"], "capture (extra peak)": capture,
            "held after the forward": traced["held"], "reading 128 queries x all heads, peak": traced["read peak"],
            "window rows sum to 1": traced["window sums to 1"], "capture / KV cache": capture / kv_cache,
            "held / KV cache": traced["held"] / kv_cache, "full capture / KV cache": full / kv_cache}


def report(r: dict, threads: int) -> str:
    mib = lambda b: f"{b / 2**20:,.0f} MiB"  # noqa: E731
    lines = ["# Long-context attention capture (issue 19)", "",
             f"{datetime.date.today().isoformat()}, {os.cpu_count()} CPUs, {threads} thread(s), load average "
             f"{os.getloadavg()[0]:.1f}. Written by `python benchmarks/long_context.py`. "
             f"{r['layers']} OLMo-3-7B attention layers (one sliding-window, one full), fp32, {r['tokens']} tokens; "
             "each figure in a fresh process (peak RSS).", "",
             "| figure | bytes | / KV cache |", "|---|---|---|",
             f"| KV cache of the prompt (keys and values, every layer) | {mib(r['KV cache bytes'])} | 1.00 |",
             f"| capture: extra peak of a traced forward over a plain one | {mib(r['capture (extra peak)'])} | "
             f"{r['capture / KV cache']:.2f} |",
             f"| held by the finished trace | {mib(r['held after the forward'])} | {r['held / KV cache']:.2f} |",
             f"| reading one window: last {READ_QUERIES} queries, every head and key (peak) | "
             f"{mib(r['reading 128 queries x all heads, peak'])} | |",
             f"| full capture (every layer's heads x S x S, computed from the shapes) | "
             f"{mib(r['full capture bytes (computed)'])} | {r['full capture / KV cache']:.1f} |", "",
             "| target | measured | met |", "|---|---|---|",
             f"| capture at most 2x the KV cache | {r['capture / KV cache']:.2f}x | "
             f"{'yes' if r['capture / KV cache'] <= 2 else '**no**'} |", "",
             "The trace keeps each layer's post-RoPE queries and keys (queries: heads x S x 128, keys the same with "
             "as many key/value heads), so it holds about one KV cache; a pattern is computed when read, in blocks "
             "of 128 queries that see keys only up to their end.", ""]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1024 tokens; prints, writes nothing")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    r = measure(1024 if args.quick else 8192, args.threads)
    text = report(r, args.threads)
    print(text)
    if not args.quick:
        with open(os.path.join(HERE, "LONG_CONTEXT.md"), "w") as f:
            f.write(text)
        with open(os.path.join(HERE, "long_context.json"), "w") as f:
            json.dump(r, f, indent=1)


if __name__ == "__main__":
    main()
