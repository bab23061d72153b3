"""Interventions: change what flows through named hook points, on purpose, and say exactly how.

    from olmo_lab.interventions import intervene, Zero, Add, ForceRouting
    with intervene(model, {"model.layers.3.self_attn.hook_z": Zero(heads=[0]),        # ablate a head
                           "model.layers.1.hook_resid_post": Add(direction)}):        # steer
        olmo_lab.generate(model, tok, "def f(x):", max_new_tokens=20)
    run_with(model, ids, {"model.layers.0.mlp.hook_routing": ForceRouting(["math"])})  # one call

Every edit is checked against the model before anything is attached (unknown points, heads or positions
out of range, a tensor of the wrong shape, dtype or device, an opted-out or unknown expert): a bad one
raises an `olmo_lab` error and leaves no hook behind. Edits are removed when the block exits, also on
an exception; several compose in the order given (and nested blocks apply outer edits first). They act
on every forward inside the block, cached generation steps included, and they change the function:
a KV cache built under other interventions is stale (the model refuses it; `generate` recomputes).

Where an edit acts. `positions`: absolute cache positions (0 = the first token of the sequence), or
negative ones counted from the end of each call (-1 = the newest token: the last prompt token at
prefill, then each generated token); None = every position. `heads`: query heads on hook_q, hook_pattern
and hook_z, key/value heads on hook_k and hook_v. An edit on `post_attention_layernorm.hook_out` acts
after the post-norm (on what the residual stream adds), one on `self_attn.hook_out` before it, so the
norm rescales it. How these relate to FlexOlmo's toggles: `Zero` on `mlp.experts.{e}.hook_out` is
exactly `experts_off(..., mode="drop")`; opt-out instead removes the expert before the softmax, which
`BiasRouter` with -inf approximates up to rounding, and `ForceRouting` chooses the experts outright.
"""

from __future__ import annotations

from contextlib import contextmanager
from itertools import count
from typing import Callable, Sequence

import torch

from ..errors import ExpertError, HookError
from ..modeling.experts import resolve_experts
from ..modeling.moe import Routing

_ids = count(1)  # a fresh id per intervention block: part of the model's KV-cache key


class Intervention:
    """Base class: where an edit acts (positions, heads) and how it is checked against a hook point."""

    def __init__(self, positions=None, heads=None):
        self.positions = _int_list(positions, "positions")
        self.heads = _int_list(heads, "heads")

    def bind(self, model, name: str) -> Callable:
        """Check this edit against the point `name` of `model`; return the hook function to attach."""
        info = model.hooks.info(name)
        if info.kind == "routing":
            raise HookError(f"{name}: {type(self).__name__} edits tensors; use ForceRouting on the routing decision")
        limit = model.config.max_position_embeddings
        for p in self.positions or ():
            if not -limit <= p < limit:
                raise HookError(f"{name}: position {p} is out of range for a context of {limit}")
        if self.heads is not None:
            if info.head_axis is None:
                raise HookError(f"{name} has no head axis; heads= applies to hook_q, hook_k, hook_v, hook_pattern "
                                "and hook_z")
            n = model.config.num_key_value_heads if name.endswith(("hook_k", "hook_v")) else \
                model.config.num_attention_heads
            bad = [h for h in self.heads if not 0 <= h < n]
            if bad:
                raise HookError(f"{name}: heads {bad} are out of range: this point has {n} heads (0..{n - 1})")
        self.info = info
        return self._hook

    def _hook(self, value, ctx):
        where = self.where(value, ctx)
        if where is not None and not bool(where.any()):
            return None
        new = self.edit(value, ctx)
        return new if where is None else torch.where(where, new, value)

    def edit(self, value: torch.Tensor, ctx) -> torch.Tensor:
        """The edited value everywhere; `_hook` keeps it only where the edit acts."""
        raise NotImplementedError

    def where(self, value: torch.Tensor, ctx) -> torch.Tensor | None:
        """A bool mask broadcastable to value: where the edit acts (None: everywhere)."""
        if self.positions is None and self.heads is None:
            return None
        shape = [1] * value.dim()
        mask = torch.ones((), dtype=torch.bool, device=value.device)
        if self.positions is not None:
            if self.info.position_axis is None:  # token-flattened rows: row = b * S + s
                rows = ctx.rows if ctx.rows is not None else torch.arange(value.shape[0], device=value.device)
                positions = ctx.past + rows % ctx.length
                axis, size = 0, value.shape[0]
            else:
                axis, size = self.info.position_axis, value.shape[self.info.position_axis]
                positions = torch.arange(ctx.past, ctx.past + size, device=value.device)
            end = ctx.past + ctx.length
            wanted = torch.tensor([p if p >= 0 else end + p for p in self.positions], device=value.device)
            shape[axis] = size
            mask = mask & torch.isin(positions, wanted).view(shape)
            shape[axis] = 1
        if self.heads is not None:
            axis = self.info.head_axis
            shape[axis] = value.shape[axis]
            heads = torch.zeros(value.shape[axis], dtype=torch.bool, device=value.device)
            heads[self.heads] = True
            mask = mask & heads.view(shape)
        return mask


class Zero(Intervention):
    """Zero-ablation: the selected entries become 0."""

    def edit(self, value, ctx):
        return torch.zeros_like(value)


class Scale(Intervention):
    """Multiply the selected entries by `factor` (a number)."""

    def __init__(self, factor: float, positions=None, heads=None):
        super().__init__(positions, heads)
        if isinstance(factor, bool) or not isinstance(factor, (int, float)):
            raise HookError(f"Scale: factor must be a number, got {type(factor).__name__}")
        self.factor = factor

    def edit(self, value, ctx):
        return value * self.factor


class _WithTensor(Intervention):
    """An edit carrying a tensor that must broadcast over the activation's trailing (feature) axes."""

    def __init__(self, tensor, positions=None, heads=None, what="tensor"):
        super().__init__(positions, heads)
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            raise HookError(f"{type(self).__name__}: {what} must be a floating-point tensor, got "
                            f"{type(tensor).__name__ if not isinstance(tensor, torch.Tensor) else tensor.dtype}")
        self.tensor = tensor

    def bind(self, model, name):
        fn = super().bind(model, name)
        if self.tensor.device != model.device or self.tensor.dtype != model.dtype:
            raise HookError(f"{name}: {type(self).__name__} needs a {model.dtype} tensor on {model.device} (the "
                            f"model's), got {self.tensor.dtype} on {self.tensor.device}")
        return fn

    def _feature(self, value):
        """The tensor, shaped to broadcast over the value's batch and position (or token) axes."""
        axis = self.info.position_axis
        features = tuple(value.shape[1:] if axis is None else
                         (value.shape[1], value.shape[3]) if axis == 2 else value.shape[2:])
        try:
            fits = self.tensor.dim() <= len(features) and \
                torch.broadcast_shapes(self.tensor.shape, features) == torch.Size(features)
        except RuntimeError:
            fits = False
        if not fits:
            raise HookError(f"{self.info.name}: a {tuple(self.tensor.shape)} tensor does not broadcast over this "
                            f"point's features {features}")
        tensor = self.tensor.to(value.device)  # a placed model's layer may sit on another GPU than its inputs
        return tensor.expand(features)[:, None, :] if axis == 2 else tensor  # (heads, 1, hd) for axis 2


class Add(_WithTensor):
    """Add a vector (e.g. a steering direction) to the selected entries: (H,) on residual points, (hd,)
    or (heads, hd) on per-head points."""

    def __init__(self, vector, positions=None, heads=None):
        super().__init__(vector, positions, heads, "vector")

    def edit(self, value, ctx):
        return value + self._feature(value)


class MeanAblate(_WithTensor):
    """Mean-ablation: the selected entries become `mean`, the activation's mean over a reference batch
    (see `mean_activation`), which keeps the entry's typical size and removes what the input told it."""

    def __init__(self, mean, positions=None, heads=None):
        super().__init__(mean, positions, heads, "mean")

    def edit(self, value, ctx):
        return self._feature(value).expand_as(value)


class Replace(Intervention):
    """Replace the selected entries by a tensor (e.g. from another run) or by fn(value, ctx).

    A tensor has the activation's exact shape, dtype and device for one call, or covers the whole
    sequence along its position axis (router logits: (B, S, E), as a trace returns them), of which each
    call takes its own positions."""

    def __init__(self, value, positions=None, heads=None):
        super().__init__(positions, heads)
        if not (isinstance(value, torch.Tensor) or callable(value)):
            raise HookError(f"Replace: expected a tensor or a function, got {type(value).__name__}")
        self.value = value

    def bind(self, model, name):
        fn = super().bind(model, name)
        v = self.value
        if isinstance(v, torch.Tensor) and (v.dtype != model.dtype or v.device != model.device):
            raise HookError(f"{name}: Replace needs a {model.dtype} tensor on {model.device}, got {v.dtype} on {v.device}")
        return fn

    def edit(self, value, ctx):
        if callable(self.value):
            new = self.value(value, ctx)
        else:
            new, axis = self.value, self.info.position_axis
            if axis is None and new.dim() == value.dim() + 1 and new.shape[1] >= ctx.past + ctx.length:
                # (B, S, ...) router logits, as a trace returns them -> this call's (T, ...) rows
                new = new.narrow(1, ctx.past, ctx.length).reshape(value.shape) if \
                    new.shape[0] * ctx.length == value.shape[0] else new
            elif axis is not None and new.dim() == value.dim() and new.shape[axis] != value.shape[axis] \
                    and new.shape[axis] >= ctx.past + ctx.length:
                new = new.narrow(axis, ctx.past, ctx.length)  # this call's positions of a whole-sequence tensor
            new = new.to(value.device)  # a placed model's layer may sit on another GPU than its inputs
        if not isinstance(new, torch.Tensor) or new.shape != value.shape or new.dtype != value.dtype \
                or new.device != value.device:
            got = f"{new.dtype} {tuple(new.shape)} on {new.device}" if isinstance(new, torch.Tensor) else \
                type(new).__name__
            raise HookError(f"{ctx.name}: Replace got {got}; expected {value.dtype} {tuple(value.shape)} "
                            f"on {value.device}")
        return new


class BiasRouter(Intervention):
    """Add a bias to the router logits (`mlp.gate.hook_out`) before the softmax: {expert: value} or (E,)."""

    def __init__(self, bias, positions=None):
        super().__init__(positions, None)
        self.bias = bias

    def bind(self, model, name):
        if not name.endswith("mlp.gate.hook_out"):
            raise HookError(f"BiasRouter acts on router logits (model.layers.{{i}}.mlp.gate.hook_out), not {name}")
        fn = super().bind(model, name)
        names = model.config.expert_names
        if isinstance(self.bias, dict):
            vec = torch.zeros(len(names))
            for expert, b in self.bias.items():  # each key resolved on its own: resolve_experts sorts
                vec[resolve_experts(names, expert)[0]] = b
        elif isinstance(self.bias, torch.Tensor) and self.bias.shape == (len(names),):
            vec = self.bias.float()
        else:
            raise HookError(f"BiasRouter: expected {{expert: bias}} or a ({len(names)},) tensor")
        self.vector = vec.to(model.dtype).to(model.device)
        return fn

    def edit(self, value, ctx):
        return value + self.vector.to(value.device)


class ForceRouting:
    """Route the selected tokens of one layer to chosen experts (`mlp.hook_routing`).

    experts: names or indices, in any order; they replace the router's top-k choice for those tokens
    (their count may differ from k). weights: None gives each expert the router's own softmax probability
    (over the enabled experts), renormalised over the forced ones when the model renormalises top-k
    (FlexOlmo does not), so forcing the experts the router chose anyway changes nothing; or explicit
    weights, one per expert, used as given. The record's `probs` stay the router's own. Forcing an
    opted-out, unknown or repeated expert raises ExpertError; a dropped expert still outputs nothing.
    """

    def __init__(self, experts, weights=None, positions=None):
        self.experts, self.weights = experts, weights
        self.positions = _int_list(positions, "positions")

    def bind(self, model, name):
        info = model.hooks.info(name)
        if info.kind != "routing":
            raise HookError(f"ForceRouting acts on a routing decision (model.layers.{{i}}.mlp.hook_routing), not {name}")
        names = model.config.expert_names
        listed = [self.experts] if isinstance(self.experts, (str, int)) else list(self.experts)
        idx = resolve_experts(names, listed)
        if len(idx) != len(listed):
            raise ExpertError(f"ForceRouting: an expert is named twice in {listed}")
        moe = model.model.layers[info.layer].mlp
        off = [names[e] for e in idx if e in moe.opted_out]
        if off:
            raise ExpertError(f"ForceRouting: {off} are opted out in layer {info.layer}; an opted-out expert cannot "
                              "be chosen (switch it back on, or use mode='drop')")
        self.index = torch.tensor(idx, device=model.device)
        if self.weights is not None:
            w = torch.as_tensor(self.weights, dtype=torch.float32)
            if w.shape != (len(idx),) or not bool(torch.isfinite(w).all()):
                raise HookError(f"ForceRouting: expected {len(idx)} finite weights, one per expert, got {self.weights!r}")
            self.fixed = w.to(model.device)
        self.moe = moe
        limit = model.config.max_position_embeddings
        for p in self.positions or ():
            if not -limit <= p < limit:
                raise HookError(f"{name}: position {p} is out of range for a context of {limit}")
        return self._hook

    def _hook(self, r: Routing, ctx) -> Routing | None:
        T = r.topk_indices.shape[0]
        rows = torch.arange(T, device=r.topk_indices.device)
        if self.positions is not None:
            end = ctx.past + ctx.length
            wanted = torch.tensor([p if p >= 0 else end + p for p in self.positions], device=rows.device)
            rows = rows[torch.isin(ctx.past + rows % ctx.length, wanted)]
        if rows.numel() == 0:
            return None
        index = self.index.to(rows.device)  # a placed model's layer may sit on another GPU than its inputs
        if self.weights is None:  # the router's probabilities, ordered by weight as top-k orders them
            w = r.probs[rows][:, index]  # (n, k')
            w, order = w.sort(dim=-1, descending=True, stable=True)
            chosen = index[order]
            if self.moe.norm_topk_prob:
                w = w / w.sum(dim=-1, keepdim=True)
        else:
            w, chosen = self.fixed.to(rows.device).expand(len(rows), -1), index.expand(len(rows), -1)
        k = max(r.topk_indices.shape[1], chosen.shape[1])
        idx = _pad(r.topk_indices, k, r.topk_indices[:, :1])  # unused slots: weight 0
        weights = _pad(r.topk_weights, k, torch.zeros_like(r.topk_weights[:, :1]))
        idx[rows] = _pad(chosen, k, chosen[:, :1])
        weights[rows] = _pad(w.to(weights.dtype), k, torch.zeros_like(weights[rows][:, :1]))
        if self.moe.dropped:
            weights = weights.masked_fill(torch.isin(idx, torch.tensor(sorted(self.moe.dropped), device=idx.device)), 0)
        return Routing(r.logits, r.probs, idx, weights)


def _pad(t: torch.Tensor, k: int, fill: torch.Tensor) -> torch.Tensor:
    """(T, j) -> (T, k) with `fill` (T, 1) in the extra columns."""
    return t.clone() if t.shape[1] == k else torch.cat([t, fill.expand(-1, k - t.shape[1])], dim=1)


def _int_list(x, what: str) -> list[int] | None:
    if x is None:
        return None
    items = [x] if isinstance(x, int) else x
    if not isinstance(items, (Sequence, range, torch.Tensor)) or isinstance(items, str):
        raise HookError(f"{what}: expected an int or a list of ints, got {type(x).__name__}")
    items = items.tolist() if isinstance(items, torch.Tensor) else list(items)
    if not items or any(isinstance(i, bool) or not isinstance(i, int) for i in items):
        raise HookError(f"{what}: expected a non-empty list of ints, got {x!r}")
    return items


def _bind_all(model, edits) -> list[tuple[str, Callable]]:
    """[(point, hook function)] for every edit, all checked before anything is attached."""
    pairs = list(edits.items()) if isinstance(edits, dict) else list(edits)
    bound = []
    for pair in pairs:
        if not (isinstance(pair, tuple) and len(pair) == 2):
            raise HookError("interventions: expected {point: edit} or [(point, edit), ...]")
        name, edit = pair
        model.hooks.info(name)
        if hasattr(edit, "bind"):
            bound.append((name, edit.bind(model, name)))
        elif callable(edit):
            bound.append((name, edit))
        else:
            raise HookError(f"{name}: expected an Intervention or a function fn(value, ctx), got {type(edit).__name__}")
    return bound


@contextmanager
def intervene(model, edits):
    """Apply {point: edit} (Interventions or functions fn(value, ctx) -> new value | None) inside the block."""
    bound = _bind_all(model, edits)
    handles, key = [], next(_ids)
    before = model._interventions
    try:
        for name, fn in bound:
            handles.append(model.hooks.add(name, fn))
        model._interventions = before + (key,)
        yield model
    finally:
        for handle in handles:
            handle.remove()
        model._interventions = tuple(k for k in model._interventions if k != key)


def run_with(model, input_ids: torch.Tensor, edits, **forward_kwargs):
    """One forward pass under `edits`; positions are checked against this input's length."""
    length = input_ids.shape[-1] if isinstance(input_ids, torch.Tensor) else 0
    items = edits.values() if isinstance(edits, dict) else [e for _, e in edits]
    for edit in items:
        bad = [p for p in getattr(edit, "positions", None) or () if not -length <= p < length]
        if bad:
            raise HookError(f"positions {bad} are out of range for an input of {length} tokens")
    with intervene(model, edits):
        return model(input_ids, **forward_kwargs)


@torch.no_grad()
def mean_activation(model, input_ids: torch.Tensor, name: str, attention_mask=None) -> torch.Tensor:
    """A hook point's mean over a reference batch's tokens (batch and positions): the feature-shaped
    tensor `MeanAblate` and steering directions use, in the model's dtype."""
    from .trace import trace

    with trace(model, attention=False, routing=False, hooks=[name]) as tr:
        model(input_ids, attention_mask=attention_mask)
    value, info = tr[name].to(model.device), model.hooks.info(name)
    if info.position_axis is None:  # token rows (T, ...)
        rows = value.reshape(-1, value.shape[-1])
    elif info.position_axis == 2:  # (B, heads, S, hd) -> (B * S, heads, hd)
        rows = value.transpose(1, 2).reshape(-1, value.shape[1], value.shape[3])
    else:  # (B, S, ...) -> (B * S, ...)
        rows = value.reshape(-1, *value.shape[2:])
    if attention_mask is not None and rows.shape[0] == attention_mask.numel():  # padding does not count
        rows = rows[attention_mask.reshape(-1).bool()]
    return rows.float().mean(0).to(model.dtype)
