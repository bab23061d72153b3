"""Causal self-attention of OLMo 2/3 and FlexOlmo: full-width QK-norm, RoPE, GQA, sliding windows.

Two back-ends compute the same thing:
- "sdpa" (the default): torch's fused `scaled_dot_product_attention`, dispatched the way transformers
  does it, so results match it bit for bit on CPU; no probabilities come out;
- "eager": the explicit softmax of `attention_probabilities`, then a product with the values.

Looking never changes the output: a function on `hook_pattern` that only reads gets the explicit
probabilities computed *beside* the back-end, and the output still comes from the back-end itself, so
a traced forward is bit-identical to an untraced one. Those probabilities are what "eager" would use:
equal to SDPA's internal ones up to rounding (SDPA never materialises them). A function that *replaces*
the pattern changes the function on purpose: the output is then the new probabilities times the values.
"""

from __future__ import annotations

from dataclasses import dataclass
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
    `query_slots` (S,): the cache index of each query as a tensor, set only by `static_mask`, so that a
    compiled step writes its keys without a Python int that would be baked into the graph.
    """

    allowed: torch.Tensor | None
    kv_start: int
    kv_len: int
    query_slots: torch.Tensor | None = None

    def to(self, device, non_blocking: bool = False) -> "AttentionMask":
        """The mask on another device (a layer placed on another GPU gets it there)."""
        move = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        return AttentionMask(move(self.allowed), self.kv_start, self.kv_len, move(self.query_slots))


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
    allowed = visible(torch.arange(past, past + q_len, device=device), torch.arange(kv_start, past + q_len, device=device),
                      window)[None, None].expand(batch, 1, q_len, kv_len)  # (B, 1, S, kv_len)
    if key_padding is not None:
        allowed = allowed & key_padding[:, None, None, :]
    return AttentionMask(allowed, kv_start, kv_len)


def static_mask(slots: torch.Tensor, max_len: int, window: int | None, key_padding: torch.Tensor) -> AttentionMask:
    """The mask of a fixed-shape step over every slot of a static cache: (B, 1, S, max_len) bool.

    slots (S,) are the queries' cache indices, key_padding (B, max_len) bool is 1 for real tokens (slots
    not yet written are hidden by causality whatever it holds). The shapes never change from step to step,
    which is what lets one compiled graph serve a whole generation.
    """
    allowed = visible(slots, torch.arange(max_len, device=slots.device), window)  # (S, max_len)
    return AttentionMask(allowed[None, None] & key_padding[:, None, None, :], 0, max_len, slots)


def visible(q_idx: torch.Tensor, kv_idx: torch.Tensor, window: int | None) -> torch.Tensor:
    """(Q, K) bool: key cache index kv_idx[j] is visible from query index q_idx[i] (causal, inside the window)."""
    allowed = kv_idx[None, :] <= q_idx[:, None]
    return allowed & (kv_idx[None, :] > q_idx[:, None] - window) if window else allowed


def attention_probabilities(q: torch.Tensor, k: torch.Tensor, allowed: torch.Tensor | None,
                            scale: float) -> torch.Tensor:
    """softmax(q k^T * scale + mask) (B, nh, S, kv_len) in the model dtype, as transformers' eager path.

    q (B, nh, S, hd), k (B, nkv, kv_len, hd): query head h uses key head h // (nh // nkv). allowed: a
    (B, 1, S, kv_len) bool mask, or None for plain causal attention with no past.
    """
    if q.shape[1] != k.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # (B, nh, kv_len, hd)
    scores = torch.matmul(q, k.transpose(2, 3)).mul_(scale)  # (B, nh, S, kv_len), model dtype
    if allowed is None and q.shape[2] > 1:  # plain causal: the mask was left to SDPA's is_causal
        allowed = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
    if allowed is not None:  # transformers' additive mask: 0 where visible, the dtype's minimum elsewhere
        scores.add_(torch.zeros(allowed.shape, dtype=scores.dtype, device=q.device).masked_fill_(
            ~allowed, torch.finfo(scores.dtype).min))
    return F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)


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
        self._hooks = None  # olmo_lab.hooks: hook_q, hook_k, hook_v, hook_pattern, hook_z

    def forward(self, x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor], mask: AttentionMask,
                cache=None) -> torch.Tensor:
        B, S, _ = x.shape
        q = self.q_norm(self.q_proj(x)).view(B, S, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, S, hd)
        k = self.k_norm(self.k_proj(x)).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, S, hd)
        v = self.v_proj(x).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, S, hd)
        cos, sin = cos_sin
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        hooks = self._hooks
        if hooks is not None:  # this call's post-RoPE q, k, v (what goes into the cache)
            q, k, v = hooks.run("hook_q", q), hooks.run("hook_k", k), hooks.run("hook_v", v)
        if cache is not None:  # post-RoPE keys are cached; get back every key this step can see
            k, v = cache.update(self.layer_idx, k, v, mask)
        if hooks is not None and "hook_pattern" in hooks:
            probs = attention_probabilities(q, k, mask.allowed, self.scale)
            new = hooks.run("hook_pattern", probs, kv_start=mask.kv_start)
            out = self._attend(q, k, v, mask.allowed) if new is probs else self._mix(new, v)
        else:
            out = self._attend(q, k, v, mask.allowed)
        out = out.transpose(1, 2)  # (B, S, nh, hd)
        if hooks is not None:
            out = hooks.run("hook_z", out)
        return self.o_proj(out.reshape(B, S, self.n_heads * self.head_dim))  # (B, S, nh*hd) -> (B, S, H)

    def _attend(self, q, k, v, allowed):
        """(B, nh, S, hd) attention output through the chosen back-end."""
        if self.backend == "eager":
            return self._mix(attention_probabilities(q, k, allowed, self.scale), v)
        return self._sdpa(q, k, v, allowed)

    def _mix(self, probs, v):
        """probs (B, nh, S, kv_len) times the values (B, nkv, kv_len, hd): query head h reads kv head h // groups."""
        return torch.matmul(probs, v.repeat_interleave(self.groups, dim=1))

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
