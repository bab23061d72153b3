"""Named hook points: one mechanism for reading and writing a model's intermediate tensors.

    model.hook_points()                                   # every name, in forward order
    model.hook_points("hook_z")                           # names containing "hook_z"
    handle = model.hooks.add("model.layers.2.self_attn.hook_z", fn)   # fn(value, ctx) -> None | new value
    handle.remove()

Points are named after the checkpoint's modules (`model.layers.{i}.self_attn...`) with a `hook_*` leaf:

    model.layers.{i}.hook_resid_pre                       (B, S, H)   the block's input
    model.layers.{i}.self_attn.hook_q / hook_k / hook_v   (B, heads, S, hd)  post-RoPE; k, v: key/value heads,
                                                          this call's tokens (what goes into the KV cache)
    model.layers.{i}.self_attn.hook_pattern               (B, heads, S, keys) attention probabilities
    model.layers.{i}.self_attn.hook_z                     (B, S, heads, hd) per-head outputs before o_proj
    model.layers.{i}.self_attn.hook_out                   (B, S, H)   o_proj's output, before the post-norm
    model.layers.{i}.post_attention_layernorm.hook_out    (B, S, H)   after it: what the residual adds
    model.layers.{i}.hook_resid_mid                       (B, S, H)
    model.layers.{i}.mlp.hook_out                         (B, S, H)   feed-forward output, before its post-norm
    model.layers.{i}.post_feedforward_layernorm.hook_out  (B, S, H)
    model.layers.{i}.hook_resid_post                      (B, S, H)   the block's output
    FlexOlmo only:
    model.layers.{i}.mlp.gate.hook_out                    (T, E) router logits, T = B * S tokens (row b * S + s)
    model.layers.{i}.mlp.hook_routing                     a `moe.Routing`: top-k indices and weights
    model.layers.{i}.mlp.experts.{e}.hook_out             (n, H) expert e's unweighted output on its n tokens

A function attached to a point is called with the value and a `HookContext` (where in the sequence this
call is), and returns None to only read it, or a value of the same shape, dtype and device to replace it.
A module whose points have nothing attached holds `_hooks = None`, so an idle point costs one `is None`
check. `olmo_lab.trace` reads through these points and `olmo_lab.interventions` writes through them.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import HookError


@dataclass(frozen=True)
class PointInfo:
    """What a hook point carries: its axes (None where it has none) and what the value is."""

    name: str
    layer: int
    position_axis: int | None  # the sequence axis (None for token-flattened values)
    head_axis: int | None
    kind: str = "tensor"  # "tensor", "routing" (a Routing), "tokens" (rows of flattened tokens)


@dataclass
class HookContext:
    """Where a hook is called: the point, the layer, and which cache positions this call covers.

    positions: the absolute cache index of each of this call's S tokens (past .. past + S - 1);
    kv_start: cache index of the first key (hook_pattern's key axis starts there);
    rows: for token-flattened points (router, routing, experts) the flattened token row (b * S + s) of
    each value row (experts: only the tokens routed to that expert).
    """

    name: str
    layer: int
    past: int
    batch: int
    length: int
    kv_start: int = 0
    rows: torch.Tensor | None = None

    @property
    def positions(self) -> range:
        return range(self.past, self.past + self.length)


class Hooks:
    """The functions attached to one module's hook points ({local point: [fn, ...]})."""

    def __init__(self, registry: "HookRegistry", prefix: str, layer: int):
        self.registry, self.prefix, self.layer = registry, prefix, layer
        self.fns: dict[str, list[Callable]] = {}

    def __contains__(self, key: str) -> bool:
        return key in self.fns

    def run(self, key: str, value, **where):
        """Call every function on `key` in order; each may replace the value (checked against it)."""
        fns = self.fns.get(key)
        if not fns:
            return value
        call = self.registry.call
        name = self.prefix + key
        ctx = HookContext(name, self.layer, call[0], call[1], call[2], **where)
        for fn in fns:
            out = fn(value, ctx)
            if out is not None:
                check_replacement(name, value, out)
                value = out
        return value


def check_replacement(name: str, old, new) -> None:
    """A replacement must look exactly like the value it replaces."""
    if isinstance(old, torch.Tensor):
        if not isinstance(new, torch.Tensor):
            raise HookError(f"{name}: a hook returned {type(new).__name__}; expected a tensor or None")
        if new.shape != old.shape or new.dtype != old.dtype or new.device != old.device:
            raise HookError(f"{name}: a hook returned a {new.dtype} tensor of shape {tuple(new.shape)} on {new.device}; "
                            f"expected {old.dtype} of shape {tuple(old.shape)} on {old.device}")
    elif type(new) is not type(old):
        raise HookError(f"{name}: a hook returned {type(new).__name__}; expected {type(old).__name__} or None")


class Handle:
    """Returned by `HookRegistry.add`; `remove()` detaches the function (idempotent)."""

    def __init__(self, registry, name, fn):
        self.registry, self.name, self.fn = registry, name, fn

    def remove(self) -> None:
        self.registry._detach(self.name, self.fn)


class HookRegistry:
    """Every hook point of one model: listing, attaching, detaching, and the current call's whereabouts."""

    def __init__(self, model):
        # No reference back to the model: a model that fails to load must be freed without the garbage collector.
        self.points: dict[str, tuple[torch.nn.Module, str, PointInfo]] = {}  # name -> (owner, local key, info)
        self.call: tuple[int, int, int] = (0, 0, 0)  # (past, batch, length) of the forward running now
        self.listeners: list = []  # objects with begin(ids, mask, past, cache) and end(ok): see `trace`
        self.attached = 0
        for i, block in enumerate(model.model.layers):
            p = f"model.layers.{i}."
            owners = [(block, p, ["hook_resid_pre"], 1, None)]
            attn = block.self_attn
            owners += [(attn, p + "self_attn.", ["hook_q", "hook_k", "hook_v", "hook_pattern"], 2, 1),
                       (attn, p + "self_attn.", ["hook_z"], 1, 2),
                       (block, p, ["self_attn.hook_out", "post_attention_layernorm.hook_out", "hook_resid_mid",
                                   "mlp.hook_out", "post_feedforward_layernorm.hook_out", "hook_resid_post"], 1, None)]
            for owner, prefix, keys, pos, head in owners:
                for key in keys:
                    self._add_point(owner, prefix, key, PointInfo(prefix + key, i, pos, head))
            if model.config.is_moe:
                moe = block.mlp
                self._add_point(moe, p + "mlp.", "gate.hook_out", PointInfo(p + "mlp.gate.hook_out", i, None, None,
                                                                            "tokens"))
                self._add_point(moe, p + "mlp.", "hook_routing", PointInfo(p + "mlp.hook_routing", i, None, None,
                                                                           "routing"))
                for e in range(moe.num_experts):
                    key = f"experts.{e}.hook_out"
                    self._add_point(moe, p + "mlp.", key, PointInfo(p + "mlp." + key, i, None, None, "tokens"))

    def _add_point(self, owner, prefix, key, info):
        owner._hook_prefix = prefix
        self.points[info.name] = (owner, key, info)

    # ------------------------------------------------------------------ reading the registry
    def names(self, contains: str | None = None) -> list[str]:
        """Every point name in forward order, or those containing `contains` (a substring or a regex)."""
        if contains is None:
            return list(self.points)
        pattern = re.compile(re.escape(contains)) if re.escape(contains) == contains else re.compile(contains)
        return [n for n in self.points if pattern.search(n)]

    def info(self, name: str) -> PointInfo:
        return self._lookup(name)[2]

    def _lookup(self, name: str):
        if not isinstance(name, str):
            raise HookError(f"hook point names are strings, got {type(name).__name__}")
        if name not in self.points:
            near = difflib.get_close_matches(name, self.points, n=1, cutoff=0.6)
            hint = f"; did you mean {near[0]!r}?" if near else "; model.hook_points() lists them"
            raise HookError(f"unknown hook point {name!r}{hint}")
        return self.points[name]

    # ------------------------------------------------------------------ attaching
    def add(self, name: str, fn: Callable) -> Handle:
        """Attach fn(value, ctx) -> None | replacement to a point; returns a handle to remove it."""
        owner, key, info = self._lookup(name)
        if not callable(fn):
            raise HookError(f"{name}: expected a function fn(value, ctx), got {type(fn).__name__}")
        if owner._hooks is None:
            owner._hooks = Hooks(self, owner._hook_prefix, info.layer)
        owner._hooks.fns.setdefault(key, []).append(fn)
        self.attached += 1
        return Handle(self, name, fn)

    def _detach(self, name: str, fn) -> None:
        owner, key, _ = self.points[name]
        fns = owner._hooks.fns.get(key, []) if owner._hooks is not None else []
        if any(f is fn for f in fns):
            fns[:] = [f for f in fns if f is not fn]
            self.attached -= 1
            if not fns:
                del owner._hooks.fns[key]
            if not owner._hooks.fns:
                owner._hooks = None

    def clear(self) -> None:
        """Detach everything (every point idle again)."""
        for owner, _, _ in self.points.values():
            owner._hooks = None
        self.attached = 0

    @property
    def active(self) -> bool:
        return bool(self.attached or self.listeners)

    # ------------------------------------------------------------------ the forward pass's side
    def begin(self, input_ids, attention_mask, past: int, cache) -> None:
        """Called by the model after validating its inputs, before any layer runs."""
        self.call = (past, input_ids.shape[0], input_ids.shape[1])
        for listener in self.listeners:
            listener.begin(input_ids, attention_mask, past, cache)

    def end(self, ok: bool) -> None:
        """Called by the model when the forward returns (ok) or raises."""
        for listener in self.listeners:
            listener.end(ok)
