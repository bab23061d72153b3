"""Exercise 1, RMSNorm: `rms_norm(x, weight, eps)` normalises in fp32 and multiplies by the gain in fp32.

The cases: fp32, bf16 with a non-trivial gain (where Llama's order rounds differently), fp16 with
large activations (whose squares overflow without the upcast), tiny activations (where eps matters),
and a real post-attention norm of olmo3-lab applied to its token embeddings.
"""

from __future__ import annotations

from functools import cache

import torch

from ..modeling.norm import RMSNorm
from .grading import Case, Mistake, Verdict, grade
from .weights import lab_weights


def reference(x, weight, eps):
    norm = RMSNorm(weight.shape[0], eps).to(weight.dtype)
    norm.weight.data.copy_(weight)
    return norm(x)


def _no_upcast(x, weight, eps):
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _llama_order(x, weight, eps):
    h = x.float()
    return weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _one_plus_weight(x, weight, eps):
    return reference(x, 1 + weight, eps)


def _eps_outside(x, weight, eps):
    h = x.float()
    return (weight * (h / (h.pow(2).mean(-1, keepdim=True).sqrt() + eps))).to(x.dtype)


def _sum_not_mean(x, weight, eps):
    h = x.float()
    return (weight * (h * torch.rsqrt(h.pow(2).sum(-1, keepdim=True) + eps))).to(x.dtype)


def _subtracts_mean(x, weight, eps):  # LayerNorm without the bias
    h = x.float()
    h = h - h.mean(-1, keepdim=True)
    return (weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps))).to(x.dtype)


MISTAKES = [
    Mistake("no_fp32_upcast", "no fp32 upcast: the norm is computed in the input's dtype (x.pow(2) overflows "
            "in fp16 and every value rounds in bf16); compute in x.float() and cast back at the end", _no_upcast),
    Mistake("llama_order", "Llama's order: you cast back to the input dtype before multiplying by the gain; "
            "OLMo multiplies by the gain in fp32, then casts", _llama_order),
    Mistake("one_plus_weight", "the gain is used as (1 + weight); OLMo's gain is weight itself", _one_plus_weight),
    Mistake("eps_outside_sqrt", "eps is added after the square root; it belongs inside: rsqrt(mean(x^2) + eps)",
            _eps_outside),
    Mistake("sum_not_mean", "sum of squares instead of their mean (that is the L2 norm, not the RMS)", _sum_not_mean),
    Mistake("subtracts_mean", "the mean is subtracted first: that is LayerNorm; RMSNorm does not centre",
            _subtracts_mean),
]


@cache
def cases() -> list[Case]:
    g = torch.Generator().manual_seed(1)
    H = 64
    gain = 1 + 0.5 * torch.randn(H, generator=g)
    out = [
        Case("fp32 random input (2, 5, 64)", (torch.randn(2, 5, H, generator=g), gain, 1e-6)),
        Case("bf16 random input, bf16 gain", (torch.randn(3, 7, H, generator=g).bfloat16(), gain.bfloat16(), 1e-6)),
        Case("fp16 input of magnitude ~400 (squares overflow fp16)",
             ((400 * torch.randn(2, 3, H, generator=g)).half(), gain.half(), 1e-5)),
        Case("fp32 tiny input (|x| ~ 1e-4, so eps matters)", (1e-4 * torch.randn(2, 4, H, generator=g), gain, 1e-5)),
    ]
    w = lab_weights("olmo3-lab")
    ids = torch.arange(0, 4000, 97)[None]  # (1, 42) token ids spread over the vocabulary
    x = w["model.embed_tokens.weight"][ids]  # (1, 42, H) bf16, the checkpoint's dtype
    out.append(Case("olmo3-lab: layer 0's post-attention norm on bf16 token embeddings",
                    (x, w["model.layers.0.post_attention_layernorm.weight"], 1e-6)))
    return out


def check_rms_norm(rms_norm) -> Verdict:
    """Exercise 1: grade `rms_norm(x, weight, eps) -> tensor of x's dtype`."""
    return grade("RMSNorm", rms_norm, reference, cases(), MISTAKES)
