"""Exercise 2, rotary embeddings: `apply_rope(x, cos, sin)` and `rope_tables(config, position_ids)`.

`apply_rope` rotates each pair of dimensions (i, i + hd/2) of x (B, heads, S, hd) by cos/sin
(B, S, hd), in fp32, returning x's dtype. `rope_tables` returns {layer type: (cos, sin)} in fp32,
with YaRN on the full-attention layers only. The random config has YaRN ramps whose ends are not
whole numbers (so truncation matters) and positions far past the original context.
"""

from __future__ import annotations

from dataclasses import replace
from functools import cache

import torch

from ..modeling.config import FULL, SLIDING, OlmoConfig, RopeConfig
from ..modeling.rope import RotaryEmbedding, apply_rope, default_inv_freq, yarn_inv_freq
from .grading import Case, Mistake, Verdict, grade
from .weights import lab_config, lab_weights

YARN = RopeConfig(rope_type="yarn", theta=10000.0, factor=4.0, original_max_position_embeddings=4096)


def yarn_config(**changes) -> OlmoConfig:
    """A tiny OLMo 3 config: sliding and full layers, GQA, a window of 4, YaRN on the full layers."""
    kw = dict(model_type="olmo3", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=16384,
              sliding_window=4, rope={FULL: YARN, SLIDING: RopeConfig(theta=10000.0)})
    return OlmoConfig(**{**kw, **changes})


# ------------------------------------------------------------------------------------ apply_rope
def _interleaved(x, cos, sin):  # GPT-J pairs (2i, 2i+1) against tables laid out in halves
    rot = torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)
    return ((x * cos[:, None]) + (rot * sin[:, None])).to(x.dtype)


def _reversed(x, cos, sin):
    half = x.shape[-1] // 2
    rot = torch.cat((x[..., half:], -x[..., :half]), dim=-1)
    return ((x * cos[:, None]) + (rot * sin[:, None])).to(x.dtype)


def _no_negation(x, cos, sin):
    half = x.shape[-1] // 2
    rot = torch.cat((x[..., half:], x[..., :half]), dim=-1)
    return ((x * cos[:, None]) + (rot * sin[:, None])).to(x.dtype)


def _tables_cast(x, cos, sin):
    return apply_rope(x, cos.to(x.dtype), sin.to(x.dtype))


def _sin_cos_swapped(x, cos, sin):
    return apply_rope(x, sin, cos)


ROTATE_MISTAKES = [
    Mistake("interleaved_pairs", "rotate-half pairs the wrong halves: you rotate neighbours (2i, 2i+1), GPT-J "
            "style; OLMo pairs dimension i with i + head_dim/2 (rotate_half: cat(-x2, x1))", _interleaved),
    Mistake("rotation_reversed", "the rotation runs backwards: rotate_half must be cat(-x2, x1), not cat(x2, -x1)",
            _reversed),
    Mistake("rotate_half_no_minus", "rotate_half lost its minus sign: cat(-x2, x1), not cat(x2, x1)", _no_negation),
    Mistake("tables_in_model_dtype", "cos/sin were cast to x's dtype before multiplying; keep them fp32 (the "
            "products run in fp32) and cast the result", _tables_cast),
    Mistake("sin_cos_swapped", "cos and sin are swapped: it is x*cos + rotate_half(x)*sin", _sin_cos_swapped),
]


@cache
def rotate_cases() -> list[Case]:
    g = torch.Generator().manual_seed(2)
    cfg = yarn_config()
    pos = torch.arange(3, 10)[None].expand(2, 7)  # (B, S)
    tables = RotaryEmbedding(cfg)(pos)
    cos, sin = tables[FULL]
    lab = lab_config("olmo3-lab")
    ids = torch.arange(0, 4000, 97)[None]  # (1, 42)
    x = lab_weights("olmo3-lab")["model.embed_tokens.weight"][ids].float()
    q = (x @ lab_weights("olmo3-lab")["model.layers.0.self_attn.q_proj.weight"].float().T)  # (1, 42, nh*hd)
    q = q.view(1, 42, lab.num_attention_heads, lab.head_dim).transpose(1, 2)  # (1, nh, 42, hd)
    lab_cos, lab_sin = RotaryEmbedding(lab)(torch.arange(42)[None])[SLIDING]
    return [
        Case("fp32 x (2, 4, 7, 16), YaRN tables", (torch.randn(2, 4, 7, 16, generator=g), cos, sin)),
        Case("bf16 x, fp32 tables", (torch.randn(2, 2, 7, 16, generator=g).bfloat16(), cos, sin)),
        Case("olmo3-lab: layer 0's queries of 42 tokens", (q, lab_cos, lab_sin)),
    ]


def check_apply_rope(fn) -> Verdict:
    """Exercise 2a: grade `apply_rope(x, cos, sin) -> x rotated, in x's dtype`."""
    return grade("apply_rope", fn, apply_rope, rotate_cases(), ROTATE_MISTAKES)


# ------------------------------------------------------------------------------------ rope_tables
def tables(config: OlmoConfig, position_ids, *, yarn_layers: str = "full", attention_factor: bool = True,
            interleave: bool = False, truncate: bool = True, ramp_reversed: bool = False):
    """The cos/sin tables with switches for the known mistakes (all off: the library's tables)."""
    yarn = next((r for r in config.rope.values() if r.rope_type == "yarn"), None)
    out = {}
    for layer_type in sorted(set(config.layer_types)):
        rope = config.rope[layer_type]
        use_yarn = yarn is not None and {"full": rope.rope_type == "yarn", "all": True, "none": False}[yarn_layers]
        if use_yarn:
            inv_freq, scale = _yarn(yarn, config.head_dim, truncate, ramp_reversed)
            scale = scale if attention_factor else 1.0
        else:
            inv_freq, scale = default_inv_freq(rope.theta, config.head_dim), 1.0
        freqs = position_ids[..., None].float() * inv_freq  # (B, S, hd/2)
        emb = freqs.repeat_interleave(2, dim=-1) if interleave else torch.cat((freqs, freqs), dim=-1)  # (B, S, hd)
        out[layer_type] = (emb.cos() * scale, emb.sin() * scale)
    return out


def _yarn(rope: RopeConfig, dim: int, truncate: bool, ramp_reversed: bool):
    if truncate and not ramp_reversed:
        return yarn_inv_freq(rope, dim)
    inv_freq, scale = yarn_inv_freq(replace(rope, truncate=truncate), dim)
    if ramp_reversed:  # interpolate the high frequencies and keep the low ones
        plain = default_inv_freq(rope.theta, dim)
        inv_freq = plain / rope.factor + plain - inv_freq
    return inv_freq, scale


TABLE_MISTAKES = [
    Mistake("yarn_on_sliding", "YaRN on the sliding-window layers too: they use plain RoPE (same theta); YaRN "
            "is for the full-attention layers only", lambda c, p: tables(c, p, yarn_layers="all")),
    Mistake("yarn_nowhere", "no YaRN: the full-attention layers use plain RoPE, but their config asks for YaRN",
            lambda c, p: tables(c, p, yarn_layers="none")),
    Mistake("no_attention_factor", "YaRN's attention factor is missing: cos and sin are multiplied by it "
            "(0.1 ln(factor) + 1 unless the config gives one)", lambda c, p: tables(c, p, attention_factor=False)),
    Mistake("interleaved_tables", "the tables are interleaved (each frequency twice in a row); OLMo's rotate-half "
            "layout is cat(freqs, freqs)", lambda c, p: tables(c, p, interleave=True)),
    Mistake("ramp_not_truncated", "the YaRN ramp ends were not rounded (floor of the low end, ceil of the high "
            "end) although the config's truncate is true", lambda c, p: tables(c, p, truncate=False)),
    Mistake("ramp_reversed", "the YaRN ramp is reversed: it is the low frequencies (long wavelengths) that are "
            "divided by factor; the high ones are kept", lambda c, p: tables(c, p, ramp_reversed=True)),
]


@cache
def table_cases() -> list[Case]:
    flex = OlmoConfig(model_type="flex_olmo", vocab_size=64, hidden_size=32, intermediate_size=48,
                      num_hidden_layers=2, num_attention_heads=2, head_dim=16, num_experts=2, num_experts_per_tok=1,
                      max_position_embeddings=512)
    return [
        Case("OLMo 3 config with YaRN on its full layers, positions 0..299",
             (yarn_config(), torch.arange(300)[None])),
        Case("the same config, a batch of 2 with positions offset by 7000", (yarn_config(),
                                                                            7000 + torch.arange(24).view(2, 12))),
        Case("YaRN with an explicit attention_factor 1.5",
             (yarn_config(rope={FULL: RopeConfig(**{**YARN.__dict__, "attention_factor": 1.5}),
                                SLIDING: RopeConfig(theta=10000.0)}), torch.arange(64)[None])),
        Case("a FlexOlmo config (full attention only, plain RoPE)", (flex, torch.arange(20)[None])),
        Case("olmo3-lab's config, positions 0..199", (lab_config("olmo3-lab"), torch.arange(200)[None])),
    ]


def check_rope_tables(fn) -> Verdict:
    """Exercise 2b: grade `rope_tables(config, position_ids) -> {layer type: (cos, sin)}` (fp32, (B, S, hd))."""
    # 1e-4: at position 7000 an inverse frequency computed in another (equally right) order moves the angle
    # by ~1e-4 rad; every listed mistake moves it by far more.
    return grade("rope_tables", fn, lambda c, p: RotaryEmbedding(c)(p), table_cases(), TABLE_MISTAKES, tol=1e-4)

