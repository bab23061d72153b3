# %% [markdown]
# # 03 · FlexOlmo routing
#
# FlexOlmo replaces each block's MLP with a mixture of experts: a public expert plus one expert per
# closed data domain, each trained **independently** by its data owner and merged without joint
# training. A linear router scores every expert for every token; the softmax over experts, the
# top-k of it and the weighted sum of the chosen experts give the block's feed-forward output.
#
# This notebook shows those decisions on the shipped `flexolmo-lab` model (or `OLMO_LAB_MOE_MODEL`):
# per token and layer, per domain, which experts fire together, during generation, and how much
# each expert contributed to one prediction.

# %%
import os

import matplotlib.pyplot as plt
import torch

import olmo_lab
from olmo_lab import lens, plots
from olmo_lab.trace import trace

torch.manual_seed(0)
path = os.environ.get("OLMO_LAB_MOE_MODEL") or olmo_lab.lab_model("flexolmo-lab")
model = olmo_lab.load_model(path)
tok = olmo_lab.load_tokenizer(path)
cfg = model.config
names = model.experts.names
print(f"{cfg.num_experts} experts {names}, top-{cfg.num_experts_per_tok} of them per token, "
      f"{cfg.num_hidden_layers} layers")
samples = {domain: entry["texts"] for domain, entry in olmo_lab.lab.samples().items()}
print("sample domains:", list(samples))

# %% [markdown]
# ## One prompt, token by token
# `tr.routing[layer]` holds the router logits, the probabilities over experts and the chosen top-k.

# %%
code = samples["code"][0][:120]
with trace(model, attention=False, tokenizer=tok) as tr:
    model(torch.tensor([tok.encode(code)]))
mid = cfg.num_hidden_layers // 2
print(tr.routing[mid].table(max_rows=12))

# %%
# README figure
fig = plots.routing_heatmap(tr.routing, names)
plt.show()
print(plots.routing_summary(tr.routing, names))

# %% [markdown]
# ## Which experts each domain uses
# The share of each domain's tokens whose highest-weight expert is each expert (`top=1`: with top-k = all,
# every expert is in every token's top-k), averaged over layers (and for the middle layer). A domain's
# text should mostly go to its own expert. In `flexolmo-lab` each closed domain's text goes to its own
# expert more than to any other -- less so on these short snippets than on the 128-token windows of
# `lab/RESULTS.md` (84-95% there in the middle layers) -- and public text goes mostly to the public
# expert, with about a quarter of it to closed experts here (33-42% in layers 1-3 of `lab/RESULTS.md`,
# which notebook 05 prints; why that costs is explained there). Routing is the hard part of FlexOlmo.

# %%
usage = lens.expert_usage(model, tok, samples, top=1)
fig = plots.expert_usage_bars(usage, names)
plt.show()
print(lens.usage_table(usage, names))
print(f"\nlayer {mid} only:")
print(lens.usage_table(usage, names, layer=mid))

# %% [markdown]
# ## Co-activation
# How often two experts are chosen for the same token (over all layers and all samples).

# %%
with trace(model, attention=False, tokenizer=tok) as all_tr:
    for texts in samples.values():
        for t in texts:
            model(torch.tensor([tok.encode(t)]))
# Every sample started a new traced sequence; pool the routing records of all of them.
routing_all = {(i, layer): record for i, seq in enumerate(all_tr.routing_per_sequence()) for layer, record in seq.items()}
fig = plots.coactivation_matrix(routing_all, names)
plt.show()
print(plots.coactivation(routing_all, len(names)).int())

# %% [markdown]
# ## Routing during generation
# Tracing covers generated tokens too: every token the model reads while generating is routed.
# Below, the continuation of a math prompt, each token on the colour of its top expert (middle layer).

# %%
prompt = samples["math"][0][:60]
with trace(model, attention=False, tokenizer=tok) as gen_tr:
    continuation = olmo_lab.generate(model, tok, prompt, max_new_tokens=30)
n_prompt = len(tok.encode(prompt))
record = gen_tr.routing[mid]
generated_tokens = record.tokens[n_prompt:]
top = record.topk_indices[n_prompt:, 0].tolist()
fig = plots.colored_generation(generated_tokens, top, names, title=f"{prompt!r} ... (layer {mid})")
plt.show()
print(repr(prompt + continuation))
print(plots.colored_generation_summary(generated_tokens, top, names))

# %% [markdown]
# ## Which expert made this prediction?
# Direct logit attribution splits a next-token logit into the contributions of the embeddings,
# every attention layer and every expert (freezing the final norm's scale; see `olmo_lab.lens`).
# The parts add up to the logit.

# %%
with trace(model, attention=False, residual=True, tokenizer=tok) as att_tr:
    logits = model(torch.tensor([tok.encode(code)])).logits
target = int(logits[0, -1].argmax())
attribution = lens.direct_logit_attribution(model, att_tr, target, position=-1)
print(attribution.summary())
print("\nby expert (all layers):", {k: round(v, 3) for k, v in attribution.experts().items()})
