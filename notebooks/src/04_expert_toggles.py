# %% [markdown]
# # 04 · Switching experts off
#
# FlexOlmo's promise to data owners is **opt-out**: a domain expert can be removed at inference and
# the model then behaves exactly as if it had never been trained with that data. This notebook makes
# that tangible on the shipped `flexolmo-lab` model (or `OLMO_LAB_MOE_MODEL`):
# the expert switchboard, the effect of each opt-out on text, on the next-token distribution and on
# each domain's loss, opt-out versus dropping an expert after routing, and the exactness of opt-out.

# %%
import math
import os

import matplotlib.pyplot as plt
import torch

import olmo_lab
from olmo_lab import plots
from olmo_lab.widgets import ExpertSwitchboard

torch.manual_seed(0)
path = os.environ.get("OLMO_LAB_MOE_MODEL") or olmo_lab.lab_model("flexolmo-lab")
model = olmo_lab.load_model(path)
tok = olmo_lab.load_tokenizer(path)
names = model.experts.names
samples = {domain: entry["texts"] for domain, entry in olmo_lab.lab.samples().items()}
print("experts:", names)

# %% [markdown]
# ## The switchboard
# Tick experts off and on; the view compares the greedy continuation and the next-token distribution
# with the all-experts model, and shows the routing. Here it is driven from code: each change prints
# a short summary (in JupyterLab, click the checkboxes).

# %%
board = ExpertSwitchboard(model, tok, prompt=samples["code"][1][:80], max_new_tokens=24)
board

# %%
board.button.click()

# %%
board.checkboxes["code"].value = False

# %%
for name in names:  # everything off is refused with a message, and the board keeps working
    board.checkboxes[name].value = False
for name in names:
    board.checkboxes[name].value = True

# %% [markdown]
# ## What each opt-out does to text
# For a prompt from each closed domain: the greedy continuation with every expert on, and with the
# domain's own expert opted out.

# %%
closed = [n for n in names if n != "public"]
for domain in closed:
    prompt = samples[domain][0][:70]
    full = olmo_lab.generate(model, tok, prompt, max_new_tokens=25)
    with olmo_lab.experts_off(model, [domain]):
        without = olmo_lab.generate(model, tok, prompt, max_new_tokens=25)
    print(f"[{domain}] {prompt!r}\n   all experts : {full!r}\n   {domain} off: {without!r}\n")

# %% [markdown]
# ## The next-token distribution
# A math prompt in set.mm's formal notation (the math expert's domain; the samples above start with the
# English comments), with and without the math expert: the top candidates and the KL divergence.

# %%
# README figure
prompt = "|- ( ( A e. RR /\\ B e. RR ) -> ( A +"
ids = torch.tensor([tok.encode(prompt)])
with torch.no_grad():
    before = model(ids).logits[0, -1].float().softmax(-1)
    with olmo_lab.experts_off(model, ["math"]):
        after = model(ids).logits[0, -1].float().softmax(-1)
labels = tok.token_strings(list(range(len(before))))
fig = plots.next_token_comparison(before, after, labels, top=10, names=("all experts", "math off"))
plt.show()
print(plots.distribution_summary(before, after, labels))

# %% [markdown]
# ## Per-domain loss with each expert opted out
# Bits per byte on the shipped evaluation samples (lower is better). Opting a domain out should hurt
# that domain and leave the others nearly unchanged.

# %%
@torch.no_grad()
def bits_per_byte(model, texts):
    nats, nbytes = 0.0, 0
    for text in texts:
        ids = torch.tensor([tok.encode(text)])
        logits = model(ids).logits[0, :-1].float()
        nats += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        nbytes += len(text[len(tok.decode(ids[0, :1].tolist())):].encode("utf-8"))
    return nats / math.log(2) / nbytes


def loss_row(mode=None, off=None):
    if off is None:
        return {d: bits_per_byte(model, t) for d, t in samples.items()}
    with olmo_lab.experts_off(model, [off], mode=mode):
        return {d: bits_per_byte(model, t) for d, t in samples.items()}


rows = {"all experts": loss_row()}
for name in closed:
    rows[f"{name} opted out"] = loss_row("opt_out", name)
print(f"{'bits per byte':<22}" + "".join(f"{d:>11}" for d in samples))
for label, row in rows.items():
    print(f"{label:<22}" + "".join(f"{v:11.3f}" for v in row.values()))

# %% [markdown]
# ## Opt-out versus dropping after routing
# *Opt-out* removes the expert before the softmax, so the router redistributes its probability over
# the remaining experts. *Drop* (an ablation) keeps the routing and just zeroes the expert's output,
# so that token's feed-forward output shrinks. Opt-out is what FlexOlmo promises data owners.

# %%
for name in closed[:2]:
    drop = loss_row("drop", name)
    opt = rows[f"{name} opted out"]
    print(f"{name}: own-domain bits/byte  opt-out {opt[name]:.3f}  vs  drop {drop[name]:.3f}  "
          f"(all experts {rows['all experts'][name]:.3f})")

# %% [markdown]
# ## Opt-out is exact
# A model loaded **without** an expert (its router row and weights are never read:
# `load_model(..., experts=[...])`) computes the same logits as the full model with that expert
# opted out: not merely close, bit for bit.

# %%
ids = torch.tensor([tok.encode(samples["dictionary"][0])])
for name in closed:
    keep = [n for n in names if n != name]
    never_had_it = olmo_lab.load_model(path, experts=keep)
    with torch.no_grad(), olmo_lab.experts_off(model, [name]):
        diff = (never_had_it(ids).logits - model(ids).logits).abs().max().item()
    print(f"without {name:<10}: max |logit difference| {diff} (identical: {diff == 0})")
