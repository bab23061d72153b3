"""A checkpoint sweep: one metric over a model's training revisions, loading one revision at a time.

    sweep = checkpoint_sweep("allenai/Olmo-3-1025-7B", lambda model, tok: {"loss": loss_on(model, tok, text)},
                             revisions=olmo_lab.revisions.list_revisions("allenai/Olmo-3-1025-7B")[::100])
    print(sweep.table()); sweep.frame()   # a tidy table: revision, stage, step, tokens, one column per metric

The metric gets each revision's model and tokenizer and returns a number or a {name: number} dict (a
head's induction score, a domain's loss or routing share, ...). Only one revision is in memory at a
time: the previous model is released before the next one is read.
"""

from __future__ import annotations

import gc
import math
import numbers
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from ..checkpoints.checkpoint import load_model
from ..checkpoints.revisions import list_revisions, parse, training_order
from ..checkpoints.tokenizer import load_tokenizer
from ..errors import InputError


@dataclass
class Sweep:
    """One row per revision, oldest first: revision, stage, step, tokens and the metric's values."""

    rows: list[dict] = field(default_factory=list)

    @property
    def metrics(self) -> list[str]:
        return [k for k in self.rows[0] if k not in ("revision", "stage", "step", "tokens")] if self.rows else []

    def frame(self):
        """The rows as a pandas DataFrame (pandas: `pip install 'olmo-lab[scale]'`)."""
        import pandas as pd
        return pd.DataFrame(self.rows)

    def table(self) -> str:
        """The rows as text, one line per revision."""
        lines = [f"{'revision':<28}{'step':>9} " + " ".join(f"{m:>12}" for m in self.metrics)]
        for r in self.rows:
            step = "" if r["step"] is None else r["step"]
            lines.append(f"{r['revision']:<28}{step:>9} " + " ".join(f"{r[m]:>12.4f}" for m in self.metrics))
        return "\n".join(lines)


def checkpoint_sweep(source, metric, revisions=None, *, tokenizer=None, progress: bool = True,
                     **load_kwargs) -> Sweep:
    """metric(model, tokenizer) on each revision of `source` (default: all of them, oldest first).

    tokenizer: one tokenizer for every revision (default: each revision's own); load_kwargs go to
    load_model (dtype=, device=, experts=, quantize=, ...).
    """
    if not callable(metric):
        raise InputError(f"metric: expected a function of (model, tokenizer), got {type(metric).__name__}")
    names = list_revisions(source) if revisions is None else list(revisions)
    if not names or not all(isinstance(n, str) for n in names):
        raise InputError(f"revisions: expected a non-empty list of revision names, got {names!r:.200}")
    sweep, keys = Sweep(), None
    for name in tqdm(training_order(names), desc="revisions", unit="revision", disable=not progress):
        model = load_model(source, revision=name, **load_kwargs)
        try:
            values = _values(metric(model, tokenizer or load_tokenizer(source, revision=name)), name)
        finally:
            del model  # one revision in memory at a time
            gc.collect()
        if keys is None:
            keys = list(values)
        elif list(values) != keys:
            raise InputError(f"metric: revision {name!r} gave {list(values)}, the ones before it {keys}")
        sweep.rows.append({"revision": name, **parse(name), **values})
    return sweep


def _values(value, revision: str) -> dict[str, float]:
    """A metric's result as {name: float}: a number is {"metric": number}."""
    if isinstance(value, dict) and value and all(isinstance(k, str) for k in value):
        items = value.items()
    else:
        items = [("metric", value)]
    out = {}
    for k, v in items:
        if hasattr(v, "numel") and v.numel() == 1:
            v = v.item()
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)):
            raise InputError(f"metric: on revision {revision!r}, {k!r} is {v!r:.80}; expected a finite number (or a "
                             "dict of them)")
        out[k] = float(v)
    return out
