"""Interventions benchmark (issue 18): olmo-lab against TransformerLens 4, nnsight and plain transformers.

    python benchmarks/interventions.py            # full run, writes benchmarks/INTERVENTIONS.md
    python benchmarks/interventions.py --quick    # smaller models, fewer repeats; prints, writes nothing

Everything runs in one process, on 2 threads, in fp32, on the same random checkpoints that
benchmarks/run.py builds (~150M OLMo 3, ~160M FlexOlmo; smaller with --quick), and every tool's
results are checked against olmo-lab's before any figure is reported:

1. Recording the attention pattern of every layer, the residual stream after every block (and the
   routing of every FlexOlmo layer) for a 512-token prompt, every recorded value then read back once
   (each tensor summed): wall time and extra memory, for olmo-lab's `trace`, TransformerLens 4's
   `TransformerBridge.run_with_cache` with a names filter, nnsight's `.save()`s and plain transformers
   (`output_attentions` / `output_hidden_states` / `output_router_logits`, eager attention), and the
   time of a plain olmo-lab forward.
2. A residual-stream activation-patching sweep (every layer x 24 positions, logit difference at the last
   position): `olmo_lab.patching.patch`, TransformerLens's `get_act_patch_resid_pre` on the bridge,
   nnsight's loop of traces, and plain transformers forward pre-hooks batched 24 rows per forward.
3. What the hook points cost when nothing (or only an idle edit) is attached.

Times: fastest of the repeats (the machine is shared; interference only adds time), medians alongside.
Memory: peak RSS during the call minus RSS just before it (VmHWM after resetting it through
/proc/self/clear_refs), with glibc's mmap threshold pinned at 128 KiB and the heap trimmed before each
probe, so freed tensors go back to the OS and the figure is the call's own peak for every tool alike.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import gc
import importlib.metadata
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
import traceback
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")  # TransformerLens's patching loop draws a progress bar otherwise

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from run import MODELS, QUICK, make_checkpoint, median_time  # noqa: E402  (benchmarks/run.py's helpers)

import olmo_lab  # noqa: E402
from olmo_lab.interventions import Zero, intervene  # noqa: E402
from olmo_lab.patching import patch  # noqa: E402

MiB = 2 ** 20
PROMPT = 512  # part 1's prompt length
PATCH_POSITIONS = 24  # part 2's prompt length (every position is patched)
IDLE_LENGTH = 256  # part 3's forward (as benchmarks/run.py's tracing overhead)
OURS_LAST = "olmo-lab, metric_positions=[-1] (logits of the last position only)"
PEER_LAST = "transformers forward hooks, batched, logits_to_keep=1 (last position only)"
TARGETS = {"memory vs peer": 0.6, "time vs peer": 1 / 1.2, "time vs plain forward": 1.1, "patching": 2.5,
           "idle hook points": 0.01, "idle intervention": 0.02}
EQUAL = 1e-4  # fp32: every tool's values must agree with olmo-lab's to this (max abs diff)


# ---------------------------------------------------------------------------------------------- timing, memory
def times(fn, repeats: int, warmup: int = 1) -> list[float]:
    return median_time(fn, repeats, warmup=warmup, reduce=list)


def summary(ts: list[float]) -> dict:
    return {"min": min(ts), "median": statistics.median(ts), "repeats": len(ts)}


_libc = ctypes.CDLL("libc.so.6")
M_MMAP_THRESHOLD = -3


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def peak_memory(fn) -> int:
    """Bytes: peak RSS while fn() runs (its result dropped inside) minus the RSS just before."""
    gc.collect()
    _libc.malloc_trim(0)
    before = _status("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := the current RSS
    fn()
    return _status("VmHWM:") - before


def consume(t: torch.Tensor) -> float:
    """Read a recorded value back once (every element)."""
    return float(t.sum())


# ---------------------------------------------------------------------------------------------- the tools
def tokenizer(directory: str):
    """A stand-in tokenizer (the random checkpoints have none; TransformerLens's bridge and nnsight want one).
    Every benchmark feeds token ids, so it never tokenizes anything."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    path = os.path.join(directory, "tokenizer")
    if not os.path.exists(path):
        t = Tokenizer(models.WordLevel({"<eos>": 0, "<pad>": 1, "<unk>": 2}, unk_token="<unk>"))
        t.pre_tokenizer = pre_tokenizers.Whitespace()
        PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<eos>", bos_token="<eos>", pad_token="<pad>",
                                unk_token="<unk>").save_pretrained(path)
    return PreTrainedTokenizerFast.from_pretrained(path)  # loaded from disk: the bridge re-reads name_or_path


def hf_eager(path):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    model.config.tie_last_hidden_states = False  # hidden_states[-1]: the last block's output, not after the final norm
    return model


class Tools:
    """Every tool on one checkpoint; a peer that fails to load is recorded with the reason."""

    def __init__(self, path: str, tmp: str):
        self.path = path
        self.ours = olmo_lab.load_model(path, dtype=torch.float32).eval()
        self.cfg = self.ours.config
        self.L, self.moe = self.cfg.num_hidden_layers, self.cfg.is_moe
        self.hf = hf_eager(path)
        self.errors: dict[str, str] = {}
        self.tok = tokenizer(tmp)
        self.bridge = self.lm = None
        try:
            from transformer_lens.model_bridge import TransformerBridge
            with warnings.catch_warnings(), contextlib.redirect_stderr(open(os.devnull, "w")):
                warnings.simplefilter("ignore")
                self.bridge = TransformerBridge.boot_transformers(path, device="cpu", dtype=torch.float32,
                                                                  tokenizer=self.tok)
            self.bridge.eval()
        except Exception as e:  # noqa: BLE001 - reported in the results
            self.errors["TransformerLens"] = f"TransformerBridge.boot_transformers failed: {type(e).__name__}: {e}"
        try:
            from nnsight.modeling.transformers import TransformersModel
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.nn_hf = hf_eager(path)  # nnsight's own copy: it wraps the modules it is given
                self.lm = TransformersModel(self.nn_hf, tokenizer=self.tok)
        except Exception as e:  # noqa: BLE001
            self.errors["nnsight"] = f"TransformersModel failed: {type(e).__name__}: {e}"


# ---------------------------------------------------------------------------------------------- 1. recording
def recorders(t: Tools):
    """{tool: (record(ids) -> record, read(record) -> iterator of (kind, layer, tensor))}."""
    L, moe = t.L, t.moe
    out = {}

    def ours_record(ids):
        with olmo_lab.trace(t.ours, attention=True, routing=True,
                            hooks=t.ours.hook_points("hook_resid_post")) as tr:
            t.ours(ids)
        return tr

    def ours_read(tr):
        for i in range(L):  # one layer's pattern at a time, each computed when read
            yield "pattern", i, tr.attention[i]
        for i in range(L):
            yield "resid_post", i, tr[f"model.layers.{i}.hook_resid_post"]
        if moe:
            routing = tr.routing
            for i in range(L):
                r = routing[i]
                yield "router_logits", i, r.logits
                yield "topk_indices", i, r.topk_indices
                yield "topk_weights", i, r.topk_weights
    out["olmo-lab"] = (ours_record, ours_read)

    if t.bridge is not None:
        names = [f"blocks.{i}.{n}" for i in range(L) for n in
                 ["attn.hook_pattern", "hook_resid_post"] + (["mlp.gate.hook_out"] if moe else [])]

        def tl_record(ids):
            _, cache = t.bridge.run_with_cache(ids, names_filter=names)
            return cache

        def tl_read(cache):
            for i in range(L):
                yield "pattern", i, cache[f"blocks.{i}.attn.hook_pattern"]
            for i in range(L):
                yield "resid_post", i, cache[f"blocks.{i}.hook_resid_post"]
            if moe:  # the bridge hooks the router's logits; the top-k choice has no hook point
                for i in range(L):
                    yield "router_logits", i, cache[f"blocks.{i}.mlp.gate.hook_out"]
        out["TransformerLens"] = (tl_record, tl_read)

    if t.lm is not None:
        lm = t.lm

        def nn_record(ids):
            import nnsight
            with lm.trace(ids):
                saved = nnsight.save([])
                for i in range(L):  # in forward order, as nnsight requires
                    layer = lm.model.layers[i]
                    saved.append(("pattern", i, layer.self_attn.output[1].save()))  # eager attention's weights
                    if moe:
                        saved.append(("router", i, layer.mlp.gate.output.save()))  # (logits, weights, indices)
                    saved.append(("resid_post", i, layer.output.save()))
            return saved

        def nn_read(saved):
            order = {"pattern": 0, "resid_post": 1, "router": 2}
            for kind, i, v in sorted(saved, key=lambda s: (order[s[0]], s[1])):
                if kind == "router":
                    yield "router_logits", i, v[0]
                    yield "topk_indices", i, v[2]
                    yield "topk_weights", i, v[1]
                else:
                    yield kind, i, v
        out["nnsight"] = (nn_record, nn_read)

    def hf_record(ids):
        o = t.hf(ids, output_attentions=True, output_hidden_states=True, output_router_logits=moe)
        return o.attentions, o.hidden_states, (o.router_logits if moe else None)

    def hf_read(rec):
        attentions, hidden, router = rec
        for i in range(L):
            yield "pattern", i, attentions[i]
        for i in range(L):
            yield "resid_post", i, hidden[i + 1]  # hidden[0] is the embedding
        if moe:
            for i in range(L):
                yield "router_logits", i, router[i]
    out["transformers"] = (hf_record, hf_read)
    return out


def plain_forwards(t: Tools):
    """{tool: plain forward of that tool's model}, for the memory a plain forward itself needs."""
    out = {"olmo-lab": lambda ids: t.ours(ids)}
    if t.bridge is not None:
        out["TransformerLens"] = lambda ids: t.bridge(ids)
    if t.lm is not None:
        out["nnsight"] = lambda ids: t.nn_hf(ids)  # the transformers model nnsight wraps, eager attention
    out["transformers"] = lambda ids: t.hf(ids)
    return out


@torch.no_grad()
def recording(t: Tools, repeats: int) -> dict:
    torch.manual_seed(1)
    ids = torch.randint(2, t.cfg.vocab_size, (1, PROMPT))
    tools = recorders(t)
    ref_record, ref_read = tools["olmo-lab"]
    ref = {(k, i): v.clone() for k, i, v in ref_read(ref_record(ids))}
    res = {"tools": {}, "errors": dict(t.errors)}
    for name, (record, read) in tools.items():
        r = res["tools"][name] = {}
        try:
            diffs = {}
            for kind, i, v in read(record(ids)):
                want = ref[(kind, i)]
                if kind == "topk_indices":
                    d = float((v.reshape(want.shape) != want).sum())  # tokens routed differently
                else:
                    d = float((v.reshape(want.shape).float() - want.float()).abs().max())
                diffs[kind] = max(diffs.get(kind, 0.0), d)
            r["max abs diff"] = diffs

            def run(record=record, read=read):
                rec = record(ids)
                for _, _, v in read(rec):
                    consume(v)
            r["time"] = summary(times(run, repeats))
            r["memory"] = peak_memory(run)
        except Exception as e:  # noqa: BLE001
            res["errors"][name] = f"{type(e).__name__}: {e}"
            res["tools"].pop(name)
            traceback.print_exc()
    plain = plain_forwards(t)
    res["plain forward time"] = summary(times(lambda: t.ours(ids), repeats))
    res["plain forward memory"] = {}
    for name, fn in plain.items():
        if name in res["tools"]:
            fn(ids)  # warm-up
            res["plain forward memory"][name] = peak_memory(lambda fn=fn: fn(ids))
    return res


# ---------------------------------------------------------------------------------------------- 2. patching
def patching_inputs(t: Tools):
    torch.manual_seed(2)
    clean = torch.randint(2, t.cfg.vocab_size, (1, PATCH_POSITIONS))
    corrupt = clean.clone()
    corrupt[0, ::3] = torch.randint(2, t.cfg.vocab_size, (len(range(0, PATCH_POSITIONS, 3)),))
    with torch.no_grad():
        a = int(t.ours(clean).logits[0, -1].argmax())
        top = t.ours(corrupt).logits[0, -1].topk(2).indices.tolist()
    b = top[0] if top[0] != a else top[1]
    return clean, corrupt, a, b


@torch.no_grad()
def patching(t: Tools, repeats: int, slow_repeats: int) -> dict:
    clean, corrupt, a, b = patching_inputs(t)
    L, S = t.L, PATCH_POSITIONS

    def metric(logits):  # the logit difference at the last position, one row
        return logits[0, -1, a] - logits[0, -1, b]

    sweeps = {}

    def ours():
        return patch(t.ours, clean, corrupt, metric, site="resid_pre", progress=False).scores
    sweeps["olmo-lab (batched, from layer l and position p on)"] = (ours, repeats)

    def ours_last():
        return patch(t.ours, clean, corrupt, metric, site="resid_pre", progress=False, metric_positions=[-1]).scores
    sweeps[OURS_LAST] = (ours_last, repeats)

    if t.bridge is not None:
        def tl():
            from transformer_lens.patching import get_act_patch_resid_pre
            names = [f"blocks.{i}.hook_resid_pre" for i in range(L)]
            _, cache = t.bridge.run_with_cache(clean, names_filter=names)
            return get_act_patch_resid_pre(t.bridge, corrupt, cache, metric)
        sweeps["TransformerLens get_act_patch_resid_pre (one call)"] = (tl, slow_repeats)

    if t.lm is not None:
        lm = t.lm

        def nn():
            import nnsight
            with lm.trace(clean):
                pre = nnsight.save([lm.model.layers[i].input.save() for i in range(L)])  # each block's input
            grid = torch.zeros(L, S)
            for layer in range(L):
                for p in range(S):
                    with lm.trace(corrupt):
                        lm.model.layers[layer].input[:, p] = pre[layer][:, p]
                        value = metric(lm.output.logits).save()
                    grid[layer, p] = value
            return grid
        sweeps["nnsight loop of traces"] = (nn, slow_repeats)

    def batched(last=0):
        hf = t.hf
        clean_pre = {}

        def keep(i):
            def hook(module, args, kwargs):
                clean_pre[i] = (args[0] if args else kwargs["hidden_states"]).clone()
            return hook
        handles = [hf.model.layers[i].register_forward_pre_hook(keep(i), with_kwargs=True) for i in range(L)]
        try:
            hf(clean)
        finally:
            for h in handles:
                h.remove()
        rows = torch.arange(S)
        grid = torch.zeros(L, S)
        for layer in range(L):
            def swap(module, args, kwargs, layer=layer):  # row r: position r patched with the clean run's
                if args:
                    x = args[0].clone()
                    x[rows, rows] = clean_pre[layer][0, rows]
                    return (x, *args[1:]), kwargs
                x = kwargs["hidden_states"].clone()
                x[rows, rows] = clean_pre[layer][0, rows]
                return args, {**kwargs, "hidden_states": x}
            h = hf.model.layers[layer].register_forward_pre_hook(swap, with_kwargs=True)
            try:
                logits = hf(corrupt.expand(S, -1), logits_to_keep=last).logits
            finally:
                h.remove()
            grid[layer] = logits[:, -1, a] - logits[:, -1, b]
        return grid
    sweeps["transformers forward hooks, batched (24 rows per forward)"] = (batched, repeats)
    sweeps[PEER_LAST] = (lambda: batched(last=1), repeats)

    res = {"layers": L, "positions": S, "sweeps": {}, "errors": {}}
    grids = {}
    for name, (fn, n) in sweeps.items():
        try:
            ts = []
            for _ in range(n):
                start = time.perf_counter()
                grids[name] = fn().float().cpu()
                ts.append(time.perf_counter() - start)
            res["sweeps"][name] = {"time": summary(ts)}
        except Exception as e:  # noqa: BLE001
            res["errors"][name] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
    ours_grid = grids.get(next(iter(sweeps)))
    for name, grid in grids.items():
        res["sweeps"][name]["max abs diff"] = float((grid - ours_grid).abs().max())
    res["grid scale"] = float(ours_grid.abs().max()) if ours_grid is not None else float("nan")
    res["metric spread"] = float(ours_grid.max() - ours_grid.min()) if ours_grid is not None else float("nan")
    return res


# ---------------------------------------------------------------------------------------------- 3. idle hooks
def idle_checks(model) -> int:
    """How many `_hooks is None` checks (plus the model's one `hooks.active`) an idle forward makes."""
    per_layer = 1 + 3  # Block.forward once, Attention.forward three times
    if model.config.is_moe:
        per_layer += 2 + model.config.num_experts  # router logits, routing, and each expert that runs
    return 1 + model.config.num_hidden_layers * per_layer


@torch.no_grad()
def idle(path: str, repeats: int) -> dict:
    """Forward time (IDLE_LENGTH tokens, last logits) of a model whose hooks were never touched, against a
    second copy of it after traces and interventions were entered and left, inside idle intervention blocks,
    and with a read-only hook on every block's output. All variants are timed round-robin in a shuffled order
    (so drift in the machine's load hits them alike), fastest of the repeats."""
    pristine = olmo_lab.load_model(path, dtype=torch.float32).eval()  # never traced, never intervened on
    model = olmo_lab.load_model(path, dtype=torch.float32).eval()
    L = model.config.num_hidden_layers
    torch.manual_seed(3)
    ids = torch.randint(2, model.config.vocab_size, (1, IDLE_LENGTH))

    def forward():
        model(ids, logits_to_keep=1)

    with olmo_lab.trace(model, attention=True, routing=True, residual=True):  # enter and leave once
        forward()
    with intervene(model, {f"model.layers.{L // 2}.hook_resid_pre": Zero(positions=[0])}):
        forward()
    assert not model.hooks.active and all(owner._hooks is None for owner, _, _ in model.hooks.points.values())

    def inside(edits):
        def run():
            with intervene(model, edits):
                forward()
        return run

    def read_hooks():
        handles = [model.hooks.add(f"model.layers.{i}.hook_resid_post", lambda v, ctx: None) for i in range(L)]
        try:
            forward()
        finally:
            for h in handles:
                h.remove()

    variants = {
        "never touched": lambda: pristine(ids, logits_to_keep=1),
        "after traces and interventions were entered and left": forward,
        "inside intervene(model, {})": inside({}),
        f"inside an idle edit: Zero(positions=[{2 * IDLE_LENGTH - 1}]) at layer {L // 2}'s hook_resid_pre":
            inside({f"model.layers.{L // 2}.hook_resid_pre": Zero(positions=[2 * IDLE_LENGTH - 1])}),
        "a read-only hook (returns None) on every block's hook_resid_post": read_hooks,
    }
    measured = {k: [] for k in variants}
    for fn in variants.values():
        fn()  # warm-up
    order, rng = list(variants), random.Random(0)
    for _ in range(repeats):
        rng.shuffle(order)  # a new order each round: no variant always runs first (cold caches) or last
        for k in order:
            start = time.perf_counter()
            variants[k]()
            measured[k].append(time.perf_counter() - start)
    untouched = measured.pop("never touched")
    base = min(untouched)
    res = {"never touched": summary(untouched), "variants": {}}
    for k, ts in measured.items():
        res["variants"][k] = {**summary(ts), "overhead": min(ts) / base - 1}
    # What the idle checks cost, timed on their own: a generous upper bound on the hook points' share.
    block = model.model.layers[0]
    per_check = min(timeit.repeat(lambda: block._hooks is None, number=200_000, repeat=5)) / 200_000
    n = idle_checks(model)
    res["idle checks"] = {"count": n, "seconds each": per_check, "share of a forward": n * per_check / base}
    return res


# ---------------------------------------------------------------------------------------------- report
def load_average() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def versions() -> dict:
    out = {"torch": torch.__version__}
    for pkg in ("transformers", "transformer-lens", "nnsight"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except Exception:  # noqa: BLE001
        return platform.processor() or "unknown CPU"


def met(ok: bool) -> str:
    return "yes" if ok else "**no**"


def report(results: dict) -> str:
    quick = results["quick"]
    v = results["versions"]
    lines = [f"# Interventions benchmark{' (quick)' if quick else ''} (issue 18)", "",
             f"- date: {results['started']} to {results['finished']} (UTC); machine: {results['machine']}",
             f"- torch {v['torch']} ({results['threads']} threads, fp32, CPU); transformers {v['transformers']}; "
             f"TransformerLens {v['transformer-lens']}; nnsight {v['nnsight']}",
             f"- load average (1, 5, 15 min) before: {results['load before']}; after: {results['load after']} "
             f"on {os.cpu_count()} CPUs" + (" -- **the machine was loaded by other work during this run**; times are "
                                             "the fastest of the repeats and ratios are between tools measured "
                                             "minutes apart" if results["loaded"] else ""),
             f"- command: `{results['command']}`",
             "- one process, same checkpoints for every tool (random weights, N(0, 0.02), written by "
             "`benchmarks/run.py`'s `make_checkpoint`); every value checked against olmo-lab's (max abs diff)",
             "- time: fastest of the repeats (median in brackets); memory: peak RSS during the call minus RSS "
             "before it (VmHWM reset through /proc/self/clear_refs; glibc's mmap threshold pinned at 128 KiB and "
             "`malloc_trim` before each probe, so every tensor freed is returned and counted once, for every tool "
             "alike; the call's full logits are included for every tool)", ""]
    for model, r in results["models"].items():
        lines += [f"## {model} ({r['parameters'] / 1e6:.1f}M parameters, {r['layers']} layers)", ""]
        for part, table in (("recording", recording_table), ("patching", patching_table), ("idle", idle_table)):
            if part not in r:
                lines += [f"### {part}: not measured (yet)", ""]
            elif "failed" in r[part]:
                lines += [f"### {part}: failed: {r[part]['failed']}", ""]
            else:
                lines += table(r[part])
    lines += ["## Targets", ""]
    if quick:
        lines += ["Not judged: a quick run uses smaller models than the targets are set for.", ""]
    else:
        lines += ["| model | target | measured | met |", "|---|---|---|---|"] + results["judged"] + [""]
    lines += ["## Notes", ""] + [f"- {n}" for n in results["notes"]] + [""]
    return "\n".join(lines)


def _t(s: dict) -> str:
    return f"{s['min']:.3f} s ({s['median']:.3f})"


def recording_table(rec: dict) -> list[str]:
    tools, ours = rec["tools"], rec["tools"].get("olmo-lab")
    what = "attention patterns of every layer + residual stream after every block" + \
        (" + routing" if "router_logits" in (ours or {}).get("max abs diff", {}) else "")
    lines = [f"### 1. Recording {what}, {PROMPT}-token prompt, every value read back once", "",
             "| tool | time | extra memory (peak) | its plain forward's peak | ours / theirs: time | "
             "ours / theirs: memory | max abs diff vs olmo-lab |", "|---|---|---|---|---|---|---|"]
    for name, r in tools.items():
        diff = ", ".join(f"{k} {d:.1e}" if k != "topk_indices" else f"tokens routed differently {d:.0f}"
                         for k, d in r["max abs diff"].items())
        ratio_t = ratio_m = ""
        if name != "olmo-lab" and ours:
            ratio_t = f"{ours['time']['min'] / r['time']['min']:.2f}x"
            ratio_m = f"{ours['memory'] / r['memory']:.2f}x"
        plain = rec["plain forward memory"].get(name)
        lines.append(f"| {name} | {_t(r['time'])} | {r['memory'] / MiB:.0f} MiB | "
                     f"{plain / MiB:.0f} MiB | {ratio_t} | {ratio_m} | {diff} |" if plain is not None else
                     f"| {name} | {_t(r['time'])} | {r['memory'] / MiB:.0f} MiB | | {ratio_t} | {ratio_m} | {diff} |")
    if ours:
        p = rec["plain forward time"]
        lines.append(f"| olmo-lab plain forward (nothing recorded) | {_t(p)} | "
                     f"{rec['plain forward memory']['olmo-lab'] / MiB:.0f} MiB | | "
                     f"traced / plain: {ours['time']['min'] / p['min']:.2f}x | | |")
    for name, err in rec["errors"].items():
        lines.append(f"| {name} | failed: {err} | | | | | |")
    return lines + [""]


def patching_table(p: dict) -> list[str]:
    lines = [f"### 2. Residual-stream activation patching, {p['layers']} layers x {p['positions']} positions, "
             "logit difference at the last position", "",
             "| tool | time | olmo-lab faster by | max abs diff vs olmo-lab's grid |", "|---|---|---|---|"]
    sweeps = p["sweeps"]
    ours = next(iter(sweeps.values()), None)
    for name, s in sweeps.items():
        faster = f"{s['time']['min'] / ours['time']['min']:.2f}x" if s is not ours else ""
        lines.append(f"| {name} | {_t(s['time'])} ({s['time']['repeats']} run{'s' if s['time']['repeats'] > 1 else ''})"
                     f" | {faster} | {s['max abs diff']:.1e} |")
    for name, err in p["errors"].items():
        lines.append(f"| {name} | failed: {err} | | |")
    lines += ["", f"Grid scale: max |metric| {p['grid scale']:.3g}, spread (max - min) {p['metric spread']:.3g}.", ""]
    return lines


def idle_table(r: dict) -> list[str]:
    base = r["never touched"]
    lines = [f"### 3. Hook points with nothing attached; idle interventions ({IDLE_LENGTH}-token forward, last "
             "logits only)", "", "| forward | time | vs never touched |", "|---|---|---|",
             f"| model whose hook points were never touched | {_t(base)} | |"]
    for k, s in r["variants"].items():
        lines.append(f"| {k} | {_t(s)} | {s['overhead']:+.1%} |")
    c = r["idle checks"]
    lines += ["", f"The idle hook points themselves: {c['count']} `is None` checks per forward at "
                  f"{c['seconds each'] * 1e9:.0f} ns each (timed alone) = {c['share of a forward']:.4%} of the "
                  "never-touched forward: far below what timing two forwards can resolve.", ""]
    return lines


def judge(results: dict) -> list[str]:
    rows = []
    for model, full in results["models"].items():
        r = {part: full.get(part, {}) for part in ("recording", "patching", "idle")}
        r = {part: v if "failed" not in v else {} for part, v in r.items()}
        rec = {"tools": {}, **r["recording"]}
        ours = rec["tools"].get("olmo-lab")
        peers = [n for n in rec["tools"] if n != "olmo-lab"]
        if ours:
            for n in peers:
                if n in ("TransformerLens", "nnsight"):
                    m = ours["memory"] / rec["tools"][n]["memory"]
                    rows.append(f"| {model} | recording: extra memory <= 0.6x {n}'s | {m:.2f}x | "
                                f"{met(m <= TARGETS['memory vs peer'])} |")
            for n in peers:
                if n in ("TransformerLens", "nnsight"):
                    s = rec["tools"][n]["time"]["min"] / ours["time"]["min"]
                    rows.append(f"| {model} | recording: >= 1.2x faster than {n} | {s:.2f}x | {met(s >= 1.2)} |")
            x = ours["time"]["min"] / rec["plain forward time"]["min"]
            rows.append(f"| {model} | recording: within 1.1x of a plain forward | {x:.2f}x | "
                        f"{met(x <= TARGETS['time vs plain forward'])} |")
            worst = max((d for n in peers for k, d in rec["tools"][n]["max abs diff"].items() if k != "topk_indices"),
                        default=0.0)
            rows.append(f"| {model} | recording: all tools equal (fp32, <= {EQUAL:g}) | {worst:.1e} | "
                        f"{met(worst <= EQUAL)} |")
        p = r["patching"].get("sweeps", {})
        names = list(p)
        if names:
            ours = [n for n in names if n.startswith("olmo-lab")]
            peers = {n: s["time"]["min"] for n, s in p.items() if n not in ours}
            # like for like: every logit against the peers computing every logit, the last position's against
            # the peer that also computes only those
            for mine, theirs, what in ((names[0], [n for n in peers if n != PEER_LAST], "every position's logits"),
                                       (OURS_LAST, [PEER_LAST], "the last position's logits only")):
                theirs = [n for n in theirs if n in peers]
                if mine in p and theirs:
                    fastest = min(theirs, key=peers.get)
                    x = peers[fastest] / p[mine]["time"]["min"]
                    rows.append(f"| {model} | patching, {what}: >= 2.5x faster than the fastest peer ({fastest}) | "
                                f"{x:.2f}x | {met(x >= TARGETS['patching'])} |")
            worst = max((s["max abs diff"] for n, s in p.items() if n != names[0]), default=0.0)
            rows.append(f"| {model} | patching: grids equal (<= {EQUAL:g}) | {worst:.1e} | {met(worst <= EQUAL)} |")
        idle_r = r["idle"]
        for k, s in idle_r.get("variants", {}).items():
            if k.startswith("after traces"):
                rows.append(f"| {model} | idle hook points: cost at most 1% (measured: after traces, vs never "
                            f"touched; negative = faster) | {s['overhead']:+.1%} | "
                            f"{met(s['overhead'] <= TARGETS['idle hook points'])} |")
            elif k.startswith("inside"):
                rows.append(f"| {model} | idle intervention context within 2%: {k} | {s['overhead']:+.1%} | "
                            f"{met(s['overhead'] <= TARGETS['idle intervention'])} |")
    return rows


def notes(results: dict) -> list[str]:
    out = [
        "Recording, olmo-lab: `olmo_lab.trace(model, attention=True, routing=True, "
        "hooks=model.hook_points(\"hook_resid_post\"))`; the trace keeps each layer's post-RoPE queries and keys "
        "and computes a layer's pattern when `tr.attention[layer]` is read (one layer at a time here), so its "
        "memory is the recorded q/k and residual stream plus one layer's pattern, not every pattern at once. "
        "Routing is read as `tr.routing` (logits, top-k indices and weights).",
        "Recording, TransformerLens 4: `TransformerBridge.boot_transformers(checkpoint)` (the `olmo3` and "
        "`flex_olmo` adapters, eager attention forced by the adapter) and `run_with_cache(ids, names_filter="
        "[blocks.{i}.attn.hook_pattern, blocks.{i}.hook_resid_post, blocks.{i}.mlp.gate.hook_out])`. The bridge "
        "exposes the router's logits (`mlp.gate.hook_out`) but no hook for the top-k decision.",
        "Recording, nnsight: `TransformersModel(AutoModelForCausalLM.from_pretrained(ckpt, "
        "attn_implementation=\"eager\"))` (`LanguageModel` is deprecated in nnsight 0.8 and warns), one `trace` "
        "saving `layers[i].self_attn.output[1]` (eager attention returns its weights there, no "
        "`output_attentions` needed), `layers[i].mlp.gate.output` (logits, weights, indices) and "
        "`layers[i].output`, in forward order.",
        "Recording, transformers: `model(ids, output_attentions=True, output_hidden_states=True, "
        "output_router_logits=...)` with eager attention and `config.tie_last_hidden_states = False` (otherwise "
        "`hidden_states[-1]` is the final norm's output, not the last block's).",
        "A stand-in word-level tokenizer is saved next to the checkpoints because the bridge and nnsight insist on "
        "one; every call here passes token ids.",
        "Patching: `olmo_lab.patching.patch(model, clean, corrupt, metric, site=\"resid_pre\")` (batched; a patch "
        "at layer l, position p starts at layer l from the corrupted run's cached residual stream and computes only "
        "positions p.. against the corrupted run's cached keys and values); TransformerLens: "
        "`transformer_lens.patching.get_act_patch_resid_pre(bridge, corrupt, clean_cache, metric)` runs on the "
        "bridge unchanged (one full forward per cell); nnsight: one `trace` per cell setting "
        "`layers[l].input[:, p]` to the clean run's; transformers: a forward pre-hook on `model.layers[l]` that "
        "patches position r in row r, one 24-row forward per layer. Each time includes that tool's clean run "
        "(and olmo-lab's corrupted run). The two one-at-a-time peers are timed once (they take the longest); the "
        "others take the fastest of their repeats. Clean and corrupted prompts differ at every third position; "
        "the metric is logit(a) - logit(b) at the last position, a = the clean run's top token, b = the "
        "corrupted run's.",
        "Idle hook points: the cost of the `is None` checks cannot be separated from a forward by timing (a build "
        "without them is not this code), so the table compares a never-touched model with a second copy loaded from "
        "the same checkpoint after traces and interventions were entered and left on it (every point's `_hooks` back to None: checked), and "
        "times the checks on their own for an upper bound. The idle intervention rows attach an edit that selects "
        "no position, so every forward takes the hooked path (the hook runs and returns None).",
    ]
    return out + results.get("extra notes", [])


# ---------------------------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small models, few repeats (smoke test); writes nothing "
                                                         "unless --out is given")
    ap.add_argument("--out", default=None, help="markdown file to write (default: benchmarks/INTERVENTIONS.md for a "
                                                "full run)")
    ap.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--parts", nargs="*", default=["recording", "patching", "idle"],
                    choices=["recording", "patching", "idle"])
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    _libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024)  # fixed: every large tensor is mmapped and returned when freed
    quick = args.quick
    repeats = 2 if quick else 3
    patch_repeats = 2
    idle_repeats = 5 if quick else 12
    results = {"quick": quick, "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
               "machine": f"{cpu_name()}, {os.cpu_count()} CPUs, {platform.platform()}",
               "threads": torch.get_num_threads(), "versions": versions(), "load before": load_average(),
               "command": " ".join(["python", "benchmarks/interventions.py", *(argv if argv is not None else
                                                                                sys.argv[1:])]),
               "models": {}, "extra notes": []}
    overrides = QUICK if quick else {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            print(f"== {name}", flush=True)
            path = make_checkpoint(name, overrides, tmp)
            tools = Tools(path, tmp)
            r = results["models"][name] = {"parameters": tools.ours.num_parameters(), "layers": tools.L}
            if tools.L != 12:
                results["extra notes"].append(f"{name} has {tools.L} layers, so its patching sweep is {tools.L} "
                                              f"layers x {PATCH_POSITIONS} positions (the issue's 12 x 24 is the "
                                              "OLMo 3's).")
            for part, fn in (("recording", lambda: recording(tools, repeats)),
                             ("patching", lambda: patching(tools, patch_repeats, 1)),
                             ("idle", lambda: idle(path, idle_repeats))):
                if part not in args.parts:
                    continue
                if part == "idle":
                    del tools.ours, tools.hf, tools.bridge, tools.lm
                    gc.collect()
                t0 = time.perf_counter()
                try:
                    r[part] = fn()
                except Exception as e:  # noqa: BLE001 - reported, and the run goes on
                    traceback.print_exc()
                    r[part] = {"failed": f"{type(e).__name__}: {e}"}
                print(f"   {part} done ({time.perf_counter() - t0:.0f} s)", flush=True)
                write(results, args.out, partial=True)
    print(write(results, args.out, partial=False))
    return results


def write(results: dict, out: str | None, partial: bool) -> str:
    """Render (and, for a full run or with --out, write) the report; called after every part as well, so a run
    cut short still leaves what it measured."""
    results["load after"] = load_average()
    results["finished"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M") + \
        (" (partial: still running)" if partial else "")
    loads = [float(x) for x in results["load before"].split()[:1] + results["load after"].split()[:1]]
    results["loaded"] = max(loads) > 0.75 * (os.cpu_count() or 1)
    results["judged"] = judge(results)
    results["notes"] = notes(results)
    text = report(results)
    out = out or (None if results["quick"] else os.path.join(HERE, "INTERVENTIONS.md"))
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")
    return text


if __name__ == "__main__":
    main()
