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
import torch
import torch.nn.functional as F
from torch import nn

from .config import OlmoConfig
from ..errors import HookError
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
        self._hooks = None  # olmo_lab.hooks: gate.hook_out, hook_routing, experts.{e}.hook_out

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def route(self, x: torch.Tensor) -> Routing:
        """Router decisions for x (T, H)."""
        logits = self.gate(x)  # (T, E)
        enabled = [e for e in range(self.num_experts) if e not in self.opted_out]
        if len(enabled) < self.num_experts:
            # The enabled logits come from their rows alone, as in a model without the others: a matrix
            # product's rounding can depend on how many rows it has (it does with AVX-512 BLAS kernels).
            index = torch.tensor(enabled, device=x.device)
            logits = logits.index_copy(1, index, F.linear(x, self.gate.weight[index]))
        if self._hooks is not None:  # router logits, before the softmax (opted-out columns are ignored)
            logits = self._hooks.run("gate.hook_out", logits)
        if len(enabled) < self.num_experts:  # opt-out: the softmax and top-k see only enabled experts
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
        hooks = self._hooks
        if hooks is not None:
            new = hooks.run("hook_routing", routing)
            if new is not routing:
                self.check_routing(new, x.shape[0])
            routing = new
        T, k = routing.topk_indices.shape
        slots = x.new_zeros(T, k, H)  # each token's k weighted expert outputs
        if T == 1:  # one token (batch-1 decoding): its k experts in slot order, no search of the table
            groups = [(e, x.new_zeros(1, dtype=torch.long), slot)
                      for slot, e in enumerate(routing.topk_indices[0].tolist())]
        else:  # each expert once, with the (token, slot) pairs routed to it: (n,), (n,)
            groups = [(e, *torch.where(routing.topk_indices == e)) for e in routing.topk_indices.unique().tolist()]
        for e, tokens, slot in groups:
            if e in self.dropped:
                continue
            y = self.experts[e](x[tokens])  # (n, H)
            if hooks is not None:
                y = hooks.run(f"experts.{e}.hook_out", y, rows=tokens)
            slots[tokens, slot] = y * routing.topk_weights[tokens, slot, None]
        return slots.sum(dim=1).view(B, S, H)  # one reduction over the k slots

    def check_routing(self, r: Routing, tokens: int) -> None:
        """A replaced routing must name enabled experts for every token, with one weight per choice."""
        idx, w = r.topk_indices, r.topk_weights
        if idx.dim() != 2 or idx.shape[0] != tokens or idx.dtype != torch.long or w.shape != idx.shape:
            raise HookError(f"routing: expected (tokens={tokens}, k) long indices and weights of the same shape, got "
                            f"{idx.dtype} {tuple(idx.shape)} and {tuple(w.shape)}")
        if w.dtype != self.gate.weight.dtype:
            raise HookError(f"routing: weights must be {self.gate.weight.dtype}, got {w.dtype}")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.num_experts):
            raise HookError(f"routing: expert indices must lie in [0, {self.num_experts})")
        if self.opted_out and bool(torch.isin(idx, torch.tensor(sorted(self.opted_out), device=idx.device)).any()):
            raise HookError(f"routing: experts {sorted(self.opted_out)} are opted out here; they cannot be chosen")
