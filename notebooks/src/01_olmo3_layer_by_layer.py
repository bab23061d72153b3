# %% [markdown]
# # 01 · OLMo 3, layer by layer
#
# This notebook rebuilds an OLMo 3 forward pass from its parts, one cell per component, and checks
# every part against `olmo_lab`'s model **on real trained weights**: the shipped `olmo3-lab`
# checkpoint by default, or any OLMo 2/3 checkpoint named by the environment variable
# `OLMO_LAB_MODEL` (a directory or a hub id such as `allenai/Olmo-3-1025-7B`).
#
# The parts, in the order a token meets them:
# 1. token embedding (a plain lookup),
# 2. **rotary position embeddings** (RoPE; YaRN on full-attention layers of long-context models),
# 3. **attention** with full-width QK-norm, grouped key/value heads and a sliding window on 3 of 4 layers,
# 4. the **SwiGLU** feed-forward,
# 5. the **post-norm block** that wraps them (`h = x + norm(attn(x))`, `y = h + norm(mlp(h))`),
# 6. the final RMSNorm and the LM head.

# %%
import math
import os

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

import olmo_lab

torch.manual_seed(0)
path = os.environ.get("OLMO_LAB_MODEL") or olmo_lab.lab_model("olmo3-lab")
model = olmo_lab.load_model(path, dtype=torch.float32)  # fp32, so the hand-built parts below must match to 1e-5
tok = olmo_lab.load_tokenizer(path)
cfg = model.config
print(f"{cfg.model_type}: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
      f"{cfg.num_attention_heads} query heads / {cfg.num_key_value_heads} key-value heads of {cfg.head_dim} dims, "
      f"vocabulary {cfg.vocab_size}")
print("layer types:", ", ".join("sliding" if t == "sliding_attention" else "FULL" for t in cfg.layer_types))
print("sliding window:", cfg.sliding_window, "| parameters:", f"{model.num_parameters():,}")


def same(a, b, tol=1e-5):
    """A readable check: do two tensors agree to within tol?"""
    diff = (a.float() - b.float()).abs().max().item()
    if diff == 0:
        return "match: True (bit for bit)" if tol == 0 else f"match: True (max |difference| <= {tol})"
    return f"match: {diff <= tol} (max |difference| {f'<= {tol}' if diff <= tol else f'= {diff:.2e}'})"

# %% [markdown]
# ## The input
# The tokenizer is the checkpoint's own `tokenizer.json`, read with the `tokenizers` library.

# %%
prompt = "The history of the city begins with a small settlement on the river, where"
ids = torch.tensor([tok.encode(prompt)])
print(ids.shape[1], "tokens:", tok.token_strings(ids[0].tolist()))

# %% [markdown]
# ## 1 · RMSNorm
# OLMo normalises in fp32 and multiplies by the gain **in fp32** before casting back (Llama casts
# back first; in bf16 the two round differently). The gain is `weight`, not `1 + weight`.

# %%
def rms_norm(x, weight, eps):
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * h).to(x.dtype)


x = model.model.embed_tokens(ids)  # (1, S, H): the embedding is a plain lookup, no scaling
norm = model.model.layers[0].post_attention_layernorm
print(same(rms_norm(x, norm.weight, cfg.rms_norm_eps), norm(x)))

# %% [markdown]
# ## 2 · Rotary position embeddings (and YaRN)
# Each pair of dimensions `(i, i + hd/2)` of a query or key is rotated by the angle
# `position * theta^(-2i/hd)`. OLMo 3 uses the *rotate-half* layout and keeps cos/sin in fp32.
#
# Long-context OLMo 3 checkpoints use **YaRN on the full-attention layers only**: low frequencies
# (long wavelengths) are slowed down by `factor`, high ones are kept, with a linear ramp between
# them, and cos/sin are scaled by an attention factor `0.1 ln(factor) + 1`. Below, the released
# 7B's values (theta 500000, factor 8, original context 8192, head dim 128).

# %%
def default_inv_freq(theta, dim):
    return 1.0 / (theta ** (torch.arange(0, dim, 2).float() / dim))


def yarn_inv_freq(theta, dim, factor, original, beta_fast=32, beta_slow=1):
    def correction_dim(rotations):
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))
    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    ramp = ((torch.arange(dim // 2).float() - low) / (high - low)).clamp(0, 1)
    base = default_inv_freq(theta, dim)
    return base / factor * ramp + base * (1 - ramp), 0.1 * math.log(factor) + 1


yarn, attention_factor = yarn_inv_freq(500000.0, 128, 8.0, 8192)
print("YaRN inv_freq[:4]:", [round(v, 10) for v in yarn[:4].tolist()], "| attention factor:", round(attention_factor, 10))
lib_yarn, lib_factor = olmo_lab.rope.yarn_inv_freq(
    olmo_lab.RopeConfig("yarn", 500000.0, 8.0, 8192), 128)
print("library:", same(yarn, lib_yarn, 1e-12), "| factor equal:", lib_factor == attention_factor)

fig, ax = plt.subplots(figsize=(6, 3))
ax.semilogy(default_inv_freq(500000.0, 128).numpy(), label="RoPE (sliding layers)")
ax.semilogy(yarn.numpy(), label="YaRN, factor 8 (full layers)")
ax.set_xlabel("frequency index i"); ax.set_ylabel("inverse frequency"); ax.legend()
ax.set_title("OLMo 3 7B: YaRN slows only the low frequencies")
plt.show()

# %%
def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


positions = torch.arange(ids.shape[1])[None]  # (1, S)
inv_freq, scaling = model.model.rotary.tables[cfg.layer_types[0]]
freqs = positions[..., None].float() * inv_freq  # (1, S, hd/2)
emb = torch.cat((freqs, freqs), dim=-1)  # (1, S, hd)
cos, sin = emb.cos() * scaling, emb.sin() * scaling
lib_cos, lib_sin = model.model.rotary(positions)[cfg.layer_types[0]]
print("cos/sin dtype:", cos.dtype, "|", same(cos, lib_cos, 0), "|", same(sin, lib_sin, 0))

# %% [markdown]
# ## 3 · Attention: QK-norm over all heads, grouped KV heads, sliding window
# - q and k are RMS-normalised over the **full** projected vectors (`nh*hd` and `nkv*hd` wide),
#   before they are split into heads and before RoPE;
# - each key/value head serves `nh / nkv` query heads (GQA);
# - on sliding layers a query sees only the last `W` keys, itself included.

# %%
attn = model.model.layers[0].self_attn
B, S, H = x.shape
nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim

q = rms_norm(x @ attn.q_proj.weight.T, attn.q_norm.weight, cfg.rms_norm_eps)  # (B, S, nh*hd): norm first
k = rms_norm(x @ attn.k_proj.weight.T, attn.k_norm.weight, cfg.rms_norm_eps)  # (B, S, nkv*hd)
v = x @ attn.v_proj.weight.T
q = q.view(B, S, nh, hd).transpose(1, 2)  # (B, nh, S, hd)
k = k.view(B, S, nkv, hd).transpose(1, 2)  # (B, nkv, S, hd)
v = v.view(B, S, nkv, hd).transpose(1, 2)
q = (q * cos[:, None] + rotate_half(q) * sin[:, None]).to(q.dtype)
k = (k * cos[:, None] + rotate_half(k) * sin[:, None]).to(k.dtype)
k = k.repeat_interleave(nh // nkv, dim=1)  # (B, nh, S, hd): query head j uses kv head j // (nh/nkv)
v = v.repeat_interleave(nh // nkv, dim=1)

window = cfg.window(0)
qi, ki = torch.arange(S)[:, None], torch.arange(S)[None, :]
visible = (ki <= qi) & ((ki > qi - window) if window else True)  # (S, S)
scores = (q @ k.transpose(-1, -2)) * hd ** -0.5
scores = scores.masked_fill(~visible, float("-inf"))
probs = scores.softmax(-1)
attn_out = (probs @ v).transpose(1, 2).reshape(B, S, nh * hd) @ attn.o_proj.weight.T

cos_sin = model.model.rotary(positions)
masks = {t: olmo_lab.attention.build_mask(1, S, 0, cfg.window(cfg.layer_types.index(t)), None, "cpu")
         for t in cos_sin}
print(same(attn_out, attn(x, cos_sin[cfg.layer_types[0]], masks[cfg.layer_types[0]])))

# README figure
fig, axes = plt.subplots(1, 2, figsize=(7, 3.2))
full_layer = cfg.layer_types.index("full_attention") if "full_attention" in cfg.layer_types else 0
for ax, layer in zip(axes, (0, full_layer)):
    w = cfg.window(layer)
    vis = (ki <= qi) & ((ki > qi - w) if w else True)
    ax.imshow(vis.numpy(), cmap="Greens")
    ax.set_title(f"layer {layer}: " + (f"sliding window {w}" if w else "full attention"), fontsize=9)
    ax.set_xlabel("key"); ax.set_ylabel("query")
plt.tight_layout(); plt.show()

# %% [markdown]
# ## 4 · SwiGLU feed-forward
# `down(silu(gate(x)) * up(x))`, no biases.

# %%
mlp = model.model.layers[0].mlp
h = x + norm(attn_out)
swiglu = (F.silu(h @ mlp.gate_proj.weight.T) * (h @ mlp.up_proj.weight.T)) @ mlp.down_proj.weight.T
print(same(swiglu, mlp(h)))

# %% [markdown]
# ## 5 · The post-norm block
# OLMo 2/3 put the RMSNorms on the *outputs* of attention and of the MLP, before the residual add;
# the blocks read the raw residual stream.

# %%
def block(layer, x):
    blk = model.model.layers[layer]
    t = cfg.layer_types[layer]
    h = x + blk.post_attention_layernorm(blk.self_attn(x, cos_sin[t], masks[t]))
    return h + blk.post_feedforward_layernorm(blk.mlp(h))


ours = block(0, x)
print("block 0 from the parts above:", same(x + norm(attn_out) + model.model.layers[0].post_feedforward_layernorm(swiglu), ours))
print("block 0 of the library:      ", same(ours, model.model.layers[0](x, cos_sin[cfg.layer_types[0]], masks[cfg.layer_types[0]])))

# %% [markdown]
# ## 6 · The whole model
# Embeddings, every block, the final norm and the (untied) LM head give the logits.

# %%
with torch.no_grad():
    h = model.model.embed_tokens(ids)
    for layer in range(cfg.num_hidden_layers):
        h = block(layer, h)
    logits = model.model.norm(h) @ model.lm_head.weight.T
    print("logits from the parts:", same(logits, model(ids).logits))
    top = logits[0, -1].softmax(-1).topk(5)
print("most likely next tokens:", [(t, round(p, 3)) for t, p in zip(tok.token_strings(top.indices.tolist()), top.values.tolist())])

# %% [markdown]
# ## Generate
# Greedy decoding with a KV cache (sliding layers keep only their window), then a seeded sample.

# %%
print(prompt + olmo_lab.generate(model, tok, prompt, max_new_tokens=30))
print("---")
print(prompt + olmo_lab.generate(model, tok, prompt, max_new_tokens=30, temperature=0.8, top_p=0.95, seed=0))
