# %% [markdown]
# # 02 · Attention maps
#
# Where does each head look? This notebook traces the attention probabilities of the shipped
# `olmo3-lab` model (or `OLMO_LAB_MODEL`), shows the **sliding-window band** of the local layers
# next to the full-attention layers, and finds heads **by score** rather than by eye: a
# *previous-token head* and an *induction head* (the two-head circuit that lets a model continue a
# sequence it has seen before). It ends with the attention explorer widget.

# %%
import os

import matplotlib.pyplot as plt
import torch

import olmo_lab
from olmo_lab import heads, plots
from olmo_lab.trace import trace
from olmo_lab.widgets import AttentionExplorer

torch.manual_seed(0)
path = os.environ.get("OLMO_LAB_MODEL") or olmo_lab.lab_model("olmo3-lab")
model = olmo_lab.load_model(path)
tok = olmo_lab.load_tokenizer(path)
cfg = model.config
sliding = [i for i, t in enumerate(cfg.layer_types) if t == "sliding_attention"]
full = [i for i, t in enumerate(cfg.layer_types) if t == "full_attention"]
print(f"sliding-window layers {sliding} (W = {cfg.sliding_window}), full-attention layers {full}")
print(f"{cfg.num_attention_heads} query heads share {cfg.num_key_value_heads} key/value heads")

# %% [markdown]
# ## Trace a prompt
# Inside `with trace(model)`, every forward records `tr.attention[layer]`: (batch, heads, queries, keys).

# %%
text = ("The old lighthouse keeper climbed the stairs every evening. He lit the lamp, wound the clock, "
        "and watched the ships pass. The old lighthouse keeper climbed the stairs every evening.")
ids = torch.tensor([tok.encode(text)])
with trace(model, tokenizer=tok) as tr:
    model(ids)
print(len(tr.tokens), "tokens; attention of layer 0:", tuple(tr.attention[0].shape))

# %% [markdown]
# ## The sliding window versus full attention
# On a sliding layer a query sees only its last `W` keys (the dashed line marks the oldest one it
# can see); on a full layer it sees everything before it. Entries outside are exactly 0.

# %%
for layer in (sliding[0], full[0]):
    head = 0
    fig = plots.plot_attention(tr, layer, head)
    plt.show()
    outside = tr.attention[layer][0, head][~tr.visible(layer)]
    print(f"layer {layer}: attention outside the visible region sums to {outside.sum().item():.1f}")

# %%
fig = plots.attention_grid(tr, full[0])
plt.show()
print("query heads -> key/value head:", tr.kv_heads())

# %% [markdown]
# ## Previous-token heads, found by score
# For every head: the mean attention from each position to the one just before it.

# %%
public = [s for s in olmo_lab.lab.samples()["public"]["texts"]]
sample_ids = torch.tensor([tok.encode(public[0])[:48]])
prev = heads.previous_token_scores(model, sample_ids)  # (layers, heads)
layer, head, score = heads.best_head(prev)
print(f"best previous-token head: layer {layer}, head {head}, score {score:.2f}")

fig, ax = plt.subplots(figsize=(5, 3))
im = ax.imshow(prev.numpy(), cmap="Oranges", vmin=0, vmax=1)
ax.set_xlabel("head"); ax.set_ylabel("layer"); ax.set_title("previous-token score")
fig.colorbar(im); plt.show()

with trace(model, layers=[layer], tokenizer=tok) as prev_tr:
    model(sample_ids)
fig = plots.plot_attention(prev_tr, layer, head)
plt.show()

# %% [markdown]
# ## Induction heads
# Feed a random token sequence twice: `[r, r]`. In the second copy, an induction head at token `t`
# attends to the token that *followed* `t` in the first copy, so the model can predict it. Its score
# is the mean attention on that "previous occurrence + 1" diagonal. Random tokens make this measure
# copying, not knowledge of the language.
#
# The shipped `olmo3-lab` learned one from a synthetic copy curriculum (random token spans written
# again and again; its model card has the stages): the score is high, the second copy costs far fewer
# nats than the first, and the heatmap shows the bright stripe that marks a real induction head, one
# step right of the diagonal where each token met its earlier copy. The random tokens are drawn from
# ids that occur in the public samples, which the model has learned embeddings for.

# %%
seen = torch.tensor(sorted({i for s in public for i in tok.encode(s)}))  # ids the model has seen in text
repeated = seen[heads.repeated_random_tokens(len(seen), length=24, batch=4, seed=0)]  # (4, 48): [r, r]
ind = heads.induction_scores(model, repeated)
layer_i, head_i, score_i = heads.best_head(ind)
print(f"best induction head: layer {layer_i}, head {head_i}, score {score_i:.2f}")
with torch.no_grad():
    loss = torch.nn.functional.cross_entropy(model(repeated).logits[:, :-1].flatten(0, 1), repeated[:, 1:].flatten(),
                                             reduction="none").view(4, -1)
first, second = loss[:, :23].mean().item(), loss[:, 24:].mean().item()
print(f"loss on the first copy {first:.2f} nats/token, on the second copy {second:.2f}")
print("in-context copying (second copy at least 1 nat/token easier):", second < first - 1)

# README figure
with trace(model, layers=[layer_i]) as ind_tr:
    model(repeated[:1])
fig = plots.attention_heatmap(ind_tr.attention[layer_i][0, head_i], [str(i) for i in range(48)],
                              cfg.window(layer_i), title=f"best induction score: layer {layer_i}, head {head_i} ({score_i:.2f})")
plt.show()

# %% [markdown]
# ## The attention explorer
# Pick a layer, a head and a query token; the heatmap and a one-line summary update. Here the
# widget is driven from code (each change prints its summary); in JupyterLab, use the dropdowns.

# %%
explorer = AttentionExplorer(model, tok, text)
explorer

# %%
explorer.layer.value = layer
explorer.head.value = head
explorer.query.value = len(explorer.state.tokens) - 1
