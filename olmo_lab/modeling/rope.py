"""Rotary position embeddings: plain RoPE and YaRN, one table per layer type, always in fp32.

OLMo 3 uses YaRN on its full-attention layers only; sliding-window layers use plain RoPE with the
same theta. The inverse frequencies are kept as plain fp32 tensors rather than module buffers, so
`model.to(torch.bfloat16)` cannot round them (a known transformers trap: its `.to()` path rounds
`inv_freq` to bf16 and changes the logits).
"""

import math

import torch
from torch import nn

from .config import OlmoConfig, RopeConfig


def default_inv_freq(theta: float, dim: int) -> torch.Tensor:
    """theta^(-2i/dim) for i < dim/2, in fp32."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))


def yarn_inv_freq(rope: RopeConfig, dim: int) -> tuple[torch.Tensor, float]:
    """YaRN: interpolate low frequencies by `factor`, keep high ones, blend on a linear ramp.

    Returns the inverse frequencies and the attention factor that scales cos and sin
    (so attention logits are scaled by its square).
    """
    theta, factor, orig = rope.theta, rope.factor, rope.original_max_position_embeddings

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = rope.attention_factor
    if attention_factor is None:
        if rope.mscale and rope.mscale_all_dim:
            attention_factor = float(mscale(factor, rope.mscale) / mscale(factor, rope.mscale_all_dim))
        else:
            attention_factor = mscale(factor)

    def correction_dim(rotations):  # the dimension whose wavelength fits `rotations` times in `orig`
        return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(rope.beta_fast or 32), correction_dim(rope.beta_slow or 1)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = theta ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp  # 1: keep the original frequency, 0: interpolate by `factor`
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, attention_factor


def inv_freq_for(rope: RopeConfig, dim: int) -> tuple[torch.Tensor, float]:
    if rope.rope_type == "yarn":
        return yarn_inv_freq(rope, dim)
    return default_inv_freq(rope.theta, dim), 1.0


class RotaryEmbedding(nn.Module):
    """cos/sin tables for every layer type of a model, computed from position ids."""

    def __init__(self, config: OlmoConfig):
        super().__init__()
        self.layer_types = sorted(set(config.layer_types))
        with torch.device("cpu"):  # real tensors even when the model is built on the meta device
            self.tables = {t: inv_freq_for(config.rope[t], config.head_dim) for t in self.layer_types}

    def forward(self, position_ids: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """position_ids (B, S) -> {layer type: (cos, sin)}, each (B, S, head_dim) in fp32."""
        out = {}
        for layer_type, (inv_freq, scaling) in self.tables.items():
            freqs = position_ids[..., None].float() * inv_freq.to(position_ids.device)  # (B, S, hd/2)
            emb = torch.cat((freqs, freqs), dim=-1)  # (B, S, hd): rotate-half layout, not interleaved
            out[layer_type] = (emb.cos() * scaling, emb.sin() * scaling)
        return out


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, heads, S, hd) by cos/sin (B, S, hd); the math runs in fp32, the result has x's dtype."""
    cos, sin = cos[:, None], sin[:, None]  # (B, 1, S, hd): broadcast over heads
    return ((x * cos) + (rotate_half(x) * sin)).to(x.dtype)
