"""How every checker grades: run the student's code on fixed cases, compare with the library, name the mistake.

A checker builds a few `Case`s (random inputs chosen so that each known mistake shows, plus cases on
the shipped lab weights), the library's answer for each, and the answer each known `Mistake` gives.
The verdict is "correct" when the student's outputs agree with the library's on every case; else the
known mistake whose outputs the student's reproduce on every case (its signature); else the first
place where the outputs diverge, and by how much.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

NOT_DONE = "not done yet"


@dataclass
class Verdict:
    """A checker's answer: shown as one short line (or a few) in a notebook."""

    exercise: str
    status: str  # "correct", "mistake", "diverges", "error" or "not done"
    message: str
    mistake: str | None = None  # the key of the known mistake, when one was recognised

    @property
    def correct(self) -> bool:
        return self.status == "correct"

    def __repr__(self) -> str:
        mark = {"correct": "✓", "not done": "·"}.get(self.status, "✗")
        return f"{mark} {self.exercise}: {self.message}"

    __str__ = __repr__


@dataclass
class Mistake:
    """A known mistake: a short key, what it is (shown to the student), and an implementation of it."""

    key: str
    description: str
    run: Callable[..., Any]


@dataclass
class Case:
    """One input of a check: its name (shown when it diverges) and the arguments the code is called with."""

    name: str
    args: tuple
    kwargs: dict = field(default_factory=dict)


def flatten(out, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    """A tensor, or a (nested) tuple/list/dict of tensors -> [(name, tensor)] in a fixed order."""
    if isinstance(out, torch.Tensor):
        return [(prefix or "output", out)]
    if isinstance(out, dict):
        return [pair for k in sorted(out) for pair in flatten(out[k], f"{prefix}[{k!r}]")]
    if isinstance(out, (tuple, list)):
        return [pair for i, v in enumerate(out) for pair in flatten(v, f"{prefix}[{i}]")]
    raise TypeError(f"expected tensors, got {type(out).__name__}")


def _close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, loose: bool = False, tol: float = 1e-5) -> bool:
    """Do two results computed in `dtype` (given as float64 copies) agree up to harmless rounding?

    fp32: within tol (1e-5) of the reference's scale. Lower precision: at most 1% of the entries differ, each
    by at most two units in the last place: an equivalent order of operations, not a different rounding
    of every value (which is what a missing fp32 upcast does). Loose: every entry within 8 units in the
    last place (10 tol of the scale in fp32).
    """
    if a.numel() == 0:
        return True
    scale = b.abs().max().clamp_min(1e-30)
    if dtype in (torch.float32, torch.float64):
        return bool(((a - b).abs() <= (10 * tol if loose else tol) * scale + 1e-6 * b.abs()).all())
    eps = torch.finfo(dtype).eps
    if loose:
        return bool(((a - b).abs() <= 8 * eps * (b.abs() + 1e-2 * scale)).all())
    off = (a - b).abs() > 1e-6 * scale
    if not bool(off.any()):
        return True
    within_two_ulps = bool(((a - b).abs() <= 2 * eps * b.abs().clamp_min(torch.finfo(dtype).tiny)).all())
    return within_two_ulps and off.float().mean().item() <= 0.01


def same(a, b, loose: bool = False, tol: float = 1e-5) -> bool:
    """Two outputs (tensors or nests of them) agree entry for entry (see `_close`)."""
    fa, fb = flatten(a), flatten(b)
    if [n for n, _ in fa] != [n for n, _ in fb]:
        return False
    for (_, x), (_, y) in zip(fa, fb):
        if x.shape != y.shape or x.dtype != y.dtype:
            return False
        if not x.is_floating_point():
            if not torch.equal(x.cpu(), y.cpu()):
                return False
            continue
        x64, y64 = x.detach().double().cpu(), y.detach().double().cpu()
        if bool((x64.isnan() != y64.isnan()).any()) or bool((x64.isinf() != y64.isinf()).any()):
            return False
        finite = x64.isfinite() & y64.isfinite()
        if not _close(x64[finite], y64[finite], y.dtype, loose, tol):
            return False
    return True


def describe_difference(case: str, yours, library, tol: float = 1e-5) -> str:
    """Where yours first departs from the library's output (row-major order), and by how much overall."""
    fa, fb = flatten(yours), flatten(library)
    names_a = [n for n, _ in fa]
    names_b = [n for n, _ in fb]
    if names_a != names_b:
        return f"on {case}: your code returns {', '.join(names_a)}; expected {', '.join(names_b)}"
    for (name, x), (_, y) in zip(fa, fb):
        what = "" if name == "output" else f"{name} "
        if x.shape != y.shape:
            return f"on {case}: {what}has shape {tuple(x.shape)}, expected {tuple(y.shape)}"
        if x.dtype != y.dtype:
            return f"on {case}: {what}has dtype {x.dtype}, expected {y.dtype}"
        if same(x, y, tol=tol):
            continue
        x64, y64 = x.detach().double().cpu(), y.detach().double().cpu()
        diff = (x64 - y64).abs().nan_to_num(float("inf"))
        diff[x64.isnan() & y64.isnan()] = 0
        bad = diff > tol * y64.abs().nan_to_num().max().clamp_min(1e-30)
        first = tuple(int(i) for i in bad.nonzero()[0]) if bad.any() else tuple(int(i) for i in (diff == diff.max()).nonzero()[0])
        share = bad.float().mean().item()
        return (f"on {case}: {what}first differs at index {list(first)}: yours {x64[first].item():.6g}, "
                f"library {y64[first].item():.6g}; max |difference| {diff.max().item():.3g}, "
                f"in {share:.0%} of the entries")
    return f"on {case}: the outputs differ"


def call(fn, case: Case):
    """Run fn on a case, without gradients, on fresh copies of tensor arguments (so nothing leaks between)."""
    def fresh(v):
        return v.clone() if isinstance(v, torch.Tensor) else v
    with torch.no_grad():
        return fn(*map(fresh, case.args), **{k: fresh(v) for k, v in case.kwargs.items()})


def grade(exercise: str, student, reference, cases: list[Case], mistakes: list[Mistake],
          tol: float = 1e-5) -> Verdict:
    """The verdict on `student` (a callable) over `cases`: correct, a known mistake, or where it diverges.

    `reference` computes the library's answer. A mistake is named when the student's outputs agree with
    its outputs on every case, loosely (`_close`): a student's version of a mistake rounds differently
    from ours when its low-precision math runs in another order. `tol` is the fp32 tolerance.
    """
    yours = []
    for case in cases:
        try:
            yours.append(call(student, case))
        except NotImplementedError:
            return Verdict(exercise, "not done", NOT_DONE)
        except Exception as e:  # the student's code crashed: say where, briefly
            first_line = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
            return Verdict(exercise, "error", f"on {case.name}: your code raised {type(e).__name__}: {first_line}")
        try:
            flatten(yours[-1])
        except TypeError as e:  # None (a forgotten return), a number, ...
            return Verdict(exercise, "error", f"on {case.name}: your code's output: {e}")
    expected = _outputs("library", reference, cases)
    first_wrong = next((i for i, (y, e) in enumerate(zip(yours, expected)) if not _safe_same(y, e, tol=tol)), None)
    if first_wrong is None:
        where = "its one case" if len(cases) == 1 else f"all {len(cases)} cases"
        return Verdict(exercise, "correct", f"correct: agrees with olmo_lab on {where}")
    for m in mistakes:
        try:
            predicted = _outputs(m.key, m.run, cases)
        except Exception:  # a mistake that cannot run on some case cannot be its signature
            continue
        if all(_safe_same(y, p, loose=True, tol=tol) for y, p in zip(yours, predicted)):
            return Verdict(exercise, "mistake", f"known mistake: {m.description}", m.key)
    return Verdict(exercise, "diverges",
                   describe_difference(cases[first_wrong].name, yours[first_wrong], expected[first_wrong], tol))


_MEMO: dict = {}


def _outputs(key: str, fn, cases: list[Case]) -> list:
    """fn's outputs on the cases, computed once per (checker, case list): the library's and each mistake's
    answers do not change between calls, and the cases of a checker are built once."""
    memo_key = (id(cases), key)
    if memo_key not in _MEMO:
        _MEMO[memo_key] = (cases, [call(fn, case) for case in cases])  # keeps `cases` alive: its id stays unique
    return _MEMO[memo_key][1]


def _safe_same(a, b, loose: bool = False, tol: float = 1e-5) -> bool:
    try:
        return same(a, b, loose, tol)
    except TypeError:
        return False
