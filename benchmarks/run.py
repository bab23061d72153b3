"""olmo-lab against transformers on the same weights, in the same process: speed, memory, tracing cost.

    python benchmarks/run.py            # full run, writes benchmarks/RESULTS.md and results.json
    python benchmarks/run.py --quick    # smaller models and fewer repeats (a smoke test)
    python benchmarks/run.py --device cuda
    python benchmarks/run.py --only coldstart   # re-measure the cold start alone; other figures kept
    python benchmarks/run.py --only decode      # the decode-limits section alone (--quick: a smoke test)

Every figure is a median over repeats and is reported as a ratio to transformers measured in the same
run, because absolute times on shared machines drift. Decoding one token reads every active weight
once, so decode speed is reported against two bounds: the kernel bound (one pass of torch's own
matrix-vector products over the same weights: as fast as decoding can be with those kernels) and the
memory bound (the same bytes read at the streaming bandwidth measured in the same run: the physical
limit). The decode-limits section adds the static cache and the compiled decode step, fp32 and bf16.
Not part of the unit tests: timings are measured here, never asserted.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

import olmo_lab
from olmo_lab.config import OlmoConfig
from olmo_lab.model import OlmoModel
from olmo_lab.trace import trace

HERE = os.path.dirname(os.path.abspath(__file__))

MODELS = {  # name: (config, expert subset used for the memory figure)
    "olmo3-150M": dict(model_type="olmo3", vocab_size=50304, hidden_size=768, intermediate_size=2048,
                       num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4, sliding_window=256,
                       max_position_embeddings=4096),
    "flexolmo-160M-top2": dict(model_type="flex_olmo", vocab_size=50304, hidden_size=512, intermediate_size=1024,
                               num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8, num_experts=8,
                               num_experts_per_tok=2, max_position_embeddings=4096),
}
LAB_MODELS = ["olmo3-lab", "flexolmo-lab"]
QUICK = {"hidden_size": 384, "intermediate_size": 512, "num_hidden_layers": 4, "vocab_size": 8192}


def median_time(fn, repeats: int, warmup: int = 1, reduce=statistics.median) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return reduce(times)


def make_checkpoint(name: str, overrides: dict, directory: str) -> str:
    cfg = OlmoConfig(**{**MODELS[name], **overrides, "eos_token_id": 0, "pad_token_id": 1})
    torch.manual_seed(0)
    model = OlmoModel(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    path = os.path.join(directory, name)
    olmo_lab.save_model(model, path)
    return path


def hf_load(path, dtype, device):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()


@torch.inference_mode()
def decode_matrices(model) -> list[torch.Tensor]:
    """The weight matrices one batch-1 decode step reads (the active experts only; not the embedding table)."""
    cfg = model.config
    mats = []
    for block in model.model.layers:
        a = block.self_attn
        mats += [a.q_proj.weight, a.k_proj.weight, a.v_proj.weight, a.o_proj.weight]
        experts = [block.mlp] if not cfg.is_moe else list(block.mlp.experts)[:cfg.num_experts_per_tok]
        if cfg.is_moe:
            mats.append(block.mlp.gate.weight)
        for e in experts:
            mats += [e.gate_proj.weight, e.up_proj.weight, e.down_proj.weight]
    mats.append(model.lm_head.weight)
    return [m.detach() for m in mats]


@torch.inference_mode()
def kernel_bound(model, repeats) -> float:
    """Seconds for one pass of torch.mv over the weights a decode step reads.

    The fastest of the repeats, not the median: this is a lower bound, and interference only adds time.
    """
    mats = decode_matrices(model)
    vecs = {m.shape[1]: torch.randn(m.shape[1], dtype=m.dtype, device=m.device) for m in mats}
    outs = [torch.empty(m.shape[0], dtype=m.dtype, device=m.device) for m in mats]

    def one_pass():
        for m, out in zip(mats, outs):
            torch.mv(m, vecs[m.shape[1]], out=out)
    return median_time(one_pass, repeats, warmup=2, reduce=min)


def decode_speed(model, hf, batch, prompt_len, new_tokens, repeats, device):
    ids = torch.randint(2, model.config.vocab_size, (batch, prompt_len), device=device)
    ours = median_time(lambda: olmo_lab.generate(model, None, ids, max_new_tokens=new_tokens, eos_token_id=[]),
                       repeats)
    theirs = median_time(lambda: hf.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                             do_sample=False, eos_token_id=None, pad_token_id=1), repeats)
    return batch * new_tokens / ours, batch * new_tokens / theirs


@torch.inference_mode()
def prefill_speed(model, hf, length, repeats, device):
    ids = torch.randint(2, model.config.vocab_size, (1, length), device=device)
    ours = median_time(lambda: model(ids, logits_to_keep=1), repeats)
    theirs = median_time(lambda: hf(ids, logits_to_keep=1), repeats)
    return length / ours, length / theirs


PROBE = r"""
import json, sys, time, torch
def rss(f):
    for line in open("/proc/self/status"):
        if line.startswith(f): return int(line.split()[1]) * 1024
which, path, experts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
import olmo_lab
if which == "transformers":  # warm up on the meta device so only the load itself is measured
    from transformers import AutoConfig, AutoModelForCausalLM
    with torch.device("meta"):
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
else:
    with torch.device("meta"):
        olmo_lab.OlmoModel(olmo_lab.OlmoConfig.from_json(path))
open("/proc/self/clear_refs", "w").write("5")
before = rss("VmRSS:")
start = time.perf_counter()
if which == "transformers":
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
else:
    model = olmo_lab.load_model(path, experts=experts)
print(json.dumps({"seconds": time.perf_counter() - start, "peak": rss("VmHWM:") - before}))
"""


def load_probe(which, path, experts=None) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, which, path, json.dumps(experts)], capture_output=True,
                         text=True, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::mv", "aten::_grouped_mm"}


@torch.inference_mode()
def decode_profile(run) -> dict:
    """Where the time of `run` (a short decode) goes: shares of wall time by kind of operator.

    'matrix products' is time inside the GEMM/GEMV kernels (what the kernel bound measures);
    'other operators' the rest of aten's own time (norms, RoPE, softmax, indexing, copies);
    'framework and Python' whatever the profiler saw outside any operator.
    """
    from torch.profiler import ProfilerActivity, profile
    run()  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        run()
        wall = time.perf_counter() - start
    events = prof.key_averages()
    matmul = sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS) / 1e6
    ops = sum(e.self_cpu_time_total for e in events if e.key.startswith("aten::")) / 1e6
    return {"matrix products": matmul / wall, "other operators": (ops - matmul) / wall,
            "framework and Python": max(0.0, 1 - ops / wall)}


DECODE_LIMIT_MODELS = ["olmo3-lab", "olmo3-150M"]  # per-step overhead dominates the first, memory traffic the second
DECODE_KINDS = {"eager": {}, "static": {"cache": "static"}, "compiled": {"cache": "static", "compile": True}}


@torch.inference_mode()
def streaming_seconds(nbytes: int, repeats: int, device) -> float:
    """Seconds to read `nbytes` once: a sum over an fp32 tensor of that size, fastest of repeats."""
    t = torch.ones(nbytes // 4, device=device)
    return median_time(lambda: t.sum(), repeats, warmup=2, reduce=min)


@torch.inference_mode()
def matvec_kernels(mats: list[torch.Tensor], repeats: int) -> dict:
    """GiB/s of one pass over `mats` with each CPU matrix-vector kernel in reach: which one limits decoding."""
    vecs = {k: torch.randn(1, k, dtype=mats[0].dtype) for k in {m.shape[1] for m in mats}}
    passes = {"torch.mv": lambda: [torch.mv(m, vecs[m.shape[1]][0]) for m in mats],
              "F.linear (nn.Linear)": lambda: [F.linear(vecs[m.shape[1]], m) for m in mats]}
    if mats[0].dtype == torch.float32:
        arrays, np_vecs = [m.numpy() for m in mats], {k: v[0].numpy() for k, v in vecs.items()}
        passes["numpy"] = lambda: [a @ np_vecs[a.shape[1]] for a in arrays]
    if torch.backends.mkldnn.is_available():  # oneDNN, weights prepacked for batch 1 (as inductor's freezing does)
        packed = [torch.ops.mkldnn._reorder_linear_weight(m, 1) for m in mats]
        passes["oneDNN prepacked"] = lambda: [torch.ops.mkldnn._linear_pointwise(vecs[m.shape[1]], p, None, "none",
                                                                                 [], "") for m, p in zip(mats, packed)]
    nbytes = sum(m.numel() * m.element_size() for m in mats)
    return {name: nbytes / median_time(f, repeats, warmup=1, reduce=min) / 2**30 for name, f in passes.items()}


def decode_limits(path: str, repeats: int, new_tokens: int, device) -> dict:
    """Batch-1 decode of one checkpoint in fp32 and bf16: eager, static cache and compiled, against the memory
    bound (bytes of the matrices read per token at the streaming bandwidth measured here) and the kernel bound."""
    model = olmo_lab.load_model(path).to(device)
    ids = torch.randint(2, model.config.vocab_size, (1, 32), device=device)
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        model.to(dtype)
        nbytes = sum(m.numel() * m.element_size() for m in decode_matrices(model))

        def run(kw):
            return olmo_lab.generate(model, None, ids, max_new_tokens=new_tokens, eos_token_id=[], **kw)
        start = time.perf_counter()
        run(DECODE_KINDS["compiled"])  # the first compiled call compiles the step
        first = time.perf_counter() - start
        times = {kind: [] for kind in DECODE_KINDS}
        for _ in range(repeats):  # the kinds take turns, so a change in load affects them alike
            for kind, kw in DECODE_KINDS.items():
                times[kind].append(median_time(lambda: run(kw), 1, warmup=0))
        speeds = {kind: new_tokens / statistics.median(t) for kind, t in times.items()}
        memory, kernel = streaming_seconds(nbytes, repeats * 5, device), kernel_bound(model, repeats * 3)
        out[str(dtype).removeprefix("torch.")] = {
            "bytes read per token": nbytes, "streaming read GiB/s": nbytes / memory / 2**30, "tok/s": speeds,
            "compile s": first - new_tokens / speeds["compiled"],
            "fraction of memory bound": {k: v * memory for k, v in speeds.items()},
            "fraction of kernel bound": {k: v * kernel for k, v in speeds.items()},
            "matvec GiB/s": matvec_kernels(decode_matrices(model), repeats * 3) if device.type == "cpu" else {}}
    return out


def decode_section_figures(repeats: int, quick: bool, device, tmp: str) -> dict:
    """The decode-limits figures of every model in DECODE_LIMIT_MODELS, with the machine's load around them."""
    load = os.getloadavg()[0]
    new_tokens = 16 if quick else 128
    paths = {name: olmo_lab.lab_model(name) if name in LAB_MODELS else
             make_checkpoint(name, QUICK if quick else {}, tmp) for name in DECODE_LIMIT_MODELS}
    out = {name: decode_limits(path, repeats, new_tokens, device) for name, path in paths.items()}
    out["conditions"] = (f"batch 1, 32-token prompt, {new_tokens} new tokens, median of {repeats}; machine load "
                         f"(1-min load average, start / end) {load:.1f} / {os.getloadavg()[0]:.1f} on "
                         f"{os.cpu_count()} CPUs")
    return out


@torch.inference_mode()
def tracing_overhead(model, repeats, device):
    """Prefill time with each kind of capture, relative to no tracing.

    'tracing off' is the time after traces have been entered and left again, relative to before any
    trace: it shows that leaving a trace removes every hook (what the hook points cost when nothing is
    attached, one `if` each, is too small to time separately).
    """
    ids = torch.randint(2, model.config.vocab_size, (1, 256), device=device)
    base = median_time(lambda: model(ids, logits_to_keep=1), repeats, reduce=min)  # noise only adds time

    def traced(**kw):
        def run():
            with trace(model, **kw):
                model(ids, logits_to_keep=1)
        return median_time(run, repeats, reduce=min) / base - 1

    out = {"attention, one layer": traced(attention=True, routing=False, layers=[0]),
           "attention, all layers": traced(attention=True, routing=False)}
    if model.config.is_moe:
        out["routing capture"] = traced(attention=False, routing=True)
    out["tracing off (after traces were removed)"] = median_time(lambda: model(ids, logits_to_keep=1), repeats,
                                                                 reduce=min) / base - 1
    return out


FIRST_LOAD = r"""
import sys, time
import olmo_lab
path = olmo_lab.lab_model("olmo3-lab")
start = time.perf_counter()
olmo_lab.load_model(path)
first = time.perf_counter() - start
start = time.perf_counter()
olmo_lab.load_model(path)
print(first, time.perf_counter() - start, "torch._dynamo" in sys.modules)
"""
COLD_TOKENS = 30


def cold_start(repeats: int) -> dict:
    """Fresh processes, the way a newcomer starts: `import torch` alone, the first and second `load_model`
    of olmo3-lab after `import olmo_lab`, and `olmo-lab generate` of 30 tokens from the shell.

    The three kinds of run take turns, so a change in the machine's load affects them alike; each figure
    is the fastest of the repeats, since other work on the machine only adds time.
    """
    script = os.path.join(os.path.dirname(sys.executable), "olmo-lab")
    cli = [script] if os.path.exists(script) else [sys.executable, "-m", "olmo_lab"]
    cli += ["generate", "The king said", "--max-new-tokens", str(COLD_TOKENS)]
    times = {"import torch": [], "generate": [], "first load": [], "second load": []}
    compiler, load_before = False, os.getloadavg()[0]
    for _ in range(repeats):
        times["import torch"].append(wall([sys.executable, "-c", "import torch"]))
        times["generate"].append(wall(cli))
        first, second, dynamo = subprocess.run([sys.executable, "-c", FIRST_LOAD], capture_output=True, text=True,
                                               check=True).stdout.split()
        times["first load"].append(float(first))
        times["second load"].append(float(second))
        compiler |= dynamo == "True"
    best = {k: min(v) for k, v in times.items()}
    return {"date": datetime.date.today().isoformat(), "repeats": repeats,
            "python -c 'import torch' s": best["import torch"],
            f"olmo-lab generate {COLD_TOKENS} tokens (olmo3-lab) s": best["generate"],
            "generate / import torch": best["generate"] / best["import torch"],
            "first load_model after import s": best["first load"], "second load_model s": best["second load"],
            "torch._dynamo imported by load_model": compiler,
            "machine load (1-min load average, start / end)": f"{load_before:.1f} / {os.getloadavg()[0]:.1f} "
                                                               f"on {os.cpu_count()} CPUs"}


def wall(cmd: list[str]) -> float:
    """Seconds from starting `cmd` to its exit (it must succeed)."""
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return time.perf_counter() - start


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small models, few repeats (smoke test)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--out", default=HERE)
    ap.add_argument("--only", choices=["coldstart", "decode"], help="measure only this section; keep the other "
                                                                     "figures of the results file")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    repeats = args.repeats or (2 if args.quick else 3)
    if args.only:
        name = "results-quick.json" if args.quick else "results.json"
        if os.path.exists(os.path.join(args.out, name)):
            with open(os.path.join(args.out, name)) as f:
                results = json.load(f)
        else:  # nothing measured before: this section alone
            results = header(args.quick, device)
        if args.only == "coldstart":
            results["cold start"] = cold_start(args.repeats or 7)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                results["decode limits"] = decode_section_figures(repeats, args.quick, device, tmp)
        write(results, args.out)
        return results
    new_tokens = 16 if args.quick else 128
    overrides = QUICK if args.quick else {}
    results = header(args.quick, device)
    with tempfile.TemporaryDirectory() as tmp:
        for name in MODELS:
            path = make_checkpoint(name, overrides, tmp)
            r = results["models"][name] = {}
            model = olmo_lab.load_model(path).to(device)
            hf = hf_load(path, torch.float32, device)
            r["parameters"] = model.num_parameters()
            r["weight_bytes"] = olmo_lab.checkpoint.checkpoint_size(path)
            bound = kernel_bound(model, repeats * 3)
            for batch in (1, 8):
                ours, theirs = decode_speed(model, hf, batch, 32, new_tokens, repeats, device)
                r[f"decode b{batch} fp32 tok/s"] = [ours, theirs]
                if batch == 1:
                    r["decode b1 fraction of kernel bound"] = ours * bound
            r["prefill 512 fp32 tok/s"] = list(prefill_speed(model, hf, 512, repeats, device))
            ids = torch.randint(2, model.config.vocab_size, (1, 32), device=device)
            if device.type == "cpu":  # the profile times CPU operators; on a GPU it would time kernel launches
                r["decode b1 fp32 profile"] = {
                    "olmo-lab": decode_profile(lambda: olmo_lab.generate(model, None, ids, max_new_tokens=16,
                                                                         eos_token_id=[])),
                    "transformers": decode_profile(lambda: hf.generate(ids, max_new_tokens=16, min_new_tokens=16,
                                                                       do_sample=False, eos_token_id=None,
                                                                       pad_token_id=1))}
            if model.config.is_moe:
                all_cfg = {**overrides, "num_experts_per_tok": MODELS[name]["num_experts"]}
                path_all = make_checkpoint(name, all_cfg, os.path.join(tmp, "all"))
                m_all, hf_all = olmo_lab.load_model(path_all).to(device), hf_load(path_all, torch.float32, device)
                r["top-all decode b1 fp32 tok/s"] = list(decode_speed(m_all, hf_all, 1, 32, new_tokens, repeats, device))
                r["top-all prefill 512 fp32 tok/s"] = list(prefill_speed(m_all, hf_all, 512, repeats, device))
                del m_all, hf_all
            bf_model, bf_hf = model.to(torch.bfloat16), hf.to(torch.bfloat16)
            r["decode b1 bf16 tok/s"] = list(decode_speed(bf_model, bf_hf, 1, 32, new_tokens, repeats, device))
            del model, hf, bf_model, bf_hf
            model = olmo_lab.load_model(path).to(device)
            r["tracing overhead (fraction of prefill time)"] = tracing_overhead(model, repeats * 4, device)
            ours, theirs = load_probe("olmo-lab", path), load_probe("transformers", path)
            r["load seconds"] = [ours["seconds"], theirs["seconds"]]
            r["load peak RSS / weight bytes"] = [ours["peak"] / r["weight_bytes"], theirs["peak"] / r["weight_bytes"]]
            if model.config.is_moe:
                two = load_probe("olmo-lab", path, [0, 1])
                r["subset load peak RSS, 2 of 8 experts / all"] = two["peak"] / ours["peak"]
            del model
        for name in LAB_MODELS:
            results["models"][name] = lab_model_figures(name, repeats, device)
        results["decode limits"] = decode_section_figures(repeats, args.quick, device, tmp)
    results["cold start"] = cold_start(repeats * 2 + 1)
    write(results, args.out)
    return results


def header(quick: bool, device) -> dict:
    """What every results file starts with: the machine, the versions, the date."""
    import transformers
    return {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
            "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "transformers": transformers.__version__,
            "date": datetime.date.today().isoformat(), "quick": quick, "models": {}}


def lab_model_figures(name: str, repeats: int, device) -> dict:
    """The shipped lab models (what the notebooks and widgets run), in fp32: decode and full-context prefill."""
    path = olmo_lab.lab_model(name)
    model = olmo_lab.load_model(path, dtype=torch.float32).to(device)
    hf = hf_load(path, torch.float32, device)
    context = model.config.max_position_embeddings
    r = {"parameters": model.num_parameters(), "weight_bytes": olmo_lab.checkpoint.checkpoint_size(path)}
    r[f"decode b1 fp32 tok/s ({context - 32} new tokens)"] = list(decode_speed(model, hf, 1, 32, context - 32, repeats,
                                                                             device))
    r[f"prefill {context} fp32 tok/s"] = list(prefill_speed(model, hf, context, repeats, device))
    return r


def _ratio(v):
    return v[0] / v[1]


def _ours(v):
    return v[0]


def _value(v):
    return v


TARGETS = [  # (model, or None for each of MODELS; figure; what to read off it; bound; at least (1) / at most (-1))
    # judged on the ~150M random models of the issue; the lab models are measured, not judged
    ("olmo3-150M", "decode b1 fp32 tok/s", _ratio, 3.0, 1, "decode b1 vs transformers"),
    (None, "decode b1 fraction of kernel bound", _value, 0.6, 1, "decode b1, fraction of the kernel bound"),
    (None, "prefill 512 fp32 tok/s", _ratio, 1.0, 1, "prefill vs transformers"),
    ("flexolmo-160M-top2", "decode b1 fp32 tok/s", _ratio, 1.5, 1, "top-2 decode vs transformers"),
    ("flexolmo-160M-top2", "prefill 512 fp32 tok/s", _ratio, 1.5, 1, "top-2 prefill vs transformers"),
    (None, "load peak RSS / weight bytes", _ours, 1.2, -1, "load peak RSS / weight bytes"),
]


def _judged(models: dict) -> list[str]:
    """Table rows judging every target of issue 7 on the models it names."""
    lines = []
    for model, r in models.items():
        for target_model, key, read, bound, sense, wording in TARGETS:
            if key in r and (model == target_model or (target_model is None and model in MODELS)):
                v = read(r[key])
                lines.append(f"| {model} | {wording} {'>=' if sense > 0 else '<='} {bound:g} | {v:.2f} | "
                             f"{'yes' if sense * (v - bound) >= 0 else '**no**'} |")
        overhead = r.get("tracing overhead (fraction of prefill time)", {})
        for k, limit in (("routing capture", 0.05), ("tracing off (after traces were removed)", 0.02)):
            if k in overhead:  # tracing off: the same code path, so any difference either way is noise
                ok = overhead[k] <= limit if k == "routing capture" else abs(overhead[k]) <= limit
                lines.append(f"| {model} | {k}: within {limit:.0%} | {overhead[k]:+.1%} | {'yes' if ok else '**no**'} |")
    return lines


COLD_TARGETS = [("first load_model after import s", 0.2), ("generate / import torch", 1.4)]  # at most


def cold_start_section(r: dict | None) -> list[str]:
    """The cold-start figures and their targets (issue 20), as Markdown lines; none before it was measured."""
    if not r:
        return []
    lines = ["## Cold start (issue 20)", "",
             f"Fresh processes, fastest of {r['repeats']} (measured {r['date']}; machine load below); the "
             f"three kinds of run take turns.", "", "| figure | value |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" if isinstance(v, float) else f"| {k} | {v} |"
              for k, v in r.items() if k not in ("date", "repeats")]
    lines += ["", "| target | measured | met |", "|---|---|---|"]
    lines += [f"| {k} <= {bound:g} | {r[k]:.3f} | {'yes' if r[k] <= bound else '**no**'} |" for k, bound in COLD_TARGETS]
    compiler = r["torch._dynamo imported by load_model"]
    lines += [f"| no compiler import on the loading path | {'torch._dynamo' if compiler else 'none'} | "
              f"{'**no**' if compiler else 'yes'} |", ""]
    return lines


DECODE_TARGETS = [  # (model, what, read from the figures, at least); judged on a full run only
    ("olmo3-150M", "bf16 eager decode / fp32 eager", lambda r: r["bfloat16"]["tok/s"]["eager"] /
     r["float32"]["tok/s"]["eager"], 1.8),
    ("olmo3-150M", "fp32 decode, fraction of its memory bound (best path)",
     lambda r: max(r["float32"]["fraction of memory bound"].values()), 0.5),
    ("olmo3-150M", "bf16 decode, fraction of its memory bound (best path)",
     lambda r: max(r["bfloat16"]["fraction of memory bound"].values()), 0.5),
    ("olmo3-lab", "fp32 compiled decode / eager", lambda r: r["float32"]["tok/s"]["compiled"] /
     r["float32"]["tok/s"]["eager"], 2.0),
]


def decode_section(r: dict | None, quick: bool) -> list[str]:
    """The decode-limits figures and their targets (issue 19), as Markdown lines; none before they were measured."""
    if not r:
        return []
    models = {k: v for k, v in r.items() if k != "conditions"}
    lines = ["## Decode near the memory limit (issue 19)", "", f"{r['conditions']}. Memory bound: the bytes of the "
             "matrices one token reads (not the embedding table) at the streaming-read bandwidth of a sum over a "
             "tensor of that size, measured in the same run (a model that fits in the last-level cache reads at "
             "cache speed); kernel bound: one pass of torch.mv over the same matrices. The compiled step runs "
             "after the prompt (uncompiled); compile s is its first call's extra time.", "",
             "| model | dtype | MiB/token | stream GiB/s | eager tok/s | static tok/s | compiled tok/s | static / "
             "eager | compiled / eager | compile s | eager / memory bound | compiled / memory bound | eager / "
             "kernel bound |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, by_dtype in models.items():
        for dtype, f in by_dtype.items():
            v, mem = f["tok/s"], f["fraction of memory bound"]
            lines.append(f"| {name} | {dtype} | {f['bytes read per token'] / 2**20:.1f} | "
                         f"{f['streaming read GiB/s']:.1f} | {v['eager']:.1f} | {v['static']:.1f} | "
                         f"{v['compiled']:.1f} | {v['static'] / v['eager']:.2f}x | {v['compiled'] / v['eager']:.2f}x | "
                         f"{f['compile s']:.1f} | {mem['eager']:.2f} | {mem['compiled']:.2f} | "
                         f"{f['fraction of kernel bound']['eager']:.2f} |")
    kernels = sorted({k for by_dtype in models.values() for f in by_dtype.values() for k in f["matvec GiB/s"]})
    if kernels:
        lines += ["", "Matrix-vector kernels over the same matrices, GiB/s (the streaming read is the ceiling):", "",
                  "| model | dtype | " + " | ".join(kernels) + " | streaming read |",
                  "|---|---|" + "---|" * (len(kernels) + 1)]
        for name, by_dtype in models.items():
            for dtype, f in by_dtype.items():
                cells = [f"{f['matvec GiB/s'][k]:.1f}" if k in f["matvec GiB/s"] else "" for k in kernels]
                lines.append(f"| {name} | {dtype} | " + " | ".join(cells) + f" | {f['streaming read GiB/s']:.1f} |")
    lines.append("")
    if quick:
        return lines + ["Not judged: a quick run uses a smaller model than the targets are set for.", ""]
    lines += ["| model | target | measured | met |", "|---|---|---|---|"]
    for name, what, read, bound in DECODE_TARGETS:
        if name in models:
            v = read(models[name])
            lines.append(f"| {name} | {what} >= {bound:g} | {v:.2f} | {'yes' if v >= bound else '**no**'} |")
    return lines + [""]


def write(results: dict, out: str) -> None:
    os.makedirs(out, exist_ok=True)
    name = "results-quick.json" if results["quick"] else "results.json"
    with open(os.path.join(out, name), "w") as f:
        json.dump(results, f, indent=2)
    lines = [f"# Benchmark results{' (quick)' if results['quick'] else ''}", "",
             f"- date: {results['date']}; device: {results['device']}; machine: {results['machine']}",
             f"- torch {results['torch']} ({results['threads']} threads); transformers {results['transformers']}",
             "- pairs are olmo-lab / transformers on the same weights in the same process; median of repeats "
             "(the kernel and memory bounds and tracing overheads: fastest of repeats, since noise only adds time)",
             "- transformers memory-maps the checkpoint, so its load time and peak RSS right after loading leave out "
             "reading the weights (that happens on first use); olmo-lab reads every tensor and checks its shape and "
             "that it is finite while loading", ""]
    for model, r in results["models"].items():
        lines += [f"## {model} ({r['parameters'] / 1e6:.1f}M parameters, {r['weight_bytes'] / 2**20:.0f} MiB)", "",
                  "| figure | olmo-lab | transformers | ratio |", "|---|---|---|---|"]
        profile = r.get("decode b1 fp32 profile", {})
        for key, value in r.items():
            if isinstance(value, list):
                lines.append(f"| {key} | {value[0]:.2f} | {value[1]:.2f} | {value[0] / value[1]:.2f}x |")
            elif isinstance(value, dict) and value is not profile:
                for k, v in value.items():
                    lines.append(f"| {key}: {k} | {v:+.1%} | | |")
            elif isinstance(value, float):
                lines.append(f"| {key} | {value:.2f} | | |")
        if profile:
            kinds = list(profile["olmo-lab"])
            lines += ["", "Decode b1 profile (share of wall time, 16 tokens, torch.profiler; the profiler's own "
                          "cost lands in 'framework and Python'):", "",
                      "| | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
            lines += [f"| {who} | " + " | ".join(f"{shares[k]:.0%}" for k in kinds) + " |" for who, shares in profile.items()]
            ratio, share = _ratio(r["decode b1 fp32 tok/s"]), profile["olmo-lab"]["matrix products"]
            lines += ["", f"Ceiling: with every operator but the matrix products and all Python removed, olmo-lab's "
                          f"decode b1 would be at most {ratio / share:.2f}x transformers ({ratio:.2f}x / {share:.0%})."]
        lines.append("")
    lines += cold_start_section(results.get("cold start"))
    lines += decode_section(results.get("decode limits"), results["quick"])
    lines += ["## Targets (issue 7)", ""]
    if results["quick"]:
        lines += ["Not judged: a quick run uses smaller models than the targets are set for.", ""]
    else:
        lines += ["| model | target | measured | met |", "|---|---|---|---|"] + _judged(results["models"]) + [""]
    path = os.path.join(out, "RESULTS-quick.md" if results["quick"] else "RESULTS.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
