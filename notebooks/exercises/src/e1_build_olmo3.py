# %% [markdown]
# # Exercises 1–6 · Build OLMo 3 yourself, checked as you go
#
# You will write an OLMo 3 forward pass from scratch, in the order a token meets its parts, and
# finish by loading the shipped `olmo3-lab` weights into **your** modules and generating text:
#
# | # | exercise | you write |
# |---|---|---|
# | 1 | RMSNorm, fp32 inside | `rms_norm(x, weight, eps)` |
# | 2 | rotary embeddings, YaRN on full-attention layers only | `apply_rope`, `rope_tables` |
# | 3 | attention: full-width QK-norm, grouped KV heads, sliding window | `Attention.forward` |
# | 4 | the post-norm block | `block(x, attn, mlp, norm1, norm2)` |
# | 5 | the whole forward pass, on the lab weights, generating | `MyOlmo.forward` |
# | 6 | a KV cache whose sliding-window part stays bounded | `Cache.update`, `cache_mask` |
#
# Replace each `raise NotImplementedError("your code here")` with your code and run the cell below it.
# The checker runs your code and `olmo_lab`'s on the same inputs (random ones chosen to expose the
# usual mistakes, and the real lab weights) and answers with one line: **correct**, the **known
# mistake** your outputs reproduce, or **where** your outputs first differ and by how much. Until
# you fill a blank it says *not done yet*. The exact math is in `docs/architecture.md` (§2);
# the solutions are in `notebooks/exercises/solutions/`.
#
# Exercises are independent where they can be: to skip one, import the library's version
# (`from olmo_lab.rope import apply_rope`, `from olmo_lab.norm import RMSNorm`, ...) in its place.

# %%
import math

import torch
import torch.nn.functional as F
from torch import nn

import olmo_lab
from olmo_lab import exercises
from olmo_lab.config import FULL, SLIDING
from olmo_lab.mlp import SwiGLU
from olmo_lab.norm import RMSNorm

# %% [markdown]
# ## 1 · RMSNorm (about 10 minutes)
#
# $\mathrm{RMSNorm}(x) = w \odot x / \sqrt{\mathrm{mean}(x^2) + \varepsilon}$ over the last axis.
# OLMo computes it **in fp32** whatever the input dtype: upcast `x`, normalise, multiply by the gain
# `w` (still in fp32: a bf16 `w` is promoted), and only then cast back to `x.dtype`. Llama casts back
# *before* the gain; in bf16 the two round differently. The gain is `w`, not `1 + w`; there is no bias
# and no centring.

# %%
def rms_norm(x, weight, eps):
    # BEGIN SOLUTION
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * h).to(x.dtype)
    # END SOLUTION


exercises.check_rms_norm(rms_norm)

# %% [markdown]
# ## 2a · Rotary embeddings: rotating q and k (about 10 minutes)
#
# RoPE rotates pairs of dimensions of each query and key by an angle proportional to the token's
# position. OLMo pairs dimension `i` with `i + hd/2` ("rotate-half", not neighbours `2i, 2i+1`):
#
#     rotate_half(x) = cat(-x[..., hd/2:], x[..., :hd/2])
#     rope(x) = x * cos + rotate_half(x) * sin
#
# `x` is `(B, heads, S, hd)`; `cos` and `sin` are `(B, S, hd)` in **fp32** (broadcast them over the
# heads). Do the products in fp32 and return `x`'s dtype.

# %%
def apply_rope(x, cos, sin):
    # BEGIN SOLUTION
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    cos, sin = cos[:, None], sin[:, None]  # (B, 1, S, hd): broadcast over heads
    return (x * cos + rotated * sin).to(x.dtype)
    # END SOLUTION


exercises.check_apply_rope(apply_rope)

# %% [markdown]
# ## 2b · The cos/sin tables, and YaRN (about 25 minutes)
#
# Plain RoPE: `inv_freq[i] = theta ** (-2i / hd)` for `i < hd/2`; the angle of position `p` is
# `p * inv_freq`, laid out as `emb = cat(freqs, freqs)` (so dims `i` and `i + hd/2` share an angle),
# and the tables are `cos(emb)`, `sin(emb)`, in fp32.
#
# Long-context OLMo 3 uses **YaRN on its full-attention layers only** (sliding layers keep plain
# RoPE with the same theta). With `rope = config.rope["full_attention"]` (a `RopeConfig`: `theta`,
# `factor`, `original_max_position_embeddings`, `beta_fast`, `beta_slow`, `attention_factor`,
# `truncate`):
#
#     corr(n) = hd * ln(orig / (n * 2π)) / (2 ln theta)          # the dim whose wavelength fits n times in orig
#     low, high = corr(beta_fast), corr(beta_slow); if truncate: low, high = floor(low), ceil(high)
#     low, high = max(low, 0), min(high, hd - 1)                   # (if low == high: high += 0.001)
#     ramp = clamp((arange(hd/2) - low) / (high - low), 0, 1)      # 0: high frequency, 1: low
#     inv_freq = plain / factor * ramp + plain * (1 - ramp)        # slow down the low frequencies only
#     cos, sin = cos(emb) * a, sin(emb) * a,   a = attention_factor or 0.1 ln(factor) + 1
#
# Return `{layer type: (cos, sin)}` with one entry per type in `config.layer_types`, each `(B, S, hd)`.

# %%
def rope_tables(config, position_ids):
    # BEGIN SOLUTION
    hd = config.head_dim
    tables = {}
    for layer_type in set(config.layer_types):
        rope = config.rope[layer_type]
        plain = 1.0 / (rope.theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
        inv_freq, scale = plain, 1.0
        if rope.rope_type == "yarn":
            def corr(n):
                return hd * math.log(rope.original_max_position_embeddings / (n * 2 * math.pi)) / (2 * math.log(rope.theta))
            low, high = corr(rope.beta_fast), corr(rope.beta_slow)
            if rope.truncate:
                low, high = math.floor(low), math.ceil(high)
            low, high = max(low, 0), min(high, hd - 1)
            if low == high:
                high += 0.001
            ramp = torch.clamp((torch.arange(hd // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
            inv_freq = plain / rope.factor * ramp + plain * (1 - ramp)
            scale = rope.attention_factor or 0.1 * math.log(rope.factor) + 1.0
        freqs = position_ids[..., None].float() * inv_freq  # (B, S, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, S, hd)
        tables[layer_type] = (emb.cos() * scale, emb.sin() * scale)
    return tables
    # END SOLUTION


exercises.check_rope_tables(rope_tables)

# %% [markdown]
# ## 3 · Attention (about 30 minutes)
#
# The module below has its parameters already (named as in the checkpoint). Write `forward(x, cos, sin)`
# for `x` of shape `(B, S, H)`:
#
# 1. `q, k, v = q_proj(x), k_proj(x), v_proj(x)`;
# 2. **QK-norm over the full width**: `q_norm(q)` over all `nh*hd` values of a token at once (and
#    `k_norm(k)` over `nkv*hd`), *before* splitting into heads: not per head;
# 3. split into heads, `(B, nh, S, hd)` and `(B, nkv, S, hd)`, and apply RoPE (your `apply_rope`);
# 4. **grouped KV heads**: query head `h` uses key/value head `h // (nh / nkv)` (`repeat_interleave`);
# 5. scores `q k^T / sqrt(hd)`, a causal mask and, on sliding layers (`self.window` is not None), a
#    **window of W keys including the query itself**: key `j` is visible to query `i` iff
#    `i - W < j <= i`;
# 6. softmax (in fp32), times `v`, merge the heads back to `(B, S, nh*hd)`, `o_proj`.

# %%
class Attention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.nh, self.nkv, self.hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.window = config.window(layer_idx)  # None on full-attention layers
        H = config.hidden_size
        self.q_proj = nn.Linear(H, self.nh * self.hd, bias=False)
        self.k_proj = nn.Linear(H, self.nkv * self.hd, bias=False)
        self.v_proj = nn.Linear(H, self.nkv * self.hd, bias=False)
        self.o_proj = nn.Linear(self.nh * self.hd, H, bias=False)
        self.q_norm = RMSNorm(self.nh * self.hd, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.nkv * self.hd, config.rms_norm_eps)

    def forward(self, x, cos, sin):
        # BEGIN SOLUTION
        B, S, _ = x.shape
        q = self.q_norm(self.q_proj(x)).view(B, S, self.nh, self.hd).transpose(1, 2)  # (B, nh, S, hd)
        k = self.k_norm(self.k_proj(x)).view(B, S, self.nkv, self.hd).transpose(1, 2)  # (B, nkv, S, hd)
        v = self.v_proj(x).view(B, S, self.nkv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k = k.repeat_interleave(self.nh // self.nkv, dim=1)  # (B, nh, S, hd)
        v = v.repeat_interleave(self.nh // self.nkv, dim=1)
        scores = q @ k.transpose(2, 3) / math.sqrt(self.hd)  # (B, nh, S, S)
        i, j = torch.arange(S)[:, None], torch.arange(S)[None, :]
        allowed = j <= i
        if self.window is not None:
            allowed &= j > i - self.window
        probs = F.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1, dtype=torch.float32).to(q.dtype)
        out = (probs @ v).transpose(1, 2).reshape(B, S, self.nh * self.hd)  # (B, S, nh*hd)
        return self.o_proj(out)
        # END SOLUTION


exercises.check_attention(Attention)

# %% [markdown]
# ## 4 · The post-norm block (about 10 minutes)
#
# OLMo 2/3 (and FlexOlmo) move the norms to the **outputs** of attention and MLP: nothing normalises
# the block's input, and each normalised output is added to the raw residual stream:
#
#     h = x + post_attention_layernorm(attn(x))
#     y = h + post_feedforward_layernorm(mlp(h))
#
# `attn` and `mlp` are functions of a `(B, S, H)` tensor; the two norms are modules.

# %%
def block(x, attn, mlp, post_attention_layernorm, post_feedforward_layernorm):
    # BEGIN SOLUTION
    h = x + post_attention_layernorm(attn(x))
    return h + post_feedforward_layernorm(mlp(h))
    # END SOLUTION


exercises.check_block(block)

# %% [markdown]
# ## 5 · The whole forward pass, on the lab weights (about 20 minutes)
#
# The modules below are named as the checkpoint's tensors (`model.layers.0.self_attn.q_proj.weight`,
# ...), so `exercises.load_lab_weights(MyOlmo(config), "olmo3-lab")` fills them with the shipped
# weights. Write `forward(input_ids)` -> logits `(B, S, V)`: embed (a plain lookup), build the rotary
# tables for positions `0..S-1` (your `rope_tables`), run every layer as your `block` with your
# `Attention` (each layer uses the tables of **its own** type), apply the final norm, then `lm_head`.
# The checker also generates a few tokens greedily with your model and compares the text with the
# library's.

# %%
class Layer(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_type = config.layer_types[layer_idx]
        self.self_attn = Attention(config, layer_idx)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_feedforward_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Body(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Layer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class MyOlmo(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = Body(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(self, input_ids):
        # BEGIN SOLUTION
        x = self.model.embed_tokens(input_ids)  # (B, S, H)
        tables = rope_tables(self.config, torch.arange(input_ids.shape[1])[None])
        for layer in self.model.layers:
            cos, sin = tables[layer.layer_type]
            x = block(x, lambda h: layer.self_attn(h, cos, sin), layer.mlp,
                      layer.post_attention_layernorm, layer.post_feedforward_layernorm)
        return self.lm_head(self.model.norm(x))
        # END SOLUTION


exercises.check_model(MyOlmo)

# %% [markdown]
# Your model, with the shipped weights, writing (greedily, recomputing the whole text at each step:
# the cache comes next).

# %%
mine = exercises.load_lab_weights(MyOlmo(exercises.lab_config("olmo3-lab")), "olmo3-lab")
tok = olmo_lab.load_tokenizer(olmo_lab.lab_model("olmo3-lab"))
ids = torch.tensor([tok.encode("The committee said that")])
try:
    with torch.no_grad():
        for _ in range(16):
            ids = torch.cat([ids, mine(ids)[:, -1:].argmax(-1)], dim=1)  # (1, S + 1)
    print(tok.decode(ids[0].tolist()))
except NotImplementedError:
    print("not done yet")

# %% [markdown]
# ## 6a · A KV cache with a bounded sliding-window part (about 20 minutes)
#
# When generating, each step feeds only the new token; the keys and values of earlier tokens come from
# a cache. `update(layer, k, v)` receives this step's post-RoPE keys and values `(B, nkv, S_new, hd)`
# and returns **every** key and value the step can attend to (the kept past followed by the new ones).
# A sliding layer with window `W` only ever needs its last **W-1** keys afterwards (the next query is
# the W-th key of its own window), so keep just those: its memory stays bounded however long the
# generation. Full-attention layers (`windows[layer]` is None) keep everything. `layer_length(layer)`
# says how many positions a layer holds. When your cache is right, the checker runs the library model
# with your cache inside for 40 tokens past olmo3-lab's window.

# %%
class Cache:
    def __init__(self, windows):
        self.windows = windows  # per layer: W, or None for full attention
        self.keys = [None] * len(windows)
        self.values = [None] * len(windows)

    def update(self, layer, k, v):
        # BEGIN SOLUTION
        if self.keys[layer] is not None:
            k = torch.cat([self.keys[layer], k], dim=2)  # (B, nkv, past + S_new, hd)
            v = torch.cat([self.values[layer], v], dim=2)
        W = self.windows[layer]
        first = 0 if W is None else max(k.shape[2] - (W - 1), 0)
        self.keys[layer], self.values[layer] = k[:, :, first:], v[:, :, first:]
        return k, v
        # END SOLUTION

    def layer_length(self, layer):
        # BEGIN SOLUTION
        return 0 if self.keys[layer] is None else self.keys[layer].shape[2]
        # END SOLUTION


exercises.check_kv_cache(Cache)

# %% [markdown]
# ## 6b · The mask of a cached step (about 15 minutes)
#
# With `past` tokens already seen, the `q_len` new queries sit at positions `past .. past+q_len-1`;
# the cache returned `kv_len = kept + q_len` keys, where `kept = min(past, W-1)` on a sliding layer
# and `past` on a full one, so the first returned key is at position `past - kept`. Return the
# `(q_len, kv_len)` boolean mask: causal, and on sliding layers within the window (W keys, the query
# itself included).

# %%
def cache_mask(q_len, past, window):
    # BEGIN SOLUTION
    kept = past if window is None else min(past, window - 1)
    q = torch.arange(past, past + q_len)[:, None]  # (q_len, 1) query positions
    kv = torch.arange(past - kept, past + q_len)[None, :]  # (1, kv_len) key positions
    allowed = kv <= q
    if window is not None:
        allowed &= kv > q - window
    return allowed
    # END SOLUTION


exercises.check_cache_mask(cache_mask)
