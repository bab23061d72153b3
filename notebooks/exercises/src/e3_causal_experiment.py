# %% [markdown]
# # Exercise 8 · A causal experiment: which head does the copying?
#
# Show `olmo3-lab` a sequence of random tokens twice, `[r, r]`: it predicts the second copy far better
# than the first (nothing predicts random tokens, except an earlier copy of them), and notebook 02
# finds an *induction head* by its attention pattern (layer 3, head 0 attends from each token of the
# second copy to the token after its first occurrence). A pattern is a correlation.
# Here you test the **cause**: switch each head off, one at a time, and measure how much worse the
# model copies. The tool is `olmo_lab.interventions`: inside `with intervene(model, edits):` every
# forward pass runs with the edits, and they are removed when the block ends.
#
#     with intervene(model, {"model.layers.3.self_attn.hook_z": Zero(heads=[0])}):
#         logits = model(ids).logits
#
# `hook_z` is the per-head attention output `(B, S, heads, head_dim)`, before `o_proj` mixes the heads;
# `model.hook_points()` lists every point.

# %%
import torch
import torch.nn.functional as F

import olmo_lab
from olmo_lab import exercises
from olmo_lab.heads import induction_scores
from olmo_lab.interventions import Zero, intervene

model = olmo_lab.load_model(olmo_lab.lab_model("olmo3-lab"), dtype=torch.float32)
ids = exercises.copy_task(length=24, batch=8, seed=0)  # (8, 48): rows [r, r], r = 24 random tokens
print(ids.shape, "| a few hook points:", model.hook_points("layers.3.self_attn"))

# %% [markdown]
# ## 8a · The copy loss (about 10 minutes)
#
# For rows `[r, r]` of length `2n`, the logits at position `t` predict token `t + 1`. The first token
# of the second copy cannot be predicted (nothing says the sequence restarts), but every token after
# it can, by copying. Return the mean cross-entropy over those: the predictions of tokens `n+1 .. 2n-1`.

# %%
def copy_loss(logits, ids):
    # BEGIN SOLUTION
    n = ids.shape[1] // 2
    return F.cross_entropy(logits[:, n:-1].flatten(0, 1).float(), ids[:, n + 1:].flatten())
    # END SOLUTION


exercises.check_copy_loss(copy_loss)

# %% [markdown]
# ## 8b · Switching one head off (about 10 minutes)
#
# Return the logits of `model` on `ids` with head `head` of layer `layer` zeroed, using `intervene`
# and `Zero(heads=[...])` on that layer's `hook_z`. The model must be exactly as before afterwards.

# %%
def ablate(model, ids, layer, head):
    # BEGIN SOLUTION
    with torch.no_grad(), intervene(model, {f"model.layers.{layer}.self_attn.hook_z": Zero(heads=[head])}):
        return model(ids).logits
    # END SOLUTION


exercises.check_ablation(ablate)

# %% [markdown]
# ## 8c · The experiment (about 15 minutes)
#
# Return an `(L, nh)` tensor: for each head, the copy loss with that head zeroed minus the clean copy
# loss (positive: the model copies worse without it).

# %%
def head_effects(model, ids):
    # BEGIN SOLUTION
    with torch.no_grad():
        clean = copy_loss(model(ids).logits, ids)
    L, nh = model.config.num_hidden_layers, model.config.num_attention_heads
    return torch.tensor([[float(copy_loss(ablate(model, ids, layer, head), ids) - clean) for head in range(nh)]
                         for layer in range(L)])
    # END SOLUTION


exercises.check_head_effects(head_effects)

# %% [markdown]
# ## What the experiment says
#
# The cell below prints, per head, the rise in copy loss when it is zeroed next to its induction score
# (attention from each second-copy token to the token after its first occurrence), after the losses on
# both copies (both above ln 4096 = 8.3 nats: the small model is confidently wrong about random tokens;
# what copying buys is the difference). Before running it,
# predict: which head matters most, and should the previous-token head of layer 2 matter too, although
# its own attention does not look back to the first copy?

# %%
try:
    effects = head_effects(model, ids)
except NotImplementedError:
    print("not done yet")
else:
    scores = induction_scores(model, ids)
    with torch.no_grad():
        logits = model(ids).logits
    n = ids.shape[1] // 2
    first = F.cross_entropy(logits[:, :n - 1].flatten(0, 1), ids[:, 1:n].flatten())
    print(f"loss on the first copy {float(first):.3f} nats, on the second (the copy loss) "
          f"{float(copy_loss(logits, ids)):.3f} nats")
    print("layer head  loss rise  induction score")
    for layer in range(effects.shape[0]):
        for head in range(effects.shape[1]):
            print(f"{layer:5d} {head:4d} {effects[layer, head]:+10.3f} {scores[layer, head]:16.3f}")
