"""Causal self-attention of OLMo 2/3 and FlexOlmo: full-width QK-norm, RoPE, GQA, sliding windows.

Two back-ends compute the same thing:
- "sdpa": torch's fused `scaled_dot_product_attention` (fast; no weights come out), dispatched the
  way transformers does it, so results match it bit for bit on CPU;
- "eager": the explicit softmax, whose probabilities can be returned (attention maps, tracing).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import OlmoConfig
from .norm import RMSNorm
from .rope import apply_rope


@dataclass
class AttentionMask:
    """Which keys each query may see, for one layer type in one forward pass.

    `allowed` is (B, 1, S, kv_len) bool, or None when plain causal attention needs no mask
    (then SDPA runs with `is_causal`). `kv_start` is the cache index of the first key.
    """

    allowed: torch.Tensor | None
    kv_start: int
    kv_len: int


def build_mask(batch: int, q_len: int, past: int, window: int | None,
               padding: torch.Tensor | None, device) -> AttentionMask:
    """Causal (+ sliding window, + key padding) mask over cache indices, as transformers builds it.

    Sliding layers keep `window - 1` past keys in the cache, so their keys start later. Query i sits at
    cache index past + i; key j at kv_start + j. A key is visible iff it is not in the future, lies
    inside the window (`kv > q - window`: `window` keys, the query itself included) and is not padding.
    """
    kv_start = past - min(past, window - 1) if window else 0
    kv_len = past + q_len - kv_start
    key_padding = None
    if padding is not None:
        key_padding = padding[:, kv_start:past + q_len].bool()  # (B, kv_len)
        if bool(key_padding.all()):
            key_padding = None
    # The mask can be left to SDPA's is_causal when nothing but plain causality applies.
    if key_padding is None and (q_len == 1 or kv_len == q_len) and (window is None or kv_len < window):
        return AttentionMask(None, kv_start, kv_len)
    q_idx = torch.arange(past, past + q_len, device=device)[:, None]  # (S, 1)
    kv_idx = torch.arange(kv_start, past + q_len, device=device)[None, :]  # (1, kv_len)
    allowed = kv_idx <= q_idx
    if window:
        allowed = allowed & (kv_idx > q_idx - window)
    allowed = allowed[None, None].expand(batch, 1, q_len, kv_len)  # (B, 1, S, kv_len)
    if key_padding is not None:
        allowed = allowed & key_padding[:, None, None, :]
    return AttentionMask(allowed, kv_start, kv_len)


class Attention(nn.Module):
    """Multi-head attention with grouped key/value heads and QK-norm over all heads jointly."""

    def __init__(self, config: OlmoConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, config.head_dim)
        self.groups = config.kv_groups  # query heads per key/value head
        self.window = config.window(layer_idx)
        self.layer_type = config.layer_types[layer_idx]
        self.scale = self.head_dim ** -0.5
        q_dim, kv_dim, bias = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, q_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, kv_dim, bias=bias)
        self.o_proj = nn.Linear(q_dim, config.hidden_size, bias=bias)
        # QK-norm over the FULL projected vectors (nh*hd and nkv*hd), before the head split.
        self.q_norm = RMSNorm(q_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(kv_dim, config.rms_norm_eps)
        self.backend = "sdpa"  # or "eager"
        # Set by olmo_lab.trace: called with (layer, probs (B, nh, S, kv_len), cache index of the first key).
        self.weights_hook: Callable[[int, torch.Tensor, int], None] | None = None

    def forward(self, x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor], mask: AttentionMask,
                cache=None) -> torch.Tensor:
        B, S, _ = x.shape
        q = self.q_norm(self.q_proj(x)).view(B, S, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, S, hd)
        k = self.k_norm(self.k_proj(x)).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, S, hd)
        v = self.v_proj(x).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, S, hd)
        cos, sin = cos_sin
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:  # post-RoPE keys are cached; get back every key this step can see
            k, v = cache.update(self.layer_idx, k, v)
        if self.backend == "eager" or self.weights_hook is not None:
            out, probs = self._explicit(q, k, v, mask.allowed)
            if self.weights_hook is not None:
                self.weights_hook(self.layer_idx, probs, mask.kv_start)
        else:
            out = self._sdpa(q, k, v, mask.allowed)
        out = out.transpose(1, 2).reshape(B, S, self.n_heads * self.head_dim)  # (B, S, nh*hd)
        return self.o_proj(out)

    def _explicit(self, q, k, v, allowed):
        """softmax(q k^T * scale + mask) v, with the probabilities (B, nh, S, kv_len) returned."""
        k = k.repeat_interleave(self.groups, dim=1)  # (B, nh, kv_len, hd): query head h uses kv head h // groups
        v = v.repeat_interleave(self.groups, dim=1)
        scores = torch.matmul(q, k.transpose(2, 3)) * self.scale  # (B, nh, S, kv_len), model dtype
        if allowed is not None:
            scores = scores + torch.zeros_like(allowed, dtype=scores.dtype).masked_fill(
                ~allowed, torch.finfo(scores.dtype).min)
        elif q.shape[2] > 1:  # plain causal: the mask was left to SDPA's is_causal
            causal = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
            scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(probs, v), probs

    def _sdpa(self, q, k, v, allowed):
        """torch SDPA, with GQA handled the way transformers' sdpa integration does."""
        B, _, S, hd = q.shape
        kwargs = {}
        if self.groups > 1:
            if allowed is None:
                kwargs["enable_gqa"] = True
            elif S == 1:  # decoding: fold the query heads of each kv head into the query-length axis
                q = q.reshape(B, self.n_kv_heads, self.groups, hd)  # (B, nkv, groups, hd)
            else:
                k = k.repeat_interleave(self.groups, dim=1)
                v = v.repeat_interleave(self.groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=self.scale,
                                             is_causal=allowed is None and S > 1, **kwargs)
        return out.reshape(B, self.n_heads, S, hd)  # undoes the decode fold; a no-op otherwise
