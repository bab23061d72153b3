"""Recording what happens inside a forward pass or a generation: attention, routing, residual stream.

    with olmo_lab.trace(model, attention=True, routing=True, tokenizer=tok) as tr:
        olmo_lab.generate(model, tok, "def add(a, b):", max_new_tokens=10)
    tr.attention[3]          # (batch, heads, queries, keys) over the prompt AND the generated tokens
    tr.routing[0].probs      # (tokens, experts)
    tr.tokens                # the text of every token

    with olmo_lab.trace(model, hooks=model.hook_points("hook_resid_post")) as tr:
        model(ids)
    tr["model.layers.3.hook_resid_post"]   # any hook point, (B, S, ...) over every traced call

A trace reads through the named hook points of `olmo_lab.hooks` and never writes, so a traced forward
or generation is bit-identical to an untraced one, attention capture included: the forward keeps its
fused attention kernel, and the trace keeps each traced layer's post-RoPE queries and keys. Attention
probabilities are computed from them when read (`tr.attention[layer]`, or a slice with `tr.pattern`),
with the explicit softmax of `attention.attention_probabilities`: exactly what the "eager" back-end
uses, equal to the fused kernel's internal probabilities up to rounding. Memory is O(layers x S x
head_dim), not O(layers x heads x S^2), until a pattern is read.

Hooks are attached only inside the `with` block; outside it every hook point is idle again. A forward
that starts a new sequence (empty cache) starts a new record; cached steps extend it, so a generation
reads as one sequence whose rows are the queries and whose columns are absolute key positions. A
forward that fails records nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from ..modeling.attention import attention_probabilities, visible
from ..errors import HookError, InputError
from ..modeling.experts import resolve_layers

QUERY_CHUNK = 128  # patterns are computed in aligned blocks of queries: a slice equals the full pattern's
# The block tensors `tr.block(layer, name)` reads (residual=True), and their hook points.
BLOCK_POINTS = {"resid_pre": "hook_resid_pre", "attn_out": "post_attention_layernorm.hook_out",
                "resid_mid": "hook_resid_mid", "ffn_raw": "mlp.hook_out",
                "ffn_out": "post_feedforward_layernorm.hook_out", "resid_post": "hook_resid_post"}


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
    """One traced sequence: what each forward call added, in order."""

    start: int = 0  # cache index of the first traced token (0 unless tracing began mid-generation)
    token_ids: list[torch.Tensor] = field(default_factory=list)  # (B, S) per call
    mask: torch.Tensor | None = None  # (B, start + length) the latest call's attention mask (None: no padding)
    values: dict[str, list] = field(default_factory=dict)  # hook point -> [value per call]
    prefix_keys: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> cached keys before `start`
    routing: dict[int, list] = field(default_factory=dict)  # layer -> [(Routing, B, S) per call]
    experts: dict[int, list] = field(default_factory=dict)  # layer -> [{expert: (rows, output)} per call]
    length: int = 0  # start + traced tokens


class Trace:
    """What one `with trace(...)` block recorded; the views below describe the latest sequence."""

    def __init__(self, model, tokenizer=None, layers=(), attention=False, routing=False, residual=False,
                 points=()):
        self.model, self.tokenizer = model, tokenizer
        self.runs: list[_Run] = []
        self.layers, self.points = list(layers), list(points)
        self._pending: _Run | None = None
        self._reads = self._readers(attention, routing and model.config.is_moe, residual)

    # ------------------------------------------------------------------ recording (hook side)
    def _readers(self, attention, routing, residual) -> dict[str, object]:
        """{hook point: read-only function} for everything this trace keeps."""
        reads, names = {}, set(self.points)
        for i in self.layers:
            p = f"model.layers.{i}."
            if attention:
                names |= {p + "self_attn.hook_q", p + "self_attn.hook_k"}
            if residual:
                names |= {p + point for point in BLOCK_POINTS.values()}
            if routing:
                reads[p + "mlp.hook_routing"] = self._keep_routing
            if residual and self.model.config.is_moe:
                for e in range(self.model.config.num_experts):
                    reads[f"{p}mlp.experts.{e}.hook_out"] = self._keep_expert
        for name in names:
            reads[name] = self._keep
        return reads

    def _keep(self, value, ctx):
        self._pending.values.setdefault(ctx.name, []).append(value.detach().cpu())

    def _keep_routing(self, r, ctx):
        self._pending.routing.setdefault(ctx.layer, []).append((r, ctx.batch, ctx.length))

    def _keep_expert(self, y, ctx):
        e = int(ctx.name.rsplit(".", 2)[-2])
        calls = self._pending.experts.setdefault(ctx.layer, [{}])
        calls[-1][e] = (ctx.rows.cpu(), y.detach().cpu())

    def begin(self, input_ids, attention_mask, past, cache=None):
        """A forward starts (its inputs already validated): record into a pending piece."""
        run = _Run(start=past)
        if past and cache is not None:  # tracing began mid-sequence: keep the keys this run's queries can see
            run.prefix_keys = {i: cache.keys[i].detach().cpu() for i in self.layers if cache.keys[i] is not None}
        run.token_ids.append(input_ids.detach().cpu())
        run.mask = None if attention_mask is None else attention_mask.detach().cpu()
        self._pending = run

    def end(self, ok: bool):
        """The forward finished: a new sequence starts a record, a cached step extends the latest one."""
        new, self._pending = self._pending, None
        if not ok or new is None:
            return
        S = new.token_ids[0].shape[1]
        if new.start == 0 or not self.runs or self.runs[-1].length != new.start:
            new.length = new.start + S
            self.runs.append(new)
            return
        run = self.runs[-1]
        run.token_ids += new.token_ids
        run.mask, run.length = new.mask, run.length + S
        for store in ("values", "routing", "experts"):
            for key, items in getattr(new, store).items():
                getattr(run, store).setdefault(key, []).extend(items)

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

    # ------------------------------------------------------------------ any hook point
    def __getitem__(self, name: str) -> torch.Tensor:
        """A recorded hook point over every call of the latest sequence, joined along its position axis
        (router logits come back as (B, S, E); an expert's outputs as its rows, call after call)."""
        info = self.model.hooks.info(name)
        pieces = self.run.values.get(name)
        if pieces is None:
            raise HookError(f"{name} was not recorded by this trace: pass it in trace(..., hooks=[...])")
        if info.position_axis is None:  # (T, ...) rows b * S + s per call; an expert's rows: only its tokens
            if any(t.shape[0] != ids.numel() for t, ids in zip(pieces, self.run.token_ids)):
                return torch.cat(pieces)
            pieces = [t.reshape(ids.shape[0], ids.shape[1], *t.shape[1:])
                      for t, ids in zip(pieces, self.run.token_ids)]
            return torch.cat(pieces, dim=1)
        return torch.cat(pieces, dim=info.position_axis)

    # ------------------------------------------------------------------ attention
    @property
    def attention(self) -> "Patterns":
        """{layer: (B, heads, Q, K) float32 probabilities}, computed when read; entries a query could not
        see are 0. Q and K are absolute cache positions of the latest sequence."""
        return Patterns(self)

    def pattern(self, layer: int, heads=None, queries: slice | None = None, keys: slice | None = None,
                batch=None) -> torch.Tensor:
        """(B, h, q, k) float32: the attention of some heads and queries over some keys, computed from the
        recorded queries and keys only for the queries asked; equal to the same slice of `attention[layer]`."""
        run = self.run
        name = f"model.layers.{layer}.self_attn."
        if name + "hook_q" not in run.values:
            raise HookError(f"layer {layer}'s attention was not traced (trace(..., attention=True, layers=...))")
        attn = self.model.model.layers[layer].self_attn
        q = torch.cat(run.values[name + "hook_q"], dim=2)  # (B, nh, Q, hd) from `start`
        k = torch.cat(([run.prefix_keys[layer]] if layer in run.prefix_keys else [])
                      + run.values[name + "hook_k"], dim=2)  # (B, nkv, K, hd)
        key_start = run.length - k.shape[2]
        heads = list(range(attn.n_heads)) if heads is None else [heads] if isinstance(heads, int) else list(heads)
        rows = range(run.length)[queries or slice(None)]
        if rows.step != 1:
            raise InputError("pattern: queries must be a slice with step 1")
        b_sel = slice(None) if batch is None else [batch] if isinstance(batch, int) else list(batch)
        if batch is not None:
            q, k = q[b_sel], k[b_sel]
        if heads != list(range(attn.n_heads)):
            q, k = q[:, heads], k[:, [h // attn.groups for h in heads]]  # one key head per query head
        mask = None if run.mask is None else run.mask[b_sel][:, key_start:].bool()  # (B, K)
        out = torch.empty(q.shape[0], len(heads), len(rows), run.length, dtype=torch.float32)
        out[:, :, :max(0, min(run.start, rows.stop) - rows.start)] = 0  # queries from before the trace began
        first_chunk = (max(rows.start, run.start) // QUERY_CHUNK) * QUERY_CHUNK if len(rows) else run.length
        for c in range(first_chunk, rows.stop if len(rows) else 0, QUERY_CHUNK):
            c_end = min(c + QUERY_CHUNK, run.length)
            lo = max(c, run.start)
            if lo >= c_end:
                continue
            # the block's queries see no key after c_end - 1: only keys up to there are computed
            q_idx, k_idx = torch.arange(lo, c_end), torch.arange(key_start, c_end)
            allowed = visible(q_idx, k_idx, attn.window)[None, None]  # (1, 1, q, keys up to c_end)
            if mask is not None:
                allowed = allowed & mask[:, None, None, :c_end - key_start]
            probs = attention_probabilities(q[:, :, lo - run.start:c_end - run.start], k[:, :, :c_end - key_start],
                                            allowed, attn.scale)
            first, last = max(lo, rows.start), min(c_end, rows.stop)  # the asked rows in this block
            if first < last:
                rows_out = out[:, :, first - rows.start:last - rows.start]
                rows_out[..., :key_start] = 0  # keys no longer cached when the trace began
                rows_out[..., key_start:c_end] = probs[:, :, first - lo:last - lo]
                rows_out[..., c_end:] = 0
        return out if keys is None else out[..., keys]

    def visible(self, layer: int) -> torch.Tensor:
        """(Q, K) bool: which keys each query could see (causal, and the sliding window if any)."""
        n = self.run.length
        return visible(torch.arange(n), torch.arange(n), self.model.config.window(layer))

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
            cat = {f: torch.cat([getattr(r, f).detach().reshape(B, S, -1) for r, B, S in pieces], dim=1)
                   for f in ("logits", "probs", "topk_indices", "topk_weights")}
            flat = {f: t.reshape(-1, t.shape[-1]).cpu() for f, t in cat.items()}
            B = cat["logits"].shape[0]
            tokens = [t for b in range(B) for t in self.token_text(b, run)]
            out[layer] = RoutingRecord(tokens=tokens, expert_names=names, **flat)
        return out

    @property
    def expert_outputs(self) -> dict[int, torch.Tensor]:
        """{layer: (B, S, E, H)} each expert's unweighted output; NaN where it did not run (residual=True)."""
        out = {}
        E, H = self.model.config.num_experts, self.model.config.hidden_size
        for layer, calls in self.run.experts.items():
            chunks = []
            for outputs, ids in zip(calls, self.run.token_ids):
                B, S = ids.shape
                dense = torch.full((B * S, E, H), float("nan"))
                for e, (rows, y) in outputs.items():
                    dense[rows, e] = y.float()
                chunks.append(dense.view(B, S, E, H))
            out[layer] = torch.cat(chunks, dim=1)
        return out

    # ------------------------------------------------------------------ residual stream
    def block(self, layer: int, name: str) -> torch.Tensor:
        """(B, S, H) one of a block's named tensors: resid_pre, attn_out, resid_mid, ffn_raw, ffn_out, resid_post."""
        point = f"model.layers.{layer}.{BLOCK_POINTS[name]}"
        if point not in self.run.values:
            raise KeyError(f"layer {layer} was not traced with residual=True")
        return self[point]

    @property
    def residual(self) -> dict[int, torch.Tensor]:
        """{layer: (B, S, H)} the residual stream after each traced block."""
        return {i: self[f"model.layers.{i}.hook_resid_post"] for i in self.layers
                if f"model.layers.{i}.hook_resid_post" in self.run.values}


class Patterns(Mapping):
    """`Trace.attention`: a read-only {layer: pattern} view that computes each pattern when it is read."""

    def __init__(self, tr: Trace):
        self.tr = tr
        self.layers = [i for i in tr.layers if f"model.layers.{i}.self_attn.hook_q" in tr.run.values]

    def __getitem__(self, layer: int) -> torch.Tensor:
        if layer not in self.layers:
            raise KeyError(layer)
        return self.tr.pattern(layer)

    def __iter__(self):
        return iter(self.layers)

    def __len__(self):
        return len(self.layers)


@contextmanager
def trace(model, attention: bool = True, routing: bool = True, residual: bool = False, layers=None,
          tokenizer=None, hooks=()):
    """Record attention, routing decisions, the residual stream, and any named hook points.

    layers: which layers attention/routing/residual cover (default: all). Routing applies to FlexOlmo
    models only. `residual=True` records each block's six named tensors and every expert's output, which
    `olmo_lab.lens` needs for logit attribution; `hooks=[names]` records exactly those points (read them
    with `tr[name]`).
    """
    chosen = resolve_layers(len(model.model.layers), layers, InputError, "trace: layer")
    tr = Trace(model, tokenizer, chosen, attention, routing, residual, [hooks] if isinstance(hooks, str) else list(hooks))
    for name in tr._reads:
        model.hooks.info(name)  # every name checked before anything is attached
    handles = []
    model.hooks.listeners.append(tr)
    try:
        handles = [model.hooks.add(name, fn) for name, fn in tr._reads.items()]
        yield tr
    finally:
        for handle in handles:
            handle.remove()
        model.hooks.listeners.remove(tr)
