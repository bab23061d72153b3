# %% [markdown]
# # 07 · Interventions: testing causal claims
#
# Watching shows *what happens*; a causal claim ("this head copies", "this expert carries the domain")
# needs an experiment that changes the model on purpose and measures the effect. olmo-lab names every
# intermediate tensor (**hook points**, `model.hook_points()`), and lets you write to them inside a
# `with intervene(...)` block: zero- or mean-ablate a head, add a steering vector, replace an
# activation with one from another run, force FlexOlmo's routing. On top of that: **activation
# patching** (where is a prediction carried?) and its gradient approximation, **attribution patching**.
#
# This notebook runs four experiments on the shipped models:
# 1. where the answer of an in-context copy lives, layer by layer and position by position (patching);
# 2. olmo3-lab's induction circuit, confirmed by ablating its heads;
# 3. a code prompt routed to the math expert, next to opting the code expert out;
# 4. steering a generation with a domain direction.

# %%
import os

import matplotlib.pyplot as plt
import torch

import olmo_lab
from olmo_lab import heads
from olmo_lab.interventions import Add, ForceRouting, Zero, intervene, mean_activation
from olmo_lab.patching import attribution_patch, patch
from olmo_lab.widgets import PatchingExplorer

path = os.environ.get("OLMO_LAB_MODEL") or olmo_lab.lab_model("olmo3-lab")
model = olmo_lab.load_model(path, dtype=torch.float32)  # fp32: gradients and small effects read cleanly
tok = olmo_lab.load_tokenizer(path)
names = model.hook_points()
print(len(names), "hook points; layer 0's:")
for name in model.hook_points("model.layers.0."):
    print("  ", name)

# %% [markdown]
# ## 1 · Where is the answer carried? Activation patching
# Two prompts of the same length that differ in one word. In the *clean* one the model should
# continue the repeated sentence with " stairs"; in the *corrupted* one with " hill". The metric is
# the logit difference between the two answers' first tokens at the last position. Patching the
# clean run's residual stream into the corrupted run, one (layer, position) at a time, and scoring
# each run shows where the information that decides the answer sits.

# %%
clean = "The old lighthouse keeper climbed the stairs every evening. The old lighthouse keeper climbed the"
corrupt = "The old lighthouse keeper climbed the hill every evening. The old lighthouse keeper climbed the"
answer, distractor = tok.encode(" stairs")[0], tok.encode(" hill")[0]
clean_ids, corrupt_ids = torch.tensor([tok.encode(clean)]), torch.tensor([tok.encode(corrupt)])
tokens = tok.token_strings(clean_ids[0].tolist())
print(len(tokens), "tokens each; they differ at", [i for i in range(len(tokens)) if clean_ids[0, i] != corrupt_ids[0, i]])


def metric(logits):
    return logits[0, -1, answer] - logits[0, -1, distractor]


# The metric reads the last position only; saying so (`metric_positions=[-1]`) skips the vocabulary
# projection everywhere else, the same grid for less work (a metric that read other positions would
# get an error, never a wrong number).
grid = patch(model, clean_ids, corrupt_ids, metric, site="resid_pre", progress=False, metric_positions=[-1])
print(grid.summary(6))

# %%
from dataclasses import replace

fig = replace(grid, columns=[repr(t) for t in tokens]).plot(title="residual stream patched clean -> corrupted "
                                                                 "(1 = clean answer restored)")
plt.show()

# %% [markdown]
# The answer lives at the position of the first " st" (where the two prompts differ) in every layer's
# input, and nowhere else, until the last layer: only there does attention move it to the final
# position. That is an induction pattern: the last " the" looks for the token after the earlier
# " the" and copies it. Per head (each head's output patched at every position): layer 3's head 0
# restores all of it; layer-0 heads restore part, because patching them at every position also
# brings back some of the changed word itself, at its own position.

# %%
per_head = patch(model, clean_ids, corrupt_ids, metric, site="heads", progress=False)
print(per_head.summary(4))
attr = attribution_patch(model, clean_ids, corrupt_ids, metric, site="heads")
print("attribution patching (two forwards and one backward) ranks the same head first:", attr.top(1)[0][:2])
agreement = torch.corrcoef(torch.stack([attr.scores.flatten(), per_head.scores.flatten()]))[0, 1]
print(f"correlation of attribution and activation patching over heads: {agreement:.2f}")

# %% [markdown]
# ## 2 · The induction circuit, causally
# On sequences of random tokens written twice, a model with an induction circuit predicts the second
# copy from the first. Zero-ablating one head at a time (its output before `o_proj`, `hook_z`) and
# measuring the loss on the second copy shows which heads the copying needs.

# %%
ids = heads.repeated_random_tokens(1000, 32, batch=8, seed=0, low=3)


@torch.no_grad()
def copy_loss(edits=None):
    with intervene(model, edits or {}):
        logits = model(ids).logits.float()
    predicted = logits[:, 32:-1].log_softmax(-1)  # the second copy, from its second token on
    return -predicted.gather(-1, ids[:, 33:, None]).mean().item()


base = copy_loss()
L, H = model.config.num_hidden_layers, model.config.num_attention_heads
table = torch.tensor([[copy_loss({f"model.layers.{layer}.self_attn.hook_z": Zero(heads=[h])}) for h in range(H)]
                      for layer in range(L)])
prev = heads.best_head(heads.previous_token_scores(model, ids))
ind = heads.best_head(heads.induction_scores(model))
print(f"copy loss with every head: {base:.2f} nats (uniform over the 1,000 tokens: 6.91)")
print(f"previous-token head L{prev[0]}H{prev[1]}, induction head L{ind[0]}H{ind[1]} (by attention score)")
for layer in range(L):
    print(f"layer {layer}: " + "  ".join(f"H{h} {table[layer, h]:.2f}" for h in range(H)))
both = copy_loss({f"model.layers.{prev[0]}.self_attn.hook_z": Zero(heads=[prev[1]]),
                  f"model.layers.{ind[0]}.self_attn.hook_z": Zero(heads=[ind[1]])})
print(f"both heads of the circuit ablated: {both:.2f}")

# %%
fig, ax = plt.subplots(figsize=(5, 3.2))
im = ax.imshow(table - base, cmap="Reds", vmin=0)
ax.set_xticks(range(H), [f"head {h}" for h in range(H)])
ax.set_yticks(range(L), [f"layer {i}" for i in range(L)])
ax.set_title("copy loss added by zero-ablating one head (nats)", fontsize=10)
fig.colorbar(im, ax=ax, fraction=0.04)
fig.tight_layout()
plt.show()

# %% [markdown]
# The induction head is the one the copying needs most: without it the second copy is predicted
# worse than by a model that never saw the first. The previous-token head comes next. Some heads of
# layer 0 matter too (their outputs feed both), while most other heads cost little or even help.
# Attention scores *suggested* the circuit; ablation shows it is used.

# %% [markdown]
# ## 3 · Routing a code prompt to the math expert
# `ForceRouting` replaces the router's choice for chosen tokens and layers. Here every token of a
# code prompt goes to the math expert alone, in every layer; compare with FlexOlmo's opt-out, where
# the code expert is removed before the softmax and the router picks among the rest.

# %%
moe_path = os.environ.get("OLMO_LAB_MOE_MODEL") or olmo_lab.lab_model("flexolmo-lab")
flex = olmo_lab.load_model(moe_path, dtype=torch.float32)
flex_tok = olmo_lab.load_tokenizer(moe_path)
code = olmo_lab.lab.samples()["code"]["texts"][0]
code_ids = torch.tensor([flex_tok.encode(code)[:120]])
every_layer = range(flex.config.num_hidden_layers)


@torch.no_grad()
def code_loss():
    logits = flex(code_ids).logits.float()
    return torch.nn.functional.cross_entropy(logits[0, :-1], code_ids[0, 1:]).item()


print(f"{'all experts':<34}{code_loss():.3f} nats per token")
with olmo_lab.experts_off(flex, ["code"]):
    print(f"{'code expert opted out':<34}{code_loss():.3f}")
for expert in ("math", "code"):
    with intervene(flex, {f"model.layers.{i}.mlp.hook_routing": ForceRouting([expert]) for i in every_layer}):
        print(f"{'every token forced to ' + expert:<34}{code_loss():.3f}")

prompt = flex_tok.decode(code_ids[0, :24].tolist())
print("\nprompt:", repr(prompt))
print("all experts:   ", repr(olmo_lab.generate(flex, flex_tok, prompt, max_new_tokens=24)))
with intervene(flex, {f"model.layers.{i}.mlp.hook_routing": ForceRouting(["math"]) for i in every_layer}):
    print("forced to math:", repr(olmo_lab.generate(flex, flex_tok, prompt, max_new_tokens=24)))
with olmo_lab.experts_off(flex, ["code"]):
    print("code opted out:", repr(olmo_lab.generate(flex, flex_tok, prompt, max_new_tokens=24)))

# %% [markdown]
# Forcing the math expert on code reads it worse than opting the code expert out: after an opt-out
# the router still sends code tokens to the experts that fit them best (the public model saw some
# code), while forced routing makes one expert do everything. Forcing the code expert alone reads
# this code even a little better than the router's own mix, which gives other experts some weight.
# (The lab model is small: its continuations of code are repetitive either way.)

# %% [markdown]
# ## 4 · Steering a generation with a domain direction
# The difference of the mean residual stream (after layer 1) on Bible text and on public text is a
# "Bible direction". Adding it at every position while generating (`Add`, active through every cached
# decoding step) pulls a neutral prompt towards the King James style.

# %%
samples = olmo_lab.lab.samples()


def domain_mean(domain, layer):
    means = [mean_activation(flex, torch.tensor([flex_tok.encode(t)[:120]]), f"model.layers.{layer}.hook_resid_post")
             for t in samples[domain]["texts"]]
    return torch.stack(means).mean(0)


direction = domain_mean("bible", 1) - domain_mean("public", 1)
neutral = "The man walked into the room and"
print("plain:        ", repr(olmo_lab.generate(flex, flex_tok, neutral, max_new_tokens=24)))
for scale in (0.5, 1.0):
    with intervene(flex, {"model.layers.1.hook_resid_post": Add(direction * scale)}):
        print(f"steered x{scale}:", repr(olmo_lab.generate(flex, flex_tok, neutral, max_new_tokens=24)))
with intervene(flex, {"model.layers.1.hook_resid_post": Add(torch.zeros_like(direction))}):
    same = olmo_lab.generate(flex, flex_tok, neutral, max_new_tokens=24)
print("a zero vector changes nothing:", same == olmo_lab.generate(flex, flex_tok, neutral, max_new_tokens=24))

# %% [markdown]
# ## The patching explorer
# Choose the kind of site and a layer; the heatmap shows the sweep and the summary names the sites of
# that layer that restore the clean answer most. Driven from code here (the widget prints its summary).

# %%
explorer = PatchingExplorer(model, tok, clean, corrupt, " stairs", " hill")
explorer.refresh()
explorer

# %%
explorer.site.value = "heads"
explorer.layer.value = 3

# %%
explorer.site.value = "resid_pre"
explorer.layer.value = 0

# %% [markdown]
# ## What this shows, honestly
# - Patching locates the answer exactly where a copy mechanism predicts it, and ablation confirms the
#   induction circuit that attention scores only suggested; on a 4-layer model trained on a copy task,
#   so the circuit is cleaner than in a large model.
# - Forced routing and opt-out are different experiments: opt-out is FlexOlmo's data removal (exactly
#   a model without the expert), forced routing asks what one expert can do on its own.
# - Steering with a mean difference works at small scales and degrades into repetition at larger ones.
