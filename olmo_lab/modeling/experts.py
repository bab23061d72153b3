"""Switching FlexOlmo experts off and on at inference time, by name or index, per layer or everywhere.

    model.experts.disable("math")                 # opt-out everywhere (FlexOlmo's semantics)
    model.experts.disable(1, layers=[0, 1], mode="drop")
    with olmo_lab.experts_off(model, ["math"]):   # restored on exit, even after an error
        ...
    model.experts.state()                         # {"math": "opted out", ...} per layer

Modes (see `olmo_lab.moe`):
- "opt_out": the expert is removed before the softmax and top-k; the result equals a model that
  never had it. A top-k larger than the number of enabled experts uses all enabled ones.
- "drop": routing is unchanged; the expert's weighted output is zeroed, weights not renormalised.
Every call checks everything before changing anything: an unknown name, an index out of range, an
unknown mode, a toggle that would leave a layer with no expert, or a snapshot that does not fit this
model raises `ExpertError` and leaves the toggles (and the key that guards KV caches) exactly as they
were. `experts_off` blocks may nest, and even be exited in another order than entered: each exit
undoes exactly the change its own block made.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Sequence

from ..errors import ExpertError

MODES = ("opt_out", "drop")
ON, OPTED_OUT, DROPPED = "on", "opted out", "dropped"


class ExpertToggles:
    """The expert switchboard of one FlexOlmo model."""

    def __init__(self, model):
        self._model = model

    # ------------------------------------------------------------------ reading
    @property
    def names(self) -> list[str]:
        return list(self._model.config.expert_names)

    @property
    def layers(self):
        return [block.mlp for block in self._model.model.layers]

    def state(self) -> dict[str, list[str]]:
        """{expert name: per-layer status ("on", "opted out" or "dropped")}."""
        out = {}
        for e, name in enumerate(self.names):
            out[name] = [OPTED_OUT if e in m.opted_out else DROPPED if e in m.dropped else ON for m in self.layers]
        return out

    def enabled(self, layer: int = 0) -> list[str]:
        """Names of the experts fully on in a layer."""
        m = self.layers[self._resolve_layers([layer])[0]]
        return [n for e, n in enumerate(self.names) if e not in m.opted_out and e not in m.dropped]

    def summary(self) -> str:
        """One line per expert: on everywhere, or where it is off and how."""
        lines = []
        for name, per_layer in self.state().items():
            kinds = set(per_layer)
            if kinds == {ON}:
                lines.append(f"{name}: on")
            elif len(kinds) == 1:
                lines.append(f"{name}: {per_layer[0]} in all layers")
            else:
                off = [f"{i}:{s}" for i, s in enumerate(per_layer) if s != ON]
                lines.append(f"{name}: off in layers {', '.join(off)}")
        return "\n".join(lines)

    # ------------------------------------------------------------------ changing
    def disable(self, experts, layers: Iterable[int] | None = None, mode: str = "opt_out") -> "ExpertToggles":
        """Switch experts off (see the module docstring for the two modes)."""
        if mode not in MODES:
            raise ExpertError(f"mode: unknown toggle mode {mode!r} (expected 'opt_out' or 'drop')")
        idx, lay = self.resolve(experts), self._resolve_layers(layers)
        new = {}
        for li in lay:
            m = self.layers[li]
            opted, dropped = set(m.opted_out), set(m.dropped)
            for e in idx:
                (opted if mode == "opt_out" else dropped).add(e)
                (dropped if mode == "opt_out" else opted).discard(e)
            if len(opted | dropped) >= m.num_experts:
                raise ExpertError(f"cannot disable {self._describe(idx)} in layer {li}: no expert would be left "
                                  f"enabled (at least one of {self.names} must stay on)")
            new[li] = (frozenset(opted), frozenset(dropped))
        self._apply(new)
        return self

    def enable(self, experts="all", layers: Iterable[int] | None = None) -> "ExpertToggles":
        """Switch experts back on ("all" for every expert)."""
        idx = list(range(len(self.names))) if experts == "all" else self.resolve(experts)
        new = {li: (self.layers[li].opted_out - set(idx), self.layers[li].dropped - set(idx))
               for li in self._resolve_layers(layers)}
        self._apply(new)
        return self

    def reset(self) -> "ExpertToggles":
        """Every expert on in every layer."""
        return self.enable("all")

    def snapshot(self) -> dict[int, tuple[frozenset, frozenset]]:
        """{layer: (opted-out experts, dropped experts)}, for `restore`."""
        return {li: (m.opted_out, m.dropped) for li, m in enumerate(self.layers)}

    def restore(self, snap: dict[int, tuple[frozenset, frozenset]]) -> None:
        """Set every layer's toggles from a snapshot: all of them, or (ExpertError) none."""
        self._check_snapshot(snap)
        self._apply(snap)

    def _check_snapshot(self, snap) -> None:
        n, names = len(self.layers), self.names
        if not isinstance(snap, dict) or set(snap) != set(range(n)):
            keys = sorted(snap, key=repr) if isinstance(snap, dict) else type(snap).__name__
            raise ExpertError(f"snapshot: expected one entry per layer 0..{n - 1} of this model (is it another "
                              f"model's?), got {keys!r:.100}")
        for li in range(n):
            entry = snap[li]
            if not (isinstance(entry, tuple) and len(entry) == 2 and all(isinstance(x, (set, frozenset)) for x in entry)
                    and all(isinstance(e, int) and not isinstance(e, bool) and 0 <= e < len(names)
                            for x in entry for e in x)):
                raise ExpertError(f"snapshot: layer {li}: expected (opted-out, dropped) sets of expert indices "
                                  f"0..{len(names) - 1}, got {entry!r:.100}")
            if entry[0] & entry[1]:
                raise ExpertError(f"snapshot: layer {li}: experts {sorted(entry[0] & entry[1])} are both opted "
                                  f"out and dropped")
            if len(entry[0] | entry[1]) >= len(names):
                raise ExpertError(f"snapshot: layer {li}: it switches every expert off (at least one of {names} "
                                  f"must stay on)")

    # ------------------------------------------------------------------ helpers
    def resolve(self, experts) -> list[int]:
        """Names and/or indices -> sorted unique indices; ExpertError for anything unknown."""
        return resolve_experts(self.names, experts)

    def _resolve_layers(self, layers) -> list[int]:
        return resolve_layers(len(self.layers), layers, ExpertError)

    def _describe(self, idx) -> str:
        return ", ".join(repr(self.names[e]) for e in idx)

    def _apply(self, new: dict[int, tuple[frozenset, frozenset]]) -> None:
        for li, (opted, dropped) in new.items():
            self.layers[li].opted_out, self.layers[li].dropped = frozenset(opted), frozenset(dropped)
        self._model.toggles_changed()


@dataclass
class _Block:
    """One active `experts_off` block: the toggles on entry and right after its own change."""

    before: dict
    after: dict

    def changed(self) -> set[tuple[int, int]]:
        return {(li, e) for li in self.before for e in _experts_in(self.before, self.after, li)
                if _status(self.before, li, e) != _status(self.after, li, e)}


_ACTIVE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its active blocks, oldest first


@contextmanager
def experts_off(model, experts, layers: Iterable[int] | None = None, mode: str = "opt_out"):
    """Switch experts off inside a `with` block; the previous toggles come back on exit.

    Blocks nest. Exited in the order entered (the usual case) the toggles on entry come back exactly;
    exited out of order, a block undoes only its own change, and blocks still open keep theirs.
    """
    toggles = model.experts
    before = toggles.snapshot()
    toggles.disable(experts, layers=layers, mode=mode)
    block = _Block(before, toggles.snapshot())
    active = _ACTIVE.setdefault(model, [])
    active.append(block)
    try:
        yield model
    finally:
        _leave(toggles, active, block)


def _leave(toggles: ExpertToggles, active: list, block: _Block) -> None:
    index = next(i for i, b in enumerate(active) if b is block)
    later = active[index + 1:]
    del active[index]
    if not later:  # the innermost block: back to the toggles on entry
        toggles.restore(block.before)
        return
    mine = block.changed()
    theirs = set().union(*(b.changed() for b in later))
    for b in later:  # their snapshots were taken with this block's change in effect: take it out
        own = b.changed()
        for li, e in mine:
            if _status(b.before, li, e) != _status(block.after, li, e):
                continue  # changed again in between: not this block's to take back
            old = _status(block.before, li, e)
            b.before = _with_status(b.before, li, e, old)
            if (li, e) not in own:
                b.after = _with_status(b.after, li, e, old)
    now = toggles.snapshot()
    for li, e in mine - theirs:  # undo this block's change where no later block changed the same expert
        if _status(now, li, e) == _status(block.after, li, e):
            now = _with_status(now, li, e, _status(block.before, li, e))
    toggles.restore(now)  # only switches experts back on: every layer keeps an enabled expert


def _experts_in(a: dict, b: dict, li: int) -> set[int]:
    return set().union(*a[li], *b[li])


def _status(snap: dict, li: int, e: int) -> str:
    opted, dropped = snap[li]
    return OPTED_OUT if e in opted else DROPPED if e in dropped else ON


def _with_status(snap: dict, li: int, e: int, status: str) -> dict:
    opted, dropped = snap[li]
    opted, dropped = opted - {e}, dropped - {e}
    if status == OPTED_OUT:
        opted |= {e}
    elif status == DROPPED:
        dropped |= {e}
    return {**snap, li: (frozenset(opted), frozenset(dropped))}


def resolve_experts(names: list[str], experts) -> list[int]:
    """Expert names and/or indices -> sorted unique indices; ExpertError naming anything unknown."""
    if isinstance(experts, (str, int)):
        experts = [experts]
    if not isinstance(experts, (Sequence, set, frozenset)):
        raise ExpertError(f"experts: expected a name, an index or a list of them, got {type(experts).__name__}")
    out = set()
    for x in experts:
        if isinstance(x, bool) or not isinstance(x, (str, int)):
            raise ExpertError(f"expert {x!r}: expected a name (str) or an index (int)")
        if isinstance(x, str):
            if x not in names:
                near = [n for n in names if n.lower() == x.lower()]
                hint = f"did you mean {near[0]!r}? " if near else ""
                raise ExpertError(f"unknown expert name {x!r:.80}; {hint}this model's experts are {names}")
            out.add(names.index(x))
        elif not 0 <= x < len(names):
            raise ExpertError(f"expert index {x} is out of range: this model has {len(names)} experts "
                              f"(0..{len(names) - 1})")
        else:
            out.add(x)
    if not out:
        raise ExpertError("experts: the list of experts is empty")
    return sorted(out)


def resolve_layers(n: int, layers, error=ExpertError, what: str = "layer") -> list[int]:
    """None (every layer), an index or a list of them (negative ones from the end) -> sorted unique indices;
    `error` naming anything that is not an int in -n..n-1."""
    if layers is None:
        return list(range(n))
    if isinstance(layers, int):
        layers = [layers]
    out = []
    for li in layers:
        if isinstance(li, bool) or not isinstance(li, int) or not -n <= li < n:
            raise error(f"{what} {li!r} is out of range: this model has {n} layers (0..{n - 1})")
        out.append(li % n)
    return sorted(set(out))
