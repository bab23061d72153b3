"""FlexOlmo's mixture-of-experts feed-forward: a linear router and a set of SwiGLU experts.

Routing (as transformers' FlexOlmo): logits = x W_r^T (no bias), softmax over the experts in fp32,
top-k, optional renormalisation, weights cast to the model dtype; no shared expert, no capacity.
Each expert runs only on the tokens routed to it; the k weighted outputs of a token are summed in one
reduction, as transformers' default `grouped_mm` experts do.

Two ways to switch an expert off (see `olmo_lab.experts`):
- opt-out (FlexOlmo's): the expert is removed *before* the softmax and top-k, so the layer computes
  exactly what a model that never had the expert computes;
- drop (an ablation): routing is unchanged, the expert's weighted output is zeroed and the other
  weights are not renormalised.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import OlmoConfig
from .mlp import SwiGLU


@dataclass
class Routing:
    """One layer's routing of T tokens over E experts."""

    logits: torch.Tensor  # (T, E) router logits, model dtype (all experts, opted-out ones included)
    probs: torch.Tensor  # (T, E) fp32 softmax over the enabled experts; 0 for opted-out ones
    topk_indices: torch.Tensor  # (T, k) chosen experts, by descending weight
    topk_weights: torch.Tensor  # (T, k) their weights in the model dtype (0 where an expert is dropped)


class MoE(nn.Module):
    def __init__(self, config: OlmoConfig):
        super().__init__()
        E, H = config.num_experts, config.hidden_size
        self.top_k, self.norm_topk_prob = config.num_experts_per_tok, config.norm_topk_prob
        self.gate = nn.Linear(H, E, bias=False)  # the router: one row per expert
        self.experts = nn.ModuleList(SwiGLU(H, config.intermediate_size) for _ in range(E))
        self.opted_out: frozenset[int] = frozenset()  # removed before the softmax
        self.dropped: frozenset[int] = frozenset()  # routed as usual, output zeroed
        # Set by olmo_lab.trace: called with (layer, routing, {expert: (token rows, unweighted output)}).
        self.routing_hook: Callable[[int, Routing, dict], None] | None = None
        self.layer_idx = -1

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def route(self, x: torch.Tensor) -> Routing:
        """Router decisions for x (T, H)."""
        logits = self.gate(x)  # (T, E)
        enabled = [e for e in range(self.num_experts) if e not in self.opted_out]
        if len(enabled) < self.num_experts:  # opt-out: the softmax and top-k see only enabled experts
            index = torch.tensor(enabled, device=x.device)
            # The enabled logits come from their rows alone, as in a model without the others: a matrix
            # product's rounding can depend on how many rows it has (it does with AVX-512 BLAS kernels).
            logits = logits.index_copy(1, index, F.linear(x, self.gate.weight[index]))
            probs_enabled = F.softmax(logits[:, index], dim=-1, dtype=torch.float32)  # (T, E_enabled)
            probs = logits.new_zeros(logits.shape, dtype=torch.float32).index_copy_(1, index, probs_enabled)
        else:
            index, probs_enabled = None, F.softmax(logits, dim=-1, dtype=torch.float32)
            probs = probs_enabled
        weights, chosen = torch.topk(probs_enabled, min(self.top_k, len(enabled)), dim=-1)  # (T, k)
        if index is not None:
            chosen = index[chosen]  # back to the layer's expert numbering
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(logits.dtype)
        if self.dropped:
            dropped = torch.tensor(sorted(self.dropped), device=x.device)
            weights = weights.masked_fill(torch.isin(chosen, dropped), 0)
        return Routing(logits, probs, chosen, weights)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        B, S, H = h.shape
        x = h.reshape(B * S, H)  # (T, H)
        routing = self.route(x)
        T, k = routing.topk_indices.shape
        slots = x.new_zeros(T, k, H)  # each token's k weighted expert outputs
        expert_outputs = {} if self.routing_hook is not None else None
        if T == 1:  # one token (batch-1 decoding): its k experts in slot order, no search of the table
            groups = [(e, x.new_zeros(1, dtype=torch.long), slot)
                      for slot, e in enumerate(routing.topk_indices[0].tolist())]
        else:  # each expert once, with the (token, slot) pairs routed to it: (n,), (n,)
            groups = [(e, *torch.where(routing.topk_indices == e)) for e in routing.topk_indices.unique().tolist()]
        for e, tokens, slot in groups:
            if e in self.dropped:
                continue
            y = self.experts[e](x[tokens])  # (n, H)
            if expert_outputs is not None:
                expert_outputs[e] = (tokens, y)
            slots[tokens, slot] = y * routing.topk_weights[tokens, slot, None]
        if self.routing_hook is not None:
            self.routing_hook(self.layer_idx, routing, expert_outputs)
        return slots.sum(dim=1).view(B, S, H)  # one reduction over the k slots
