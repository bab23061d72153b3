# %% [markdown]
# # Exercise 7 · FlexOlmo's router: top-k, opt-out and drop
#
# FlexOlmo keeps OLMo's post-norm block and attention but replaces the MLP by a **mixture of
# experts**: a linear router scores each token against every expert, and the token's output is the
# weighted sum of the chosen experts' SwiGLU outputs. Its experts were trained separately on their
# own data (in `flexolmo-lab`: public, code, math, dictionary, bible), which is what makes two ways of
# switching one off interesting:
#
# - **opt-out** (FlexOlmo's): the expert is removed **before the softmax**, so the layer computes
#   exactly what a model that never had the expert computes; the others' weights still sum to 1;
# - **drop** (an ablation): routing is unchanged, then the dropped expert's weight is set to 0, and the
#   other weights are **not** renormalised.
#
# As in exercises 1–6, fill the blanks and run the checker below each one; the solutions are in
# `notebooks/exercises/solutions/`.

# %%
import torch
import torch.nn.functional as F

from olmo_lab import exercises

# %% [markdown]
# ## 7a · Routing (about 20 minutes)
#
# For tokens `x` `(T, H)` and the router's weight `(E, H)` (a linear layer without bias):
#
# 1. `logits = x @ gate_weight.T`, in the model dtype;
# 2. remove the opted-out experts (they must not enter the softmax);
# 3. `probs = softmax(logits)` over the remaining experts, **in fp32**;
# 4. the `k = min(top_k, experts left)` largest: `weights, indices = topk(probs, k)` (indices in the
#    full expert numbering) — the softmax comes **before** top-k;
# 5. if `norm_topk_prob`, divide the weights by their sum (off in every released FlexOlmo);
# 6. cast the weights to the model dtype, then zero the weight of every dropped expert.
#
# Return `(weights (T, k), indices (T, k))`.

# %%
def route(x, gate_weight, top_k, opted_out=(), dropped=(), norm_topk_prob=False):
    # BEGIN SOLUTION
    logits = x @ gate_weight.T  # (T, E)
    enabled = torch.tensor([e for e in range(gate_weight.shape[0]) if e not in opted_out])
    probs = F.softmax(logits[:, enabled], dim=-1, dtype=torch.float32)  # (T, E_enabled)
    weights, chosen = torch.topk(probs, min(top_k, len(enabled)), dim=-1)  # (T, k)
    indices = enabled[chosen]  # back to the full expert numbering
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    weights = weights.to(x.dtype)
    if dropped:
        weights = weights.masked_fill(torch.isin(indices, torch.tensor(list(dropped))), 0)
    return weights, indices
    # END SOLUTION


exercises.check_route(route)

# %% [markdown]
# ## 7b · The mixture-of-experts layer (about 15 minutes)
#
# With your `route`, compute the layer's output `(T, H)`: for each token, the sum over its `k`
# chosen experts of `weight * expert(x)`. `experts[e]` is a function of the rows `(n, H)` routed to
# expert `e` (a SwiGLU). Run each expert only on its own tokens.

# %%
def moe(x, gate_weight, experts, top_k, opted_out=(), dropped=()):
    # BEGIN SOLUTION
    weights, indices = route(x, gate_weight, top_k, opted_out, dropped)
    out = torch.zeros_like(x)
    for e in indices.unique().tolist():
        tokens, slot = torch.where(indices == e)  # (n,), (n,)
        out.index_add_(0, tokens, weights[tokens, slot, None] * experts[e](x[tokens]))
    return out
    # END SOLUTION


exercises.check_moe(moe)

# %% [markdown]
# ## Questions
#
# 1. With `top_k == num_experts` (every released FlexOlmo), is "softmax after top-k" still a mistake?
#    (Try it: the checker's random cases route 2 or 3 of 6 experts for a reason.)
# 2. Opt out an expert, then drop it instead. Which of the two leaves the remaining weights summing
#    to 1? Which one is the same function as a model built without that expert?
