"""Recording what happens inside a forward pass or a generation: attention, routing, residual stream.

    with olmo_lab.trace(model, attention=True, routing=True, tokenizer=tok) as tr:
        olmo_lab.generate(model, tok, "def add(a, b):", max_new_tokens=10)
    tr.attention[3]          # (batch, heads, queries, keys) over the prompt AND the generated tokens
    tr.routing[0].probs      # (tokens, experts)
    tr.tokens                # the text of every token

Tracing installs hooks only inside the `with` block; outside it the model runs with no hooks and no
extra work. Attention capture switches only the traced layers to the explicit-softmax path. A forward
that starts a new sequence (empty cache) starts a new record; cached steps extend it, so a generation
reads as one sequence whose rows are the queries and whose columns are absolute key positions.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from .moe import Routing


@dataclass
class RoutingRecord:
    """One MoE layer's decisions for every traced token (flattened batch-major: row = b * S + s)."""

    logits: torch.Tensor  # (T, E) router logits
    probs: torch.Tensor  # (T, E) softmax over the enabled experts (0 for opted-out ones)
    topk_indices: torch.Tensor  # (T, k)
    topk_weights: torch.Tensor  # (T, k)
    tokens: list[str]
    expert_names: list[str]

    @property
    def top_expert(self) -> list[str]:
        """Name of each token's highest-weight expert."""
        return [self.expert_names[i] for i in self.topk_indices[:, 0].tolist()]

    def usage(self, top: int | None = None) -> torch.Tensor:
        """(E,) fraction of tokens that put each expert among their `top` highest-weight experts (default: all
        k chosen). With top-k = all experts every expert is always chosen, so top=1 is the informative count."""
        chosen = self.topk_indices[:, :top].reshape(-1).cpu()
        counts = torch.zeros(len(self.expert_names)).index_add_(0, chosen, torch.ones(chosen.numel()))
        return counts / self.topk_indices.shape[0]

    def table(self, max_rows: int = 40) -> str:
        """A text table: token, top expert and its weight, and the full probability row."""
        names = self.expert_names
        w = max(7, *map(len, names))  # a column as wide as the longest expert name
        lines = [f"{'token':<16}{'top':>{w + 3}}{'weight':>8}  " + " ".join(f"{n:>{w}}" for n in names)]
        for i, tok in enumerate(self.tokens[:max_rows]):
            probs = " ".join(f"{p:{w}.3f}" for p in self.probs[i].tolist())
            lines.append(f"{tok!r:<16}{self.top_expert[i]:>{w + 3}}{self.topk_weights[i, 0].item():8.3f}  {probs}")
        return "\n".join(lines)


@dataclass
class _Run:
    """One traced sequence: the pieces each forward call added, in order."""

    token_ids: list[torch.Tensor] = field(default_factory=list)  # (B, S) per call
    attention: dict[int, list] = field(default_factory=dict)  # layer -> [(q_start, kv_start, probs)]
    routing: dict[int, list] = field(default_factory=dict)  # layer -> [(Routing, B, S, expert outputs)]
    blocks: dict[int, list] = field(default_factory=dict)  # layer -> [dict of (B, S, H) tensors]
    length: int = 0


class Trace:
    """What one `with trace(...)` block recorded; the views below describe the latest sequence."""

    def __init__(self, model, tokenizer=None):
        self.model, self.tokenizer = model, tokenizer
        self.runs: list[_Run] = []

    @property
    def run(self) -> _Run:
        if not self.runs:
            raise RuntimeError("nothing was traced: run the model or generate inside the `with trace(...)` block")
        return self.runs[-1]

    # ------------------------------------------------------------------ tokens
    @property
    def token_ids(self) -> torch.Tensor:
        """(B, S) every token of the latest traced sequence, prompt and generated."""
        return torch.cat(self.run.token_ids, dim=1)

    def token_text(self, batch: int = 0, run: _Run | None = None) -> list[str]:
        ids = torch.cat((run or self.run).token_ids, dim=1)[batch].tolist()
        if self.tokenizer is None:
            return [str(i) for i in ids]
        return self.tokenizer.token_strings(ids)

    @property
    def tokens(self) -> list[str]:
        """The text of each token of the first sequence (ids as strings without a tokenizer)."""
        return self.token_text(0)

    # ------------------------------------------------------------------ attention
    @property
    def attention(self) -> dict[int, torch.Tensor]:
        """{layer: (B, heads, Q, K) probabilities}; entries a query could not see are 0."""
        out = {}
        n = self.run.length
        for layer, pieces in self.run.attention.items():
            B, H = pieces[0][2].shape[:2]
            full = torch.zeros(B, H, n, n, dtype=torch.float32)
            for q_start, kv_start, probs in pieces:  # probs (B, H, S, kv_len)
                S, kv_len = probs.shape[2:]
                full[:, :, q_start:q_start + S, kv_start:kv_start + kv_len] = probs.float().cpu()
            out[layer] = full
        return out

    def visible(self, layer: int) -> torch.Tensor:
        """(Q, K) bool: which keys each query could see (causal, and the sliding window if any)."""
        n = self.run.length
        q, k = torch.arange(n)[:, None], torch.arange(n)[None, :]
        allowed = k <= q
        window = self.model.config.window(layer)
        return allowed & (k > q - window) if window else allowed

    def kv_heads(self) -> list[int]:
        """Key/value head used by each query head (GQA: query heads h and h' share one if equal)."""
        groups = self.model.config.kv_groups
        return [h // groups for h in range(self.model.config.num_attention_heads)]

    # ------------------------------------------------------------------ routing
    @property
    def routing(self) -> dict[int, RoutingRecord]:
        """{layer: RoutingRecord} of the latest traced sequence."""
        return self._routing(self.run)

    def routing_per_sequence(self) -> list[dict[int, RoutingRecord]]:
        """`routing` of every sequence traced in the block, in order."""
        return [self._routing(run) for run in self.runs]

    def _routing(self, run: _Run) -> dict[int, RoutingRecord]:
        names = self.model.config.expert_names
        out = {}
        for layer, pieces in run.routing.items():
            cat = {f: torch.cat([getattr(r, f).detach().reshape(B, S, -1) for r, B, S, _ in pieces], dim=1)
                   for f in ("logits", "probs", "topk_indices", "topk_weights")}
            flat = {f: t.reshape(-1, t.shape[-1]).cpu() for f, t in cat.items()}
            B = cat["logits"].shape[0]
            tokens = [t for b in range(B) for t in self.token_text(b, run)]
            out[layer] = RoutingRecord(tokens=tokens, expert_names=names, **flat)
        return out

    @property
    def expert_outputs(self) -> dict[int, torch.Tensor]:
        """{layer: (B, S, E, H)} each expert's unweighted output; NaN where it did not run."""
        out = {}
        E, H = self.model.config.num_experts, self.model.config.hidden_size
        for layer, pieces in self.run.routing.items():
            chunks = []
            for _, B, S, outputs in pieces:
                dense = torch.full((B * S, E, H), float("nan"))
                for e, (rows, y) in outputs.items():
                    dense[rows, e] = y.detach().float().cpu()
                chunks.append(dense.view(B, S, E, H))
            out[layer] = torch.cat(chunks, dim=1)
        return out

    # ------------------------------------------------------------------ residual stream
    def block(self, layer: int, name: str) -> torch.Tensor:
        """(B, S, H) one of a block's named tensors: resid_pre, attn_out, resid_mid, ffn_raw, ffn_out, resid_post."""
        if layer not in self.run.blocks:
            raise KeyError(f"layer {layer} was not traced with residual=True")
        return torch.cat([d[name].detach() for d in self.run.blocks[layer]], dim=1)

    @property
    def residual(self) -> dict[int, torch.Tensor]:
        """{layer: (B, S, H)} the residual stream after each traced block."""
        return {layer: self.block(layer, "resid_post") for layer in self.run.blocks}


@contextmanager
def trace(model, attention: bool = True, routing: bool = True, residual: bool = False, layers=None,
          tokenizer=None):
    """Record attention probabilities, routing decisions and (optionally) the residual stream.

    layers: which layers to trace (default: all). Routing applies to FlexOlmo models only;
    `residual=True` also records each block's named intermediates and every expert's output,
    which `olmo_lab.lens` needs for logit attribution.
    """
    blocks = model.model.layers
    chosen = list(range(len(blocks))) if layers is None else sorted({l % len(blocks) for l in layers})
    if any(b.hook or b.self_attn.weights_hook or getattr(b.mlp, "routing_hook", None) for b in blocks):
        raise RuntimeError("this model is already being traced; nest no traces on the same model")
    tr = Trace(model, tokenizer)
    current = {}

    def start(_module, args, kwargs):
        ids = args[0] if args else kwargs["input_ids"]
        cache = kwargs.get("cache") if len(args) < 4 else args[3]
        past = cache.length if cache is not None else 0
        if past == 0 or not tr.runs:
            tr.runs.append(_Run())
        current.update(B=ids.shape[0], S=ids.shape[1], past=past)
        tr.run.token_ids.append(ids.detach().cpu())
        tr.run.length = past + ids.shape[1]

    def on_attention(layer, probs, kv_start):
        tr.run.attention.setdefault(layer, []).append((current["past"], kv_start, probs.detach()))

    def on_routing(layer, r: Routing, outputs):
        kept = {e: (rows.cpu(), y.detach()) for e, (rows, y) in outputs.items()} if residual else {}
        tr.run.routing.setdefault(layer, []).append((r, current["B"], current["S"], kept))

    def on_block(layer, tensors):
        tr.run.blocks.setdefault(layer, []).append({k: v.detach() for k, v in tensors.items()})

    handle = model.register_forward_pre_hook(start, with_kwargs=True)
    try:
        for i in chosen:
            if attention:
                blocks[i].self_attn.weights_hook = on_attention
            if routing and model.config.is_moe:
                blocks[i].mlp.routing_hook = on_routing
            if residual:
                blocks[i].hook = on_block
        yield tr
    finally:
        handle.remove()
        for b in blocks:
            b.hook = None
            b.self_attn.weights_hook = None
            if model.config.is_moe:
                b.mlp.routing_hook = None
