"""Exercise 7, FlexOlmo's router: `route(...)` (softmax in fp32, top-k, opt-out, drop) and `moe(...)`.

    route(x, gate_weight, top_k, opted_out=(), dropped=(), norm_topk_prob=False) -> (weights, indices)
    moe(x, gate_weight, experts, top_k, opted_out=(), dropped=()) -> (T, H)

x is (T, H) and gate_weight (E, H); weights (T, k) are in x's dtype, indices (T, k) by descending
weight, k = min(top_k, number of experts not opted out). Opt-out removes an expert *before* the
softmax (the layer computes what a model without it computes); drop zeroes its weight *after*
routing, without renormalising the others. The random cases route 2 or 3 of 6 experts (with all
experts chosen, softmax before and after top-k agree); the lab case is flexolmo-lab's layer 1.
"""

from __future__ import annotations

from functools import cache

import torch
import torch.nn.functional as F
from torch import nn

from ..modeling.config import OlmoConfig
from ..modeling.mlp import SwiGLU
from ..modeling.moe import MoE
from .grading import Case, Mistake, Verdict, grade
from .weights import lab_library_model, lab_weights


def library_moe(gate_weight, top_k, opted_out=(), dropped=(), norm_topk_prob=False, experts=None) -> MoE:
    """A library MoE layer with this router (and these experts), switched as asked."""
    E, H = gate_weight.shape
    cfg = OlmoConfig(model_type="flex_olmo", vocab_size=8, hidden_size=H, intermediate_size=1, num_hidden_layers=1,
                     num_attention_heads=1, head_dim=2, num_experts=E, num_experts_per_tok=top_k,
                     norm_topk_prob=norm_topk_prob)
    module = MoE(cfg).to(gate_weight.dtype)
    module.gate.weight.data = gate_weight
    if experts is not None:
        module.experts = nn.ModuleList(experts)
    module.opted_out, module.dropped = frozenset(opted_out), frozenset(dropped)
    return module


def reference_route(x, gate_weight, top_k, opted_out=(), dropped=(), norm_topk_prob=False):
    r = library_moe(gate_weight, top_k, opted_out, dropped, norm_topk_prob).route(x)
    return r.topk_weights, r.topk_indices


def sketch_route(x, gate_weight, top_k, opted_out=(), dropped=(), norm_topk_prob=False, *,
                 softmax_after_topk=False, opt_out_after_softmax=False, drop_as_opt_out=False,
                 drop_renormalised=False, drop_ignored=False, cast=True):
    """Routing with switches for the known mistakes (defaults: the library's routing)."""
    if drop_as_opt_out:
        opted_out, dropped = set(opted_out) | set(dropped), ()
    logits = x @ gate_weight.T  # (T, E), model dtype
    off = torch.zeros(logits.shape[1], dtype=torch.bool)
    off[list(opted_out)] = True
    k = min(top_k, int((~off).sum()))
    if softmax_after_topk:
        top, chosen = torch.topk(logits.masked_fill(off, float("-inf")), k, dim=-1)
        weights = F.softmax(top, dim=-1, dtype=torch.float32)
    else:
        if opt_out_after_softmax:
            probs = F.softmax(logits, dim=-1, dtype=torch.float32).masked_fill(off, 0)
        else:
            probs = F.softmax(logits.masked_fill(off, float("-inf")), dim=-1, dtype=torch.float32)
        weights, chosen = torch.topk(probs, k, dim=-1)
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if cast:
        weights = weights.to(x.dtype)
    if dropped and not drop_ignored:
        weights = weights.masked_fill(torch.isin(chosen, torch.tensor(sorted(dropped))), 0)
        if drop_renormalised:
            weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, chosen


# (key, what the student is told, the switches of sketch_route that reproduce it)
KNOWN = [
    ("softmax_after_topk", "softmax after top-k (or, what is the same, the top-k weights renormalised): the "
     "weights are the softmax over ALL enabled experts (fp32), then the top k are taken, renormalised only if "
     "norm_topk_prob", {"softmax_after_topk": True}),
    ("opt_out_after_softmax", "opt-out after the softmax: an opted-out expert must be removed before the softmax "
     "(as if the model never had it), so the others' probabilities sum to 1", {"opt_out_after_softmax": True}),
    ("drop_as_opt_out", "drop treated as opt-out: a dropped expert is routed as usual and only its weighted "
     "output is zeroed; the others keep their weights", {"drop_as_opt_out": True}),
    ("drop_renormalised", "drop renormalises the remaining weights; drop-after-routing leaves them as they are "
     "(their sum falls below 1)", {"drop_renormalised": True}),
    ("drop_ignored", "dropped experts still get their weight; set it to 0 after routing", {"drop_ignored": True}),
    ("weights_not_cast", "the weights stay fp32; cast them to the model dtype (before any drop)", {"cast": False}),
]
ROUTE_MISTAKES = [Mistake(key, text, lambda *a, s=switches, **kw: sketch_route(*a, **kw, **s))
                  for key, text, switches in KNOWN]


def _inputs(dtype, seed=7, T=24, H=16, E=6):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, H, generator=g).to(dtype), (0.7 * torch.randn(E, H, generator=g)).to(dtype)


@cache
def lab_router_input() -> torch.Tensor:
    """(T, H) fp32: what flexolmo-lab's layer 1 MoE reads on 31 tokens (captured with a forward pre-hook)."""
    model = lab_library_model("flexolmo-lab")
    seen = []
    handle = model.model.layers[1].mlp.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            model(torch.arange(5, 4000, 131)[None])
    finally:
        handle.remove()
    return seen[0][0]


@cache
def route_cases() -> list[Case]:
    x, w = _inputs(torch.float32)
    xb, wb = _inputs(torch.bfloat16, seed=8)
    gate = lab_weights("flexolmo-lab")["model.layers.1.mlp.gate.weight"]
    return [
        Case("fp32, 6 experts, top-2", (x, w, 2)),
        Case("fp32, top-2, experts 1 and 4 opted out", (x, w, 2), {"opted_out": (1, 4)}),
        Case("fp32, top-3, experts 0 and 2 dropped", (x, w, 3), {"dropped": (0, 2)}),
        Case("fp32, top-3, norm_topk_prob", (x, w, 3), {"norm_topk_prob": True}),
        Case("bf16, top-2, expert 3 opted out and 5 dropped", (xb, wb, 2), {"opted_out": (3,), "dropped": (5,)}),
        Case("flexolmo-lab layer 1 (bf16, 5 of 5), 'math' opted out and 'code' dropped",
             (lab_router_input().bfloat16(), gate, 5), {"opted_out": (2,), "dropped": (1,)}),
    ]


def dense(fn):
    """fn's routing as a (T, E) matrix of weights (0 for unchosen experts).

    That is all a layer's output depends on; it does not depend on which of several experts whose
    probabilities underflow to exactly 0 fill the last slots (flexolmo-lab's router is that peaked).
    """
    def run(x, gate_weight, *args, **kwargs):
        weights, indices = fn(x, gate_weight, *args, **kwargs)
        return weights.new_zeros(x.shape[0], gate_weight.shape[0]).scatter(1, indices, weights)
    return run


DENSE_MISTAKES = [Mistake(m.key, m.description, dense(m.run)) for m in ROUTE_MISTAKES]


def check_route(route) -> Verdict:
    """Exercise 7a: grade `route(x, gate_weight, top_k, opted_out=(), dropped=(), norm_topk_prob=False)`."""
    return grade("route", dense(route), dense(reference_route), route_cases(), DENSE_MISTAKES)


# ------------------------------------------------------------------------------------ the layer
def reference_moe(x, gate_weight, experts, top_k, opted_out=(), dropped=()):
    return library_moe(gate_weight, top_k, opted_out, dropped, experts=experts)(x[None])[0]


def sketch_moe(x, gate_weight, experts, top_k, opted_out=(), dropped=(), *, weight_inside=False, **switches):
    weights, chosen = sketch_route(x, gate_weight, top_k, opted_out, dropped, **switches)
    out = torch.zeros_like(x)
    for slot in range(chosen.shape[1]):
        for e in chosen[:, slot].unique().tolist():
            rows = chosen[:, slot] == e
            w = weights[rows, slot, None]
            out[rows] += experts[e](w * x[rows]) if weight_inside else w * experts[e](x[rows])
    return out


MOE_MISTAKES = [Mistake(key, text, lambda *a, s=switches, **kw: sketch_moe(*a, **kw, **s))
                for key, text, switches in KNOWN[:5]]  # the last two need low precision; the layer's cases are fp32
MOE_MISTAKES.append(Mistake("weight_inside_expert", "the weight scales the expert's input; it scales its output: "
                            "the sum over k of w_k * expert_k(x)",
                            lambda *a, **kw: sketch_moe(*a, **kw, weight_inside=True)))


@cache
def moe_cases() -> list[Case]:
    x, w = _inputs(torch.float32, seed=9)
    torch.manual_seed(9)
    experts = [SwiGLU(16, 24) for _ in range(6)]
    lab = lab_library_model("flexolmo-lab").model.layers[1].mlp
    lab_experts = list(lab.experts)
    return [
        Case("fp32, 6 random experts, top-2", (x, w, experts, 2)),
        Case("fp32, top-3, expert 1 opted out, 4 dropped", (x, w, experts, 3), {"opted_out": (1,), "dropped": (4,)}),
        Case("flexolmo-lab layer 1 (fp32, 5 of 5), 'math' opted out and 'code' dropped",
             (lab_router_input(), lab.gate.weight.data, lab_experts, 5), {"opted_out": (2,), "dropped": (1,)}),
    ]


def check_moe(moe) -> Verdict:
    """Exercise 7b: grade `moe(x, gate_weight, experts, top_k, opted_out=(), dropped=()) -> (T, H)` (fp32 cases)."""
    return grade("moe", moe, reference_moe, moe_cases(), MOE_MISTAKES)
