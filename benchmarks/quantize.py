"""Batch-1 decode speed of quantized weights: fp32, bf16, int8 and int4 on the ~150M OLMo 3, and transformers
with torchao's same int8 scheme, in one run.

    python benchmarks/quantize.py            # the ~150M OLMo 3, 128 new tokens; writes quantize_results.json
    python benchmarks/quantize.py --quick    # a smaller model, 16 tokens (a smoke test)
    python benchmarks/quantize.py --tokens 16 --repeats 1   # the ~150M model, briefly

Targets (issue 19): int8 >= 3x fp32 and >= 1.2x transformers + torchao int8; int4 >= 4x fp32; int8 at least
0.5 of its memory limit (the bytes of the matrices one token reads, quantized values and scales, over the
streaming-read bandwidth measured in the same run). Figures are medians over repeats, reported as ratios
measured in the same run; never asserted. Writes QUANTIZE.md and quantize_results.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import tempfile

import torch

import olmo_lab
from run import HERE, MODELS, QUICK, make_checkpoint, median_time, streaming_seconds

MODEL = "olmo3-150M"
TARGETS = {"int8 / fp32": 3.0, "int8 / transformers+torchao int8": 1.2, "int4 / fp32": 4.0}


def decode_tokens_per_second(generate, new_tokens: int, repeats: int) -> float:
    return new_tokens / median_time(generate, repeats)


def transformers_int8(path):
    """transformers with torchao's Int8WeightOnlyConfig on every linear layer (lm_head too, as olmo-lab does)."""
    import transformers
    from torchao.quantization import Int8WeightOnlyConfig
    config = transformers.TorchAoConfig(Int8WeightOnlyConfig(), modules_to_not_convert=[])
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16,
                                                             quantization_config=config).eval()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller model, fewer tokens and repeats")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--tokens", type=int, default=None, help="new tokens per decode (default 128, --quick 16)")
    ap.add_argument("--out", default=HERE)
    args = ap.parse_args(argv)
    repeats = args.repeats or (2 if args.quick else 3)
    new_tokens = args.tokens or (16 if args.quick else 128)
    results = {"model": MODEL, "quick": args.quick, "threads": torch.get_num_threads(), "torch": torch.__version__,
               "new tokens": new_tokens, "decode b1 tok/s": {}, "weight bytes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        path = make_checkpoint(MODEL, QUICK if args.quick else {}, tmp)
        ids = torch.randint(2, (QUICK if args.quick else MODELS[MODEL])["vocab_size"], (1, 32))
        variants = {"fp32": dict(dtype=torch.float32), "bf16": dict(dtype=torch.bfloat16),
                    "int8": dict(quantize="int8"), "int4": dict(quantize="int4")}
        for name, kwargs in variants.items():
            model = olmo_lab.load_model(path, **kwargs)
            speed = decode_tokens_per_second(
                lambda: olmo_lab.generate(model, None, ids, max_new_tokens=new_tokens, eos_token_id=[]),
                new_tokens, repeats)
            results["decode b1 tok/s"][name] = speed
            q = model.quantization
            results["weight bytes"][name] = sum(p.numel() * p.element_size() for p in model.parameters()) \
                if q is None else q.bytes_after + sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                                                      if n.rpartition(".")[0] not in q.modules)
            embedding = model.model.embed_tokens.weight  # a lookup: one row per token, not read whole
            read = results["weight bytes"][name] - embedding.numel() * embedding.element_size()
            results.setdefault("bytes read per token", {})[name] = read
            print(f"{name}: {speed:.1f} tok/s" + (f"  ({q})" if q else ""), flush=True)
            del model
        hf = transformers_int8(path)
        speed = decode_tokens_per_second(
            lambda: hf.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                eos_token_id=None, pad_token_id=1), new_tokens, repeats)
        results["decode b1 tok/s"]["transformers+torchao int8"] = speed
        print(f"transformers+torchao int8: {speed:.1f} tok/s", flush=True)
    bandwidth = max(results["bytes read per token"].values()) / streaming_seconds(
        max(results["bytes read per token"].values()), repeats * 5, torch.device("cpu"))
    results["streaming read GB/s"] = bandwidth / 1e9
    results["fraction of the memory limit"] = {k: results["decode b1 tok/s"][k] * b / bandwidth
                                               for k, b in results["bytes read per token"].items()}
    s = results["decode b1 tok/s"]
    ratios = {"bf16 / fp32": s["bf16"] / s["fp32"], "int8 / fp32": s["int8"] / s["fp32"],
              "int8 / transformers+torchao int8": s["int8"] / s["transformers+torchao int8"],
              "int4 / fp32": s["int4"] / s["fp32"]}
    results["ratios"] = ratios
    for k, v in ratios.items():
        target = TARGETS.get(k)
        verdict = "" if target is None else f"  (target >= {target}: {'met' if v >= target else 'NOT met'})"
        print(f"{k}: {v:.2f}x{verdict}")
    name = "quantize_results-quick.json" if args.quick else "quantize_results.json"
    with open(os.path.join(args.out, name), "w") as f:
        json.dump(results, f, indent=2)
    if not args.quick:
        with open(os.path.join(args.out, "QUANTIZE.md"), "w") as f:
            f.write(report(results))
    return results


def report(r: dict) -> str:
    """QUANTIZE.md: speeds, bytes, fractions of the memory limit and the judged targets."""
    lines = ["# Quantized decode (issue 19)", "",
             f"{datetime.date.today().isoformat()}, {os.cpu_count()} CPUs, {r['threads']} threads, torch {r['torch']}, "
             f"load average {os.getloadavg()[0]:.1f} after the run; {r['model']}, batch 1, {r['new tokens']} new "
             f"tokens after a 32-token prompt; medians of repeats. Written by `python benchmarks/quantize.py`.", "",
             "| weights | tok/s | MiB read per token | fraction of the memory limit |", "|---|---|---|---|"]
    for k, v in r["decode b1 tok/s"].items():
        b = r["bytes read per token"].get(k)
        frac = r["fraction of the memory limit"].get(k)
        lines.append(f"| {k} | {v:.1f} | {'' if b is None else f'{b / 2**20:.0f}'} | "
                     f"{'' if frac is None else f'{frac:.2f}'} |")
    lines += ["", f"Streaming read measured in the same run: {r['streaming read GB/s']:.1f} GB/s.", "",
              "| target | measured | met |", "|---|---|---|"]
    for k, target in TARGETS.items():
        v = r["ratios"][k]
        lines.append(f"| {k} >= {target}x | {v:.2f}x | {'yes' if v >= target else '**no**'} |")
    f8 = r["fraction of the memory limit"]["int8"]
    lines.append(f"| int8 >= 0.5 of its memory limit | {f8:.2f} | {'yes' if f8 >= 0.5 else '**no**'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
