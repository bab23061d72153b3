"""Pictures of a corpus analysis (`olmo_lab.corpus.CorpusResult`), in the style of `olmo_lab.plots`.

Every function returns its `Figure`; the numbers each one shows are in the result's tables and in
`CorpusResult.summary()`, so notebooks and tests can check numbers rather than pixels.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from .plots import expert_color


def _heatmap(ax, values: np.ndarray, rows: list[str], cols: list[str], title: str, cmap: str, fmt: str,
             vmin=None, vmax=None, center: float | None = None):
    """One annotated matrix; `center` makes a diverging colour scale symmetric around it."""
    if center is not None:
        span = np.nanmax(np.abs(values - center)) or 1.0
        vmin, vmax = center - span, center + span
    im = ax.imshow(values, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            if not np.isnan(values[i, j]):
                dark = abs(im.norm(values[i, j]) - (0.5 if center is not None else 0)) > (0.3 if center is not None
                                                                                          else 0.6)
                ax.text(j, i, format(values[i, j], fmt), ha="center", va="center", fontsize=7,
                        color="white" if dark else "black")
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    ax.set_title(title, fontsize=9)
    return im


def _layer_grid(n: int, width: float = 3.3, height: float = 3.0):
    cols = min(n, 4)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    return fig, list(axes.flat[:n])


def domain_specialization_heatmaps(result, top: str = "1") -> Figure:
    """Per layer, domains x experts: OLMoE's domain specialization (share of a domain's tokens routed to each
    expert, top-1 or top-k); uniform routing would put 1/E (k/E) in every cell."""
    table = result.domain_specialization(top)
    experts, domains = list(table.columns), list(dict.fromkeys(table.index.get_level_values("domain")))
    layers = sorted(set(table.index.get_level_values("layer")))
    k = 1 if str(top) == "1" else result.report["top_k"]
    fig, axes = _layer_grid(len(layers))
    for ax, layer in zip(axes, layers):
        values = table.loc[layer].reindex(domains)[experts].to_numpy(dtype=float)
        _heatmap(ax, values, domains, experts, f"layer {layer}", "Blues", ".2f", 0, 1)
    fig.suptitle(f"domain specialization, top-{k} (uniform: {k / len(experts):.2f})", fontsize=10)
    fig.tight_layout()
    return fig


def domain_specialization_by_layer(result, top: str = "1") -> Figure:
    """One line per domain across layers: the share of its tokens routed to the expert of the same name
    (FlexOlmo's domain experts), or to its most used expert when no expert is named after it."""
    table = result.domain_specialization(top)
    experts = list(table.columns)
    domains = list(dict.fromkeys(table.index.get_level_values("domain")))
    layers = sorted(set(table.index.get_level_values("layer")))
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    for i, domain in enumerate(domains):
        rows = table.xs(domain, level="domain").reindex(layers)
        own = domain in experts
        values = rows[domain] if own else rows.max(axis=1)
        color = expert_color(experts.index(domain)) if own else expert_color(len(experts) + i)
        ax.plot(layers, values.to_numpy(), marker="o", color=color,
                label=f"{domain} -> {domain}" if own else f"{domain} -> its top expert")
    k = 1 if str(top) == "1" else result.report["top_k"]
    ax.axhline(k / len(experts), color="grey", ls="--", lw=1, label="uniform")
    ax.set_xticks(layers, [f"layer {l}" for l in layers], fontsize=7)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel(f"share of the domain's tokens (top-{k})")
    ax.set_title("domain specialization per layer", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    return fig


def vocabulary_specialization_plot(result) -> Figure:
    """Left: mean vocabulary specialization per layer (all ids). Right: per expert, across layers (OLMoE's
    per-expert figure): the mean top-1 share of the ids each expert is the most frequent expert of."""
    table = result.vocabulary_specialization()
    experts = [e for e in result.report["experts"] if e in table.columns]
    layers = list(table.index)
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
    left.plot(layers, table["all"].to_numpy(), marker="o", color="#333333")
    left.axhline(1 / len(result.report["experts"]), color="grey", ls="--", lw=1, label="uniform")
    left.set_title("vocabulary specialization, all ids", fontsize=9)
    width = 0.8 / max(len(experts), 1)
    for i, expert in enumerate(experts):
        e = result.report["experts"].index(expert)
        right.bar([l + (i - len(experts) / 2 + 0.5) * width for l in layers], table[expert].fillna(0).to_numpy(),
                  width, color=expert_color(e), label=expert)
    right.set_title("per expert (mean over the ids it is the top expert of)", fontsize=9)
    for ax in (left, right):
        ax.set_xticks(layers, [f"layer {l}" for l in layers], fontsize=7)
        ax.set_ylim(0, 1.02)
        ax.set_ylabel("top-1 share of an id's occurrences")
    left.legend(fontsize=7)
    right.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    return fig


def coactivation_heatmaps(result) -> Figure:
    """Per layer, experts x experts: of the tokens choosing the row expert, the share also choosing the column one
    (among each token's top `coactivation_top` experts)."""
    experts = result.report["experts"]
    layers = sorted(result.coactivation.layer.unique())
    fig, axes = _layer_grid(len(layers), 3.0, 2.8)
    for ax, layer in zip(axes, layers):
        values = result.coactivation_matrix(layer).to_numpy(dtype=float)
        _heatmap(ax, values, experts, experts, f"layer {layer}", "Purples", ".2f", 0, 1)
    fig.suptitle(f"co-activation: P(column expert | row expert), top-{result.report['coactivation_top']}",
                 fontsize=10)
    fig.tight_layout()
    return fig


def routing_consistency_plot(result) -> Figure:
    """Per pair of consecutive layers: where the tokens of each top-1 expert go next (rows sum to 1); the
    share staying with the same expert is in each title."""
    c = result.consistency
    experts = result.report["experts"]
    same = result.routing_consistency()
    pairs = list(same.index)
    fig, axes = _layer_grid(len(pairs), 3.0, 2.8)
    for ax, (a, b) in zip(axes, pairs):
        m = c[c.layer == a].pivot_table(index="expert", columns="next_expert", values="tokens", aggfunc="sum",
                                        sort=False).reindex(index=experts, columns=experts).to_numpy(dtype=float)
        with np.errstate(invalid="ignore"):
            m = m / m.sum(axis=1, keepdims=True)
        _heatmap(ax, m, experts, experts, f"layer {a} -> {b}: {same[(a, b)]:.0%} stay", "Greens", ".2f", 0, 1)
    fig.suptitle("routing consistency: top-1 expert at one layer (rows) and the next (columns)", fontsize=10)
    fig.tight_layout()
    return fig


def opt_out_loss_heatmap(result) -> Figure:
    """Domains x opted-out expert: change in bits per byte from the all-experts model (red: worse)."""
    loss = result.loss
    removed = [e for e in result.report["experts"] if e in set(loss.removed.dropna())]
    base = loss[loss.removed.isna()].set_index("domain").bits_per_byte
    m = loss.dropna(subset=["removed"]).pivot_table(index="domain", columns="removed", values="delta_bits_per_byte",
                                                    sort=False).reindex(index=list(base.index), columns=removed)
    fig, ax = plt.subplots(figsize=(0.9 * len(removed) + 3.2, 0.45 * len(base) + 1.8))
    im = _heatmap(ax, m.to_numpy(dtype=float), [f"{d} ({v:.3f})" for d, v in base.items()],
                  [f"without {e}" for e in removed], "change in bits per byte when one expert is opted out "
                  "(row label: all experts)", "RdBu_r", "+.3f", center=0.0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return fig


def routing_weight_histograms(result, layer: int) -> Figure:
    """Per expert at one layer: the distribution of its routing weight over each domain's tokens."""
    h = result.histograms[result.histograms.layer == layer]
    experts, domains = result.report["experts"], result.report["domains"]
    fig, axes = plt.subplots(1, len(experts), figsize=(2.4 * len(experts) + 1.5, 2.6), sharey=True, squeeze=False)
    for ax, expert in zip(axes[0], experts):
        for i, domain in enumerate(domains):
            rows = h[(h.expert == expert) & (h.domain == domain)].sort_values("bin")
            total = rows.tokens.sum()
            if total:
                centers = (rows.weight_low + rows.weight_high) / 2
                ax.plot(centers, rows.tokens / total, color=expert_color(len(experts) + i) if domain not in experts
                        else expert_color(experts.index(domain)), label=domain, lw=1.2, drawstyle="steps-mid")
        ax.set_title(expert, fontsize=8)
        ax.set_xlabel("routing weight", fontsize=7)
    axes[0][0].set_ylabel("share of the domain's tokens", fontsize=7)
    axes[0][-1].legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1), title="domain")
    fig.suptitle(f"routing weights, layer {layer}", fontsize=9)
    fig.tight_layout()
    return fig
