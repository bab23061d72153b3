# %% [markdown]
# # 05 · Build your own FlexOlmo
#
# The FlexOlmo recipe end to end, at notebook scale (Shi et al. 2025, arXiv:2507.07024):
#
# 1. a **public anchor**: a dense model trained on public data (the shipped `olmo3-lab`);
# 2. each data owner **upcycles** it into a 2-expert MoE `[public (frozen), own]`, initialises its
#    router row from a **domain embedding**, and trains **only on its own data**, never seeing anyone
#    else's;
# 3. the owners' experts are **merged** into one MoE with **no joint training**;
# 4. any owner can **opt out** at inference, exactly.
#
# Two small domains that install with nothing: Python source code (the standard library that ships
# with Python) and synthetic arithmetic. Each expert trains for about a minute on 2 CPU cores.
# At the end: the results table of the shipped `flexolmo-lab`, built by the same code at full size.

# %%
import os
import random
import sysconfig
from collections import Counter
from pathlib import Path

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

import olmo_lab
from olmo_lab import flexolmo, lens
from olmo_lab.train import TokenStream, TrainConfig, bits_per_byte, token_byte_lengths

torch.manual_seed(0)
torch.set_num_threads(2)
path = olmo_lab.lab_model("olmo3-lab")
public = olmo_lab.load_model(path)
tok = olmo_lab.load_tokenizer(path)
print("public anchor:", public.config.model_type, f"{public.num_parameters():,} parameters")

# %% [markdown]
# ## Two closed domains
# - **code**: a fixed list of modules from the Python standard library (PSF licence);
# - **arith**: lines like `417 + 385 = 802`, generated from a seed.
#
# Each gets a training stream and a held-out split. The public domain's held-out text is the
# shipped evaluation sample.

# %%
stdlib = Path(sysconfig.get_paths()["stdlib"])
modules = ["json/decoder.py", "json/encoder.py", "csv.py", "textwrap.py", "string.py", "fractions.py",
           "heapq.py", "bisect.py", "calendar.py", "shlex.py", "glob.py", "fnmatch.py", "colorsys.py", "queue.py"]
code_text = [(stdlib / m).read_text(encoding="utf-8") for m in modules]

rng = random.Random(0)
def arith_line():
    a, b = rng.randrange(1000), rng.randrange(1000)
    op = rng.choice("+-")
    return f"{a} {op} {b} = {a + b if op == '+' else a - b}"
arith_text = ["\n".join(arith_line() for _ in range(40)) for _ in range(300)]

domains = {"code": (code_text[:-2], code_text[-2:]), "arith": (arith_text[:-20], arith_text[-20:])}
public_heldout = olmo_lab.lab.samples()["public"]["texts"]
streams = {name: TokenStream.from_texts(tok, train) for name, (train, _) in domains.items()}
heldout = {"public": TokenStream.from_texts(tok, public_heldout)}
heldout.update({name: TokenStream.from_texts(tok, test) for name, (_, test) in domains.items()})
for name, s in streams.items():
    print(f"{name}: {len(s):,} training tokens")

# %% [markdown]
# ## Router rows from domain embeddings
# The router scores a token by `h · r_i`, where `h` is the residual stream entering the feed-forward.
# The paper initialises `r_i` with the average document embedding of domain i from an external
# embedder (GritLM-7B). Here the embedder is the public model itself: a domain's embedding at layer
# l is the mean of `h` over its text, `μ_i`, which each owner measures alone on its own data. With the
# public text's covariance `S` (public, so shared by everyone), the rows `S⁻¹μ_i` (plus a constant)
# make the router a **Gaussian classifier**: softmax of the logits is P(domain | h). A negative bias on
# closed experts (the paper's `b_i`) makes them earn their tokens.

# %%
stats = flexolmo.residual_stats(public, heldout["public"].windows(64, 8))
own_means = {name: flexolmo.residual_stats(public, streams[name].windows(64, 16)).mean for name in domains}
rows = flexolmo.gaussian_router_rows(stats, [own_means["code"], own_means["arith"]], closed_bias=-2.0)  # (L, 3, H)
probe = {name: heldout[name].windows(64, 4) for name in ["public", "code", "arith"]}
layer = 1
print(f"top-1 class of each token at layer {layer}, before any training, as shares of [public, code, arith]:")
for name, w in probe.items():
    with olmo_lab.trace(public, attention=False, residual=True) as tr:
        public(w)
    h = tr.block(layer, "resid_mid").float()  # (B, S, H)
    top = (h @ rows[layer].T).argmax(-1).flatten()  # (B*S,)
    print(f"  {name:>6} text: {[round(x, 2) for x in (torch.bincount(top, minlength=3) / top.numel()).tolist()]}")

# %% [markdown]
# ## Each owner trains alone
# Embeddings, attention, norms, the LM head, the public expert and the router are frozen; only the
# owner's expert learns, from the owner's data only. Each owner computes its own row alone: it equals
# that owner's row in the joint `rows` above. (The shipped `flexolmo-lab` trains in rounds and, between
# them, each owner re-measures `μ_i` on its own 2-expert model, where its tokens are once its expert has
# run in the layers below: `lab.rebuild.expert_model`.)

# %%
config = TrainConfig(steps=60, lr=2e-3, warmup=10, weight_decay=0.0, batch_size=8, seq_len=64, progress=False)
owners = {}
for name in domains:
    own_rows = flexolmo.gaussian_router_rows(stats, [own_means[name]], closed_bias=-2.0)  # (L, 2, H)
    owner = flexolmo.upcycle(public, name, own_rows, train_router=False)
    result = flexolmo.train_expert(owner, streams[name], config)
    owners[name] = owner
    print(f"{name}: training loss {result.train_loss[0]:.2f} -> {sum(result.train_loss[-10:]) / 10:.2f} nats/token")

# %% [markdown]
# ## Merge, without joint training
# `merge` stacks the router rows and experts and checks that every owner's shared weights, public
# expert and public router row are bit-identical to the anchor's: the coordination constraint.

# %%
flex = flexolmo.merge(public, [owners["code"], owners["arith"]], ["code", "arith"])
print(flex.experts.names, f"top-{flex.config.num_experts_per_tok}", f"{flex.num_parameters():,} parameters")
shared = flexolmo.shared_state(public)
print("shared weights identical in every owner:",
      all(torch.equal(shared[k], flexolmo.shared_state(o)[k]) for o in owners.values() for k in shared))

# %% [markdown]
# ## Does it work? Held-out bits per byte
# Lower is better. The merged model should approach each owner's model on that owner's domain and
# beat the public model there (here it does on arith, not on code: the next section shows why); opting
# a domain out should bring its loss back up.

# %%
byte_lengths = token_byte_lengths(tok)
windows = {name: s.windows(64, 16) for name, s in heldout.items()}


def row(model):
    return {name: bits_per_byte(model, w, byte_lengths) for name, w in windows.items()}


table = {"public (dense)": row(public)}
table.update({f"owner {n} alone": row(o) for n, o in owners.items()})
table["merged FlexOlmo"] = row(flex)
for name in domains:
    with olmo_lab.experts_off(flex, [name]):
        table[f"merged, {name} opted out"] = row(flex)
print(f"{'':<30}" + "".join(f"{d:>11}" for d in windows))
for label, values in table.items():
    print(f"{label:<30}" + "".join(f"{v:11.3f}" for v in values.values()))

# README figure
fig, ax = plt.subplots(figsize=(8, 3))
width = 0.8 / len(table)
for i, (label, values) in enumerate(table.items()):
    ax.bar([d + i * width for d in range(len(windows))], list(values.values()), width, label=label)
ax.set_xticks([d + 0.4 - width / 2 for d in range(len(windows))], list(windows))
ax.set_ylabel("held-out bits per byte"); ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
ax.set_title("independently trained experts, merged without joint training; opting one out")
plt.tight_layout(); plt.show()

# %% [markdown]
# ## Where the merge loses: the tokens another expert takes
# On arith the merge comes close to its owner's model. On code it does worse than even the public model,
# although the code owner's own model beats it: opting `arith` out gives back exactly the code owner's
# model, so the loss comes from the arith expert taking part in code tokens. Which ones? Below, per layer,
# the share of held-out code tokens whose top-1 expert is arith, the share of the merge's extra loss (over
# the code owner's model) on the tokens arith tops in layer 1, and the commonest such tokens. The measured
# code windows are the first ~1,000 tokens of the held-out `colorsys.py`, full of float constants
# (`y = 0.30*r + 0.59*g + 0.11*b`): arith claims their digits, points and spaces, and predicts what
# follows a digit in a sum, not in Python. The full-size build measures the same effect for every
# domain (`lab/RESULTS.md`: "the tokens other experts take").

# %%
targets = windows["code"][:, 1:].flatten()  # (B*S,) the next token at every position
with torch.no_grad():
    with olmo_lab.trace(flex, attention=False, routing=True, tokenizer=tok) as tr:
        merged_nll = F.cross_entropy(flex(windows["code"][:, :-1]).logits.flatten(0, 1), targets, reduction="none")
    owner_nll = F.cross_entropy(owners["code"](windows["code"][:, :-1]).logits.flatten(0, 1), targets,
                                reduction="none")
arith = flex.experts.names.index("arith")
print("code tokens whose top-1 expert is arith, per layer:",
      [round((tr.routing[l].topk_indices[:, 0] == arith).float().mean().item(), 2) for l in sorted(tr.routing)])
taken = tr.routing[1].topk_indices[:, 0] == arith  # (B*S,)
extra = merged_nll - owner_nll
print(f"share of the merge's extra loss on the tokens arith tops in layer 1: {extra[taken].sum() / extra.sum():.2f}")
common = Counter(tr.routing[1].tokens[i] for i in taken.nonzero().flatten().tolist()).most_common(12)
print("commonest:", ", ".join(f"{t!r} {n}" for t, n in common))

# %% [markdown]
# ## Routing
# With top-k = all, every token uses every expert; the router only mixes. To see which expert the
# router *prefers*, merge the same owners with top-1 (still no training) and count each domain's
# tokens per expert, averaged over layers.

# %%
flex_top1 = flexolmo.merge(public, [owners["code"], owners["arith"]], ["code", "arith"], top_k=1)
usage = lens.expert_usage(flex_top1, tok, {"public": public_heldout, "code": domains["code"][1],
                                      "arith": domains["arith"][1][:4]})  # each cut to the 128-token context
print(lens.usage_table(usage, flex_top1.experts.names))

# %% [markdown]
# ## Opt-out is exact
# Opting out `arith` gives the same logits as a merge that never included it.

# %%
never = flexolmo.merge(public, [owners["code"]], ["code"])
ids = windows["code"][:2]
with torch.no_grad(), olmo_lab.experts_off(flex, ["arith"]):
    diff = (flex(ids).logits - never(ids).logits).abs().max().item()
print(f"max |logit difference|: {diff} (identical: {diff == 0})")

# %% [markdown]
# ## The shipped `flexolmo-lab`: the full results table
# Built by `make lab-models` with the same functions at full size (public anchor + four closed
# domains), and evaluated against the FlexOlmo paper's claims.

# %%
print(olmo_lab.lab.results_markdown())
