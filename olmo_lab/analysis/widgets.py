"""Interactive views for notebooks: the expert switchboard, the attention explorer and the patching
explorer (ipywidgets).

The logic lives in plain-Python state objects (`SwitchboardState`, `AttentionExplorerState`) whose
`update()` tests call directly; the widget classes only wire controls to them. Every refresh prints a
short deterministic text summary, so a notebook that drives a widget from code
(`board.checkboxes["math"].value = False`, `board.button.click()`) is checked by nbval too.
"""

from __future__ import annotations

import io
from contextlib import nullcontext
from dataclasses import dataclass, field, replace

import matplotlib.pyplot as plt
import torch

from ..errors import ExpertError, InputError, OlmoLabError
from ..modeling.experts import experts_off, resolve_experts
from ..modeling.generate import generate
from .plots import attention_heatmap, kl_divergence, next_token_comparison, routing_heatmap
from .trace import trace


# ---------------------------------------------------------------------------------------- switchboard
@dataclass
class SwitchboardView:
    """What the switchboard shows after an update."""

    message: str = ""  # non-empty when the input was rejected (nothing else is filled then)
    baseline: list[int] = field(default_factory=list)  # greedy continuation with every expert on
    toggled: list[int] = field(default_factory=list)  # greedy continuation with the current toggles
    changed: list[int] = field(default_factory=list)  # positions where the two differ
    before: torch.Tensor | None = None  # next-token distribution, all experts (V,)
    after: torch.Tensor | None = None  # next-token distribution, current toggles (V,)
    kl: float = 0.0
    routing: dict = field(default_factory=dict)  # layer -> RoutingRecord of prompt + continuation


class SwitchboardState:
    """Expert toggles, a prompt, and the comparison of the toggled model with the all-experts model."""

    def __init__(self, model, tokenizer, prompt: str = "", max_new_tokens: int = 16, mode: str = "opt_out"):
        self.model, self.tokenizer = model, tokenizer
        self.names = model.experts.names
        self.on = {name: True for name in self.names}
        self.prompt, self.max_new_tokens, self.mode = prompt, max_new_tokens, mode
        self.view = SwitchboardView()
        self._baseline_for = None  # (prompt, max_new_tokens) the cached baseline belongs to

    def set_expert(self, name: str, on: bool) -> None:
        """Tick or untick one expert (by its exact name); ExpertError for an unknown one."""
        if not isinstance(name, str) or name not in self.on:
            resolve_experts(self.names, name)  # raises ExpertError naming the problem (a wrong case included)
            raise ExpertError(f"expert {name!r:.80}: the switchboard takes names, one of {self.names}")
        if not isinstance(on, bool):
            raise InputError(f"on: expected True or False, got {on!r:.80}")
        self.on[name] = on

    @property
    def off(self) -> list[str]:
        return [n for n in self.names if not self.on[n]]

    @torch.inference_mode()
    def update(self) -> SwitchboardView:
        """Recompute the view; bad input (empty prompt, every expert off) gives a message instead."""
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            self.view = SwitchboardView(message="Enter a prompt first.")
            return self.view
        if not any(self.on.values()):
            self.view = SwitchboardView(message="At least one expert must stay on: tick one to continue.")
            return self.view
        try:  # every problem with the input (too long for the context, ...) is shown, never raised
            ids = _prompt_ids(self.tokenizer, self.prompt)
            if self._baseline_for != (self.prompt, self.max_new_tokens):
                self._baseline = (self._continue(ids), self._next_token(ids))
                self._baseline_for = (self.prompt, self.max_new_tokens)
            baseline, before = self._baseline
            with experts_off(self.model, self.off, mode=self.mode) if self.off else nullcontext():
                with trace(self.model, attention=False, routing=True, tokenizer=self.tokenizer) as tr:
                    toggled = self._continue(ids)
                after = self._next_token(ids)
        except OlmoLabError as e:
            self.view = SwitchboardView(message=str(e))
            return self.view
        changed = [i for i, (a, b) in enumerate(zip(baseline, toggled)) if a != b]
        changed += list(range(min(len(baseline), len(toggled)), max(len(baseline), len(toggled))))
        self.view = SwitchboardView("", baseline, toggled, changed, before, after, kl_divergence(before, after),
                                    tr.routing)
        return self.view

    def _continue(self, ids: torch.Tensor) -> list[int]:
        return generate(self.model, self.tokenizer, ids[0].tolist(), max_new_tokens=self.max_new_tokens)

    def _next_token(self, ids: torch.Tensor) -> torch.Tensor:
        logits = self.model(ids, logits_to_keep=1).logits[0, -1].float()
        return logits[:len(self.tokenizer)].softmax(-1)

    def summary(self) -> str:
        v = self.view
        if v.message:
            return v.message
        off = ", ".join(self.off) or "none"
        decode = self.tokenizer.decode
        labels = lambda ids: self.tokenizer.token_strings(ids)  # noqa: E731
        b_top, a_top = int(v.before.argmax()), int(v.after.argmax())
        lines = [f"experts off ({self.mode}): {off}",
                 f"all experts : {decode(v.baseline)!r}",
                 f"with toggles: {decode(v.toggled)!r}",
                 f"changed tokens: {len(v.changed)} of {max(len(v.baseline), len(v.toggled))}"
                 + (f" (first at {v.changed[0]})" if v.changed else ""),
                 f"next token: {labels([b_top])[0]!r} {v.before[b_top]:.2f} -> {labels([a_top])[0]!r} "
                 f"{v.after[a_top]:.2f}; KL {v.kl:.3f} nats"]
        if v.routing:
            mid = sorted(v.routing)[len(v.routing) // 2]
            counts = torch.bincount(v.routing[mid].topk_indices[:, 0], minlength=len(self.names)).tolist()
            lines.append(f"top expert per token, layer {mid}: "
                         + ", ".join(f"{n} {c}" for n, c in zip(self.names, counts)))
        return "\n".join(lines)


class _WidgetView:
    """What both widgets share: a text summary, figures rendered into Image widgets, an optional echo.

    Figures go into `ipywidgets.Image` values (PNG bytes), not into an Output widget, so driving a
    widget from code adds no cell output beyond the printed summary (nbval compares cell outputs).
    """

    def _show(self, summary: str, make_figures) -> str:
        self.text.value = f"<pre class='olmo-lab-summary'>{_escape(summary)}</pre>"
        if _in_kernel():  # pictures only where a front end can show them
            figures = make_figures()
            for image, fig in zip(self.images, figures):
                buffer = io.BytesIO()
                fig.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
                plt.close(fig)
                image.value = buffer.getvalue()
            for i, image in enumerate(self.images):
                image.layout.display = None if i < len(figures) else "none"
        if self.echo:
            print(summary)
        return summary

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)


class ExpertSwitchboard(_WidgetView):
    """A checkbox per expert, a prompt box and a generate button; shows what switching experts changes."""

    def __init__(self, model, tokenizer, prompt: str = "", max_new_tokens: int = 16, echo: bool = True):
        import ipywidgets as w

        self.state = SwitchboardState(model, tokenizer, prompt, max_new_tokens)
        self.echo = echo
        self.checkboxes = {n: w.Checkbox(value=True, description=n, indent=False) for n in self.state.names}
        self.mode = w.ToggleButtons(options=[("opt-out", "opt_out"), ("drop after routing", "drop")],
                                    value="opt_out", description="mode")
        self.prompt = w.Textarea(value=prompt, description="prompt", layout=w.Layout(width="95%"))
        self.button = w.Button(description="generate", button_style="primary")
        self.text = w.HTML()
        # the next-token comparison and the routing heatmap, side by side at their natural aspect ratio
        self.images = [w.Image(format="png", layout=w.Layout(width="auto", height="auto", max_width="48%"))
                       for _ in range(2)]
        for name, box in self.checkboxes.items():
            box.observe(lambda change, name=name: self._toggle(name, change["new"]), names="value")
        self.mode.observe(lambda change: self._set_mode(change["new"]), names="value")
        self.button.on_click(lambda _button: self.refresh())
        self.widget = w.VBox([w.HBox(list(self.checkboxes.values())), self.mode, self.prompt, self.button,
                              self.text, w.HBox(self.images, layout=w.Layout(align_items="flex-start"))])
        self.widget.add_class("olmo-lab-switchboard")

    def _toggle(self, name, on):
        self.state.set_expert(name, on)
        self.refresh()

    def _set_mode(self, mode):
        self.state.mode = mode
        self.refresh()

    def refresh(self) -> str:
        """Read the prompt, update the state, redraw, and print (return) the text summary."""
        self.state.prompt = self.prompt.value
        view = self.state.update()
        summary = self.state.summary()

        def figures():
            if view.message:
                return []
            labels = self.state.tokenizer.token_strings(list(range(len(view.before))))
            return [next_token_comparison(view.before, view.after, labels, top=8),
                    routing_heatmap(view.routing, self.state.names)]
        return self._show(summary, figures)


# ---------------------------------------------------------------------------------------- attention explorer
VIEW = 40  # queries and keys the attention explorer shows at once (readable labels on a long prompt)


class AttentionExplorerState:
    """A traced prompt and a (layer, head, query token) selection."""

    def __init__(self, model, tokenizer, prompt: str):
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError("prompt: the attention explorer needs a non-empty prompt")
        self.model, self.tokenizer, self.prompt = model, tokenizer, prompt
        ids = _prompt_ids(tokenizer, prompt)
        if ids.shape[1] > model.config.max_position_embeddings:
            raise InputError(f"prompt: {ids.shape[1]} tokens is longer than the model's context of "
                             f"{model.config.max_position_embeddings}")
        with trace(model, attention=True, routing=False, tokenizer=tokenizer) as tr:
            with torch.inference_mode():
                model(ids)
        self.trace = tr
        self.tokens = tr.tokens
        self.layer, self.head, self.query = 0, 0, len(self.tokens) - 1

    def select(self, layer: int | None = None, head: int | None = None, query: int | None = None) -> None:
        cfg = self.model.config
        for name, value, limit in (("layer", layer, cfg.num_hidden_layers), ("head", head, cfg.num_attention_heads),
                                   ("query", query, len(self.tokens))):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < limit):
                raise InputError(f"{name}: {value!r:.80} is not an index in range (0..{limit - 1})")
        for name, value in (("layer", layer), ("head", head), ("query", query)):  # all checked: now set
            if value is not None:
                setattr(self, name, value)

    def figure(self):
        """The heatmap of the selected layer and head: on a long prompt, a view of VIEW queries around the
        chosen one and the keys up to the last of them (on a sliding-window layer, with the band before them)."""
        (q0, q1), (k0, k1) = self.view()
        window = self.model.config.window(self.layer)
        kind = f"sliding window {window}" if window else "full attention"
        return attention_heatmap(self.probs()[q0:q1, k0:k1] if len(self.tokens) <= VIEW else
                                 self.trace.pattern(self.layer, heads=self.head, queries=slice(q0, q1),
                                                    keys=slice(k0, k1), batch=0)[0, 0],
                                 self.tokens, window, title=f"layer {self.layer}, head {self.head} ({kind})",
                                 first_query=q0, first_key=k0, highlight=self.query)

    def view(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """(first, end) of the queries and of the keys the figure shows; everything on a short prompt."""
        n = len(self.tokens)
        q0 = min(max(0, self.query - VIEW // 2), max(0, n - VIEW))
        q1 = min(n, q0 + VIEW)
        window = self.model.config.window(self.layer)
        band = min(window - 1, VIEW // 2) if window else 0  # a sliding layer's first rows see keys before q0
        return (q0, q1), (max(0, q0 - band), q1)

    def probs(self) -> torch.Tensor:
        """(Q, K) the selected head's whole attention, computed from the trace when asked."""
        return self.trace.pattern(self.layer, heads=self.head, batch=0)[0, 0]

    def summary(self) -> str:
        row = self.trace.pattern(self.layer, heads=self.head, queries=slice(self.query, self.query + 1),
                                 batch=0)[0, 0, 0]  # (K,) the chosen query's row only
        top = torch.topk(row, min(3, self.query + 1))
        window = self.model.config.window(self.layer)
        seen = f"sees keys {max(0, self.query - window + 1)}..{self.query}" if window else f"sees keys 0..{self.query}"
        keys = ", ".join(f"{self.tokens[k]!r} {p:.2f}" for p, k in zip(top.values.tolist(), top.indices.tolist()))
        text = (f"layer {self.layer} head {self.head} (kv head {self.trace.kv_heads()[self.head]}), query "
                f"{self.query} {self.tokens[self.query]!r} {seen}; top keys: {keys}")
        (q0, q1), (k0, k1) = self.view()
        if (q0, q1, k0, k1) != (0, len(self.tokens), 0, len(self.tokens)):
            text += (f"; shown: queries {q0}..{q1 - 1}, keys {k0}..{k1 - 1} (this query's attention outside "
                     f"them: {float(row[:k0].sum()):.2f})")
        return text


class AttentionExplorer(_WidgetView):
    """Layer, head and query-token selectors over a traced prompt, with the heatmap."""

    def __init__(self, model, tokenizer, prompt: str, echo: bool = True):
        import ipywidgets as w

        self.state = AttentionExplorerState(model, tokenizer, prompt)
        self.echo = echo
        cfg = model.config
        self.layer = w.Dropdown(options=[(f"{i} ({'sliding' if cfg.window(i) else 'full'})", i)
                                         for i in range(cfg.num_hidden_layers)], value=0, description="layer")
        self.head = w.Dropdown(options=list(range(cfg.num_attention_heads)), value=0, description="head")
        self.query = w.Dropdown(options=[(f"{i}: {t!r}", i) for i, t in enumerate(self.state.tokens)],
                                value=self.state.query, description="query")
        self.text = w.HTML()
        self.images = [w.Image(format="png", layout=w.Layout(width="auto", height="auto", max_width="90%"))]
        for control in (self.layer, self.head, self.query):
            control.observe(lambda _change: self.refresh(), names="value")
        self.widget = w.VBox([w.HBox([self.layer, self.head, self.query]), self.text, self.images[0]])
        self.widget.add_class("olmo-lab-attention")

    def refresh(self) -> str:
        """Apply the selectors, redraw, and print (return) the text summary."""
        self.state.select(self.layer.value, self.head.value, self.query.value)
        return self._show(self.state.summary(), lambda: [self.state.figure()])


# ---------------------------------------------------------------------------------------- patching explorer
class PatchingExplorerState:
    """Activation patching of a clean/corrupted prompt pair, scored by logit(answer) - logit(distractor) at
    the last position, over a chosen kind of site; one layer is selected for the summary."""

    def __init__(self, model, tokenizer, clean: str, corrupt: str, answer: str, distractor: str):
        from .patching import patch

        ids = [tokenizer.encode(t) for t in (clean, corrupt)]
        if len(ids[0]) != len(ids[1]) or not ids[0]:
            raise InputError(f"clean and corrupt prompts must tokenize to the same, non-zero number of tokens "
                             f"(got {len(ids[0])} and {len(ids[1])})")
        self.answer, self.distractor = tokenizer.encode(answer)[0], tokenizer.encode(distractor)[0]
        self.model, self.tokenizer = model, tokenizer
        self.clean, self.corrupt = torch.tensor([ids[0]]), torch.tensor([ids[1]])
        self.tokens = tokenizer.token_strings(ids[0])
        self.sites = ["resid_pre", "heads"] + (["experts"] if model.config.is_moe else [])
        self._patch, self._grids = patch, {}
        self.site, self.layer = "resid_pre", model.config.num_hidden_layers - 1

    def metric(self, logits):
        return logits[0, -1, self.answer] - logits[0, -1, self.distractor]

    def select(self, site: str | None = None, layer: int | None = None) -> None:
        """Choose the kind of site and the layer; checked before anything changes."""
        n = self.model.config.num_hidden_layers
        if site is not None and site not in self.sites:
            raise InputError(f"site: expected one of {self.sites}, got {site!r}")
        if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n):
            raise InputError(f"layer: {layer!r} is out of range (0..{n - 1})")
        self.site = site or self.site
        self.layer = self.layer if layer is None else layer

    @property
    def grid(self):
        """The PatchingResult of the selected site (computed once per site)."""
        if self.site not in self._grids:
            self._grids[self.site] = self._patch(self.model, self.clean, self.corrupt, self.metric, site=self.site,
                                                 progress=False)
        return self._grids[self.site]

    def summary(self) -> str:
        g = self.grid
        row = g.normalised()[self.layer]
        columns = [f"{c} {self.tokens[int(c)]!r}" for c in g.columns] if self.site == "resid_pre" else g.columns
        top = row.abs().argsort(descending=True)[:3].tolist()
        parts = ", ".join(f"{columns[i]} {row[i]:+.2f}" for i in top)
        return (f"{self.site}, layer {self.layer}: metric clean {g.clean:.3f}, corrupted {g.corrupt:.3f}; "
                f"most restoring: {parts}")

    def figure(self):
        g = self.grid
        columns = [f"{t!r}" for t in self.tokens] if self.site == "resid_pre" else g.columns
        fig = replace(g, columns=columns).plot()  # the tokens as column labels
        ax = fig.axes[0]
        ax.add_patch(plt.Rectangle((-0.5, self.layer - 0.5), len(columns), 1, fill=False, lw=2, ec="black"))
        return fig


class PatchingExplorer(_WidgetView):
    """Site and layer selectors over an activation-patching sweep, with its heatmap."""

    def __init__(self, model, tokenizer, clean: str, corrupt: str, answer: str, distractor: str, echo: bool = True):
        import ipywidgets as w

        self.state = PatchingExplorerState(model, tokenizer, clean, corrupt, answer, distractor)
        self.echo = echo
        self.site = w.Dropdown(options=self.state.sites, value=self.state.site, description="site")
        self.layer = w.Dropdown(options=list(range(model.config.num_hidden_layers)), value=self.state.layer,
                                description="layer")
        self.text = w.HTML()
        self.images = [w.Image(format="png", layout=w.Layout(width="auto", height="auto", max_width="95%"))]
        for control in (self.site, self.layer):
            control.observe(lambda _change: self.refresh(), names="value")
        self.widget = w.VBox([w.HBox([self.site, self.layer]), self.text, self.images[0]])
        self.widget.add_class("olmo-lab-patching")

    def refresh(self) -> str:
        """Apply the selectors, redraw, and print (return) the text summary."""
        self.state.select(self.site.value, self.layer.value)
        return self._show(self.state.summary(), lambda: [self.state.figure()])
def _prompt_ids(tokenizer, prompt: str) -> torch.Tensor:
    """(1, S) token ids of a prompt; InputError if it tokenizes to nothing."""
    ids = tokenizer.encode(prompt)
    if not ids:
        raise InputError(f"prompt: {prompt!r:.80} tokenizes to no tokens")
    return torch.tensor([ids])


def _in_kernel() -> bool:
    """True inside a Jupyter kernel (where an Output widget can hold figures)."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and hasattr(shell, "kernel")


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")

