"""Pictures of what a trace recorded (matplotlib, deterministic, offline).

Every plot function returns its `Figure`, and has a text companion (`*_summary`) that states the
numbers the picture shows, so notebooks and tests can check numbers rather than pixels.
"""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import torch
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

EXPERT_COLORS = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C",
                 "#CCB974", "#64B5CD"]


def expert_color(index: int) -> str:
    return EXPERT_COLORS[index % len(EXPERT_COLORS)]


def _label(tokens: list[str], limit: int = 12) -> list[str]:
    """Token text made printable for tick labels: whitespace shown, long tokens cut."""
    out = []
    for t in tokens:
        t = t.replace("\n", "\\n").replace("\t", "\\t").replace(" ", "·")
        out.append(t if len(t) <= limit else t[:limit - 1] + "…")
    return out


# ---------------------------------------------------------------------------------------- attention
def attention_heatmap(probs: torch.Tensor, tokens: list[str], window: int | None = None, title: str = "",
                      ax=None, first_query: int = 0, first_key: int = 0, highlight: int | None = None) -> Figure:
    """One head's attention (queries x keys) with token labels; the sliding-window band is outlined.

    probs (Q, K) may be a view into a long prompt: its rows are queries first_query.., its columns keys
    first_key.. of `tokens`; `highlight` (a query index) outlines that query's row.
    """
    probs = probs.detach().float().cpu()
    nq, nk = probs.shape
    fig = ax.figure if ax is not None else plt.figure(figsize=(0.32 * nk + 2.5, 0.32 * nq + 1.8))
    ax = ax or fig.add_subplot()
    im = ax.imshow(probs.numpy(), cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks(range(nk), _label(tokens[first_key:first_key + nk]), rotation=90, fontsize=7)
    ax.set_yticks(range(nq), _label(tokens[first_query:first_query + nq]), fontsize=7)
    view = first_query or first_key or nq < len(tokens) or nk < len(tokens)
    ax.set_xlabel(f"key (tokens {first_key}..{first_key + nk - 1} of {len(tokens)})" if view else "key")
    ax.set_ylabel(f"query (tokens {first_query}..{first_query + nq - 1})" if view else "query")
    if window:  # each query sees keys q-W+1 .. q: outline that band
        qs = torch.arange(first_query, first_query + nq + 1)
        ax.plot(qs - first_key - 0.5, qs - first_query - 0.5, color="#C44E52", lw=1)
        ax.plot((qs - window + 1).clamp(min=0) - first_key - 0.5, qs - first_query - 0.5, color="#C44E52", lw=1,
                ls="--", label=f"sliding window W={window}")
        ax.set_xlim(-0.5, nk - 0.5)
        ax.set_ylim(nq - 0.5, -0.5)
        ax.legend(loc="upper right", fontsize=7)
    if highlight is not None and first_query <= highlight < first_query + nq:
        ax.add_patch(Rectangle((-0.5, highlight - first_query - 0.5), nk, 1, fill=False, ec="#DD8452", lw=2))
    ax.set_title(title or ("sliding-window layer" if window else "full-attention layer"), fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return fig


def plot_attention(tr, layer: int, head: int, batch: int = 0) -> Figure:
    """attention_heatmap for one traced layer and head."""
    window = tr.model.config.window(layer)
    kind = f"sliding window {window}" if window else "full attention"
    kv = tr.kv_heads()[head]
    return attention_heatmap(tr.pattern(layer, heads=head, batch=batch)[0, 0], tr.token_text(batch), window,
                             title=f"layer {layer}, head {head} (kv head {kv}), {kind}")


def attention_grid(tr, layer: int, batch: int = 0) -> Figure:
    """Every head of one layer, side by side; heads sharing a key/value head are labelled as such."""
    probs = tr.pattern(layer, batch=batch)[0]  # (heads, Q, K)
    heads = probs.shape[0]
    cols = min(4, heads)
    rows = math.ceil(heads / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    kv = tr.kv_heads()
    for h, ax in enumerate(axes.flat):
        if h >= heads:
            ax.axis("off")
            continue
        ax.imshow(probs[h].numpy(), cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"head {h} (kv {kv[h]})", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    window = tr.model.config.window(layer)
    fig.suptitle(f"layer {layer}: " + (f"sliding window {window}" if window else "full attention"), fontsize=10)
    fig.tight_layout()
    return fig


def attention_summary(probs: torch.Tensor, tokens: list[str], last: int = 6) -> str:
    """For the last few queries: the key each attends to most, and with what probability."""
    probs = probs.detach().float().cpu()
    lines = []
    for q in range(max(0, probs.shape[0] - last), probs.shape[0]):
        k = int(probs[q].argmax())
        lines.append(f"{tokens[q]!r:>14} -> {tokens[k]!r:<14} {probs[q, k]:.2f}  (distance {q - k})")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- routing
def routing_heatmap(routing: dict, expert_names: list[str], tokens: list[str] | None = None) -> Figure:
    """Tokens x layers, each cell coloured by the token's top expert, shaded and labelled by its weight."""
    layers = sorted(routing)
    top = torch.stack([routing[l].topk_indices[:, 0] for l in layers], dim=1)  # (T, L)
    weight = torch.stack([routing[l].topk_weights[:, 0].float() for l in layers], dim=1)
    tokens = tokens or routing[layers[0]].tokens
    T, L = top.shape
    fig, ax = plt.subplots(figsize=(1.0 * L + 3, 0.28 * T + 1.5))
    cmap = ListedColormap([expert_color(e) for e in range(len(expert_names))])
    ax.imshow(top.numpy(), cmap=cmap, vmin=-0.5, vmax=len(expert_names) - 0.5, aspect="auto",
              interpolation="nearest")
    ax.imshow(torch.ones(T, L).numpy(), cmap="Greys", alpha=(1 - weight.numpy()) * 0.6, vmin=0, vmax=1,
              aspect="auto", interpolation="nearest")
    for t in range(T):
        for l in range(L):
            ax.text(l, t, f"{weight[t, l]:.2f}", ha="center", va="center", fontsize=6, color="white")
    ax.set_xticks(range(L), [f"layer {l}" for l in layers], fontsize=7)
    ax.set_yticks(range(T), _label(tokens[:T]), fontsize=7)
    ax.legend(handles=[Patch(color=expert_color(e), label=n) for e, n in enumerate(expert_names)],
              loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=7, title="top expert")
    ax.set_title("routing: top expert per token and layer (label: its weight)", fontsize=9)
    fig.tight_layout()
    return fig


def routing_summary(routing: dict, expert_names: list[str]) -> str:
    """Per layer: how many tokens pick each expert first."""
    lines = []
    for l in sorted(routing):
        counts = torch.bincount(routing[l].topk_indices[:, 0], minlength=len(expert_names)).tolist()
        lines.append(f"layer {l}: " + ", ".join(f"{n} {c}" for n, c in zip(expert_names, counts)))
    return "\n".join(lines)


def expert_usage_bars(usage: dict[str, torch.Tensor], expert_names: list[str], layer: int | None = None) -> Figure:
    """Grouped bars: for each group (domain), the fraction of its tokens that use each expert."""
    groups = list(usage)
    fig, ax = plt.subplots(figsize=(1.2 * len(groups) + 3, 3.2))
    width = 0.8 / len(expert_names)
    for e, name in enumerate(expert_names):
        values = [(usage[g].mean(0) if layer is None else usage[g][layer])[e].item() for g in groups]
        ax.bar([i + e * width for i in range(len(groups))], values, width, label=name, color=expert_color(e))
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))], groups)
    ax.set_ylabel("fraction of tokens")
    ax.set_title("expert usage by domain" + ("" if layer is None else f", layer {layer}"), fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    return fig


def coactivation(routing: dict, num_experts: int) -> torch.Tensor:
    """(E, E) how often two experts are chosen together for a token (diagonal: chosen at all)."""
    m = torch.zeros(num_experts, num_experts)
    for r in routing.values():
        onehot = torch.zeros(r.topk_indices.shape[0], num_experts)
        onehot.scatter_(1, r.topk_indices.cpu(), 1.0)
        m += onehot.T @ onehot
    return m


def coactivation_matrix(routing: dict, expert_names: list[str]) -> Figure:
    m = coactivation(routing, len(expert_names))
    fig, ax = plt.subplots(figsize=(0.6 * len(expert_names) + 2.5, 0.6 * len(expert_names) + 2))
    im = ax.imshow(m.numpy(), cmap="Purples", interpolation="nearest")
    for i in range(len(expert_names)):
        for j in range(len(expert_names)):
            ax.text(j, i, f"{int(m[i, j])}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(expert_names)), expert_names, rotation=45, fontsize=7)
    ax.set_yticks(range(len(expert_names)), expert_names, fontsize=7)
    ax.set_title("expert co-activation (tokens x layers)", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------- toggles
def kl_divergence(p: torch.Tensor, q: torch.Tensor) -> float:
    """KL(p || q) in nats between two probability vectors."""
    p, q = p.detach().double().cpu(), q.detach().double().cpu()
    keep = p > 0
    return float((p[keep] * (p[keep].log() - q[keep].clamp_min(1e-300).log())).sum())


def next_token_comparison(before: torch.Tensor, after: torch.Tensor, labels: list[str], top: int = 10,
                          names: tuple[str, str] = ("all experts", "toggled")) -> Figure:
    """Top-k next-token probabilities before and after a toggle, side by side, with KL in the title."""
    ids = torch.topk(before + after, top).indices.tolist()
    fig, ax = plt.subplots(figsize=(0.55 * top + 2.5, 3.0))
    xs = range(len(ids))
    ax.bar([x - 0.2 for x in xs], [before[i].item() for i in ids], 0.4, label=names[0], color="#4C72B0")
    ax.bar([x + 0.2 for x in xs], [after[i].item() for i in ids], 0.4, label=names[1], color="#DD8452")
    ax.set_xticks(list(xs), _label([labels[i] for i in ids]), rotation=45, fontsize=7)
    ax.set_ylabel("probability")
    ax.set_title(f"next-token distribution: KL({names[0]} || {names[1]}) = {kl_divergence(before, after):.3f} nats",
                 fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def distribution_summary(before: torch.Tensor, after: torch.Tensor, labels: list[str], top: int = 5) -> str:
    lines = [f"KL = {kl_divergence(before, after):.4f} nats"]
    for name, p in (("before", before), ("after", after)):
        vals, ids = torch.topk(p, top)
        lines.append(f"{name:>6}: " + ", ".join(f"{labels[i]!r} {v:.3f}" for v, i in zip(vals.tolist(), ids.tolist())))
    return "\n".join(lines)


def colored_generation(tokens: list[str], experts: list[int], expert_names: list[str], title: str = "") -> Figure:
    """Generated text with each token on the colour of its dominant expert."""
    fig = plt.figure(figsize=(8, 0.35 * (1 + sum(len(t) for t in tokens) // 70) + 1.0))
    x, y, line_height = 0.01, 0.8, 0.18
    for tok, e in zip(tokens, experts):
        shown = tok.replace("\n", "⏎")
        width = 0.0105 * max(len(shown), 1)
        if x + width > 0.99:
            x, y = 0.01, y - line_height
        fig.text(x, y, shown, fontsize=9, family="monospace", va="top",
                 bbox=dict(facecolor=expert_color(e), alpha=0.55, pad=1.5, edgecolor="none"))
        x += width + 0.003
    fig.legend(handles=[Patch(color=expert_color(e), alpha=0.55, label=n) for e, n in enumerate(expert_names)],
               loc="lower center", ncol=min(len(expert_names), 6), fontsize=7, frameon=False)
    fig.suptitle(title or "generation coloured by dominant expert", fontsize=9)
    return fig


def colored_generation_summary(tokens: list[str], experts: list[int], expert_names: list[str]) -> str:
    """The text with the expert of each run of tokens in brackets, e.g. `[code]def f(x):[public] it`."""
    out, current = [], None
    for tok, e in zip(tokens, experts):
        if e != current:
            out.append(f"[{expert_names[e]}]")
            current = e
        out.append(tok)
    return "".join(out)
