"""Exercise 3, attention: a module `Attention(config, layer_idx)` with `forward(x, cos, sin) -> (B, S, H)`.

Its parameters are named as the library's (q_proj, k_proj, v_proj, o_proj, q_norm, k_norm), so the
checker copies one set of random weights (random norm gains included) into both. The cases have GQA,
sequences longer than the window, a sliding and a full-attention layer, and olmo3-lab's real layers.
The known mistakes are all switches of one functional attention, `attend`, whose defaults are the
library's computation.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F

from ..modeling.attention import Attention, build_mask
from ..modeling.config import OlmoConfig
from ..modeling.norm import RMSNorm
from ..modeling.rope import RotaryEmbedding, apply_rope
from .grading import Case, Mistake, Verdict, grade
from .rope import yarn_config
from .weights import lab_library_model, lab_weights, load_named


@dataclass
class Layer:
    """One attention layer to test: its config, index and weights, and the rotary tables of its inputs."""

    config: OlmoConfig
    layer_idx: int
    state: dict  # the library module's state dict
    cos: torch.Tensor
    sin: torch.Tensor

    def __repr__(self):  # shown in error messages
        return f"layer {self.layer_idx} ({self.config.layer_types[self.layer_idx]})"

    def library(self) -> Attention:
        module = Attention(self.config, self.layer_idx)
        module.load_state_dict(self.state)
        return module


def random_layer(config: OlmoConfig, layer_idx: int, seq: int, seed: int) -> Layer:
    torch.manual_seed(seed)
    module = Attention(config, layer_idx)
    for norm in (module.q_norm, module.k_norm):
        norm.weight.data = 1 + 0.5 * torch.randn_like(norm.weight)  # a gain of 1 would hide per-head norms
    cos, sin = RotaryEmbedding(config)(torch.arange(seq)[None])[config.layer_types[layer_idx]]
    return Layer(config, layer_idx, module.state_dict(), cos, sin)


def lab_layer(layer_idx: int, seq: int) -> Layer:
    model = lab_library_model("olmo3-lab")
    config = model.config
    cos, sin = RotaryEmbedding(config)(torch.arange(seq)[None])[config.layer_types[layer_idx]]
    return Layer(config, layer_idx, model.model.layers[layer_idx].self_attn.state_dict(), cos, sin)


def reference(layer: Layer, x):
    window = layer.config.window(layer.layer_idx)
    return layer.library()(x, (layer.cos, layer.sin), build_mask(x.shape[0], x.shape[1], 0, window, None, x.device))


def attend(layer: Layer, x, *, qk_norm: str = "full", window_shift: int = 0, window_on_full: bool = False,
           no_window: bool = False, kv_heads: str = "interleave", causal: bool = True, scaled: bool = True):
    """Causal attention from the layer's weights, with switches for the known mistakes (defaults: correct).

    qk_norm: "full" (over all heads jointly), "per_head", "after_rope" or "none".
    window_shift: each sliding query sees W + shift keys. kv_heads: "interleave" (query head h uses
    kv head h // groups) or "tile" (h % n_kv).
    """
    c, s = layer.config, {k: v.float() for k, v in layer.state.items()}
    nh, nkv, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    B, S, _ = x.shape
    q, k, v = x @ s["q_proj.weight"].T, x @ s["k_proj.weight"].T, x @ s["v_proj.weight"].T  # (B, S, n*hd)

    def norm(t, weight, per_head):
        if per_head:  # (B, S, n, hd): each head normalised alone (unit gain), then the gain cut into heads
            return RMSNorm(hd, c.rms_norm_eps)(t.view(B, S, -1, hd)) * weight.view(-1, hd)
        n = RMSNorm(weight.shape[0], c.rms_norm_eps)
        n.weight.data = weight
        return n(t)

    if qk_norm in ("full", "per_head"):
        q, k = norm(q, s["q_norm.weight"], qk_norm == "per_head"), norm(k, s["k_norm.weight"], qk_norm == "per_head")
    q = q.reshape(B, S, nh, hd).transpose(1, 2)  # (B, nh, S, hd)
    k = k.reshape(B, S, nkv, hd).transpose(1, 2)  # (B, nkv, S, hd)
    v = v.view(B, S, nkv, hd).transpose(1, 2)
    q, k = apply_rope(q, layer.cos, layer.sin), apply_rope(k, layer.cos, layer.sin)
    if qk_norm == "after_rope":
        q = norm(q.transpose(1, 2).reshape(B, S, nh * hd), s["q_norm.weight"], False).view(B, S, nh, hd).transpose(1, 2)
        k = norm(k.transpose(1, 2).reshape(B, S, nkv * hd), s["k_norm.weight"], False).view(B, S, nkv, hd).transpose(1, 2)
    groups = nh // nkv
    if kv_heads == "interleave":
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # (B, nh, S, hd)
    else:
        k, v = k.repeat(1, groups, 1, 1), v.repeat(1, groups, 1, 1)
    scores = q @ k.transpose(2, 3) * (hd ** -0.5 if scaled else 1.0)  # (B, nh, S, S)
    qi, ki = torch.arange(S)[:, None], torch.arange(S)[None, :]
    allowed = ki <= qi if causal else torch.ones(S, S, dtype=torch.bool)
    window = c.window(layer.layer_idx) or (c.sliding_window if window_on_full else None)
    if window and not no_window:
        allowed = allowed & (ki > qi - (window + window_shift))
    probs = F.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    out = (probs @ v).transpose(1, 2).reshape(B, S, nh * hd)  # (B, S, nh*hd)
    return out @ s["o_proj.weight"].T


MISTAKES = [
    Mistake("qk_norm_per_head", "QK-norm per head: OLMo normalises the full projected q (nh*hd) and k (nkv*hd) "
            "vectors, all heads jointly, before splitting them into heads", lambda l, x: attend(l, x, qk_norm="per_head")),
    Mistake("qk_norm_after_rope", "QK-norm after RoPE: normalise q and k right after their projections, "
            "before the rotation", lambda l, x: attend(l, x, qk_norm="after_rope")),
    Mistake("no_qk_norm", "no QK-norm: q_norm and k_norm are not applied", lambda l, x: attend(l, x, qk_norm="none")),
    Mistake("window_w_minus_1", "window off by one: each query sees W-1 keys; it should see W keys, itself "
            "included (key j visible iff j > i - W)", lambda l, x: attend(l, x, window_shift=-1)),
    Mistake("window_w_plus_1", "window off by one: each query sees W+1 keys; it should see W keys, itself "
            "included (key j visible iff j > i - W)", lambda l, x: attend(l, x, window_shift=1)),
    Mistake("window_on_full_layers", "the sliding window is applied on the full-attention layers too "
            "(only layers whose type is sliding_attention have one)", lambda l, x: attend(l, x, window_on_full=True)),
    Mistake("no_window", "no sliding window: the sliding_attention layers attend to every earlier key",
            lambda l, x: attend(l, x, no_window=True)),
    Mistake("kv_heads_tiled", "grouped KV heads in the wrong order: query head h uses kv head h // groups "
            "(repeat_interleave), not h % n_kv_heads (repeat)", lambda l, x: attend(l, x, kv_heads="tile")),
    Mistake("no_causal_mask", "no causal mask: queries see later tokens", lambda l, x: attend(l, x, causal=False)),
    Mistake("no_scale", "scores are not scaled by 1/sqrt(head_dim)", lambda l, x: attend(l, x, scaled=False)),
]


@cache
def cases() -> list[Case]:
    g = torch.Generator().manual_seed(3)
    cfg = yarn_config()  # GQA 4/2, window 4, layers: sliding, sliding, sliding, full
    ids = torch.arange(7, 4096, 29)[None, :140]  # (1, 140) token ids: longer than olmo3-lab's window of 128
    x = lab_weights("olmo3-lab")["model.embed_tokens.weight"][ids].float()
    return [
        Case("random sliding layer (GQA 4/2, window 4), batch 2 x 9 tokens",
             (random_layer(cfg, 0, 9, seed=0), torch.randn(2, 9, 32, generator=g))),
        Case("random full-attention layer (GQA 4/2, YaRN tables), 9 tokens",
             (random_layer(cfg, 3, 9, seed=1), torch.randn(1, 9, 32, generator=g))),
        Case("olmo3-lab layer 0 (sliding, window 128) on 140 token embeddings", (lab_layer(0, 140), x)),
        Case("olmo3-lab layer 3 (full attention) on 140 token embeddings", (lab_layer(3, 140), x)),
    ]


def check_attention(attention_cls) -> Verdict:
    """Exercise 3: grade `attention_cls(config, layer_idx)`, called as `module(x, cos, sin)`."""
    def student(layer: Layer, x):
        module = load_named(attention_cls(layer.config, layer.layer_idx), layer.state, "the library's attention")
        return module(x, layer.cos, layer.sin)
    return grade("Attention", student, reference, cases(), MISTAKES)
