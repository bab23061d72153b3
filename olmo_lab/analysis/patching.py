"""Activation patching and attribution patching: where in the model a prediction is carried.

    clean, corrupt = tok("The Eiffel Tower is in"), tok("The Colosseum is in")   # same length
    metric = lambda logits: logits[0, -1, paris] - logits[0, -1, rome]       # a scalar
    grid = patch(model, clean, corrupt, metric, site="resid_pre")           # (layers, positions)
    print(grid.summary()); grid.plot(tokens)

Activation patching runs the corrupted input with one site's activation taken from the clean run
("denoising"; `direction="noise"` patches corrupted activations into the clean run) and scores each
patched run with the metric. Sites: "resid_pre" (the residual stream entering each layer, per position),
"heads" (each attention head's output before o_proj, all positions), "experts" (each FlexOlmo expert's
output, recomputed on the clean run's input of that layer for the tokens routed to it). A patch at layer l
cannot change layers below it, so every patched run starts at layer l from the cached residual stream
(`start_at_layer`); and a residual patch at position p cannot change positions before p, so those keep
the corrupted run's keys, values and logits (a KV cache) and only positions p.. are computed: about a
quarter of the full work over a layers x positions sweep. Up to `batch` patched runs go through the
model together; the rows of a batch are independent, so a batched sweep computes what the one-at-a-time
sweep (batch=1) computes, equal up to the rounding of matrix kernels given other numbers of rows.
A metric that reads only some positions' logits (most read the last) can say so, `metric_positions=[-1]`:
the patched runs then compute the vocabulary projection only from the first of them on (a third of a
small model's work); the other logits it is given are NaN, so a metric that reads them anyway gets an
error, never a wrong number.

Attribution patching (Nanda 2023) is the first-order version: metric(patched) - metric(corrupt) ~
(a_clean - a_corrupt) . d metric / d a at the corrupted run, for every site from two forwards and one
backward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..errors import InputError
from .interventions import intervene
from .trace import trace

SITES = ("resid_pre", "heads", "experts")


@dataclass
class PatchingResult:
    """scores (rows, cols): the metric of each patched run; rows are layers, cols positions/heads/experts."""

    scores: torch.Tensor
    site: str
    columns: list[str]
    clean: float  # the metric on the clean run
    corrupt: float  # the metric on the corrupted run
    method: str = "activation patching"

    def normalised(self) -> torch.Tensor:
        """0 where patching does nothing (the corrupted metric), 1 where it restores the clean metric."""
        return (self.scores - self.corrupt) / (self.clean - self.corrupt)

    def top(self, n: int = 5) -> list[tuple[int, str, float]]:
        """The n sites that move the metric most from the corrupted run: (layer, column, normalised)."""
        norm = self.normalised()
        flat = (norm.abs() if torch.isfinite(norm).all() else (self.scores - self.corrupt).abs()).flatten()
        order = flat.argsort(descending=True)[:n].tolist()
        return [(i // norm.shape[1], self.columns[i % norm.shape[1]], float(norm.flatten()[i])) for i in order]

    def summary(self, n: int = 5) -> str:
        lines = [f"{self.method} over {self.site} ({self.scores.shape[0]} layers x {self.scores.shape[1]}): "
                 f"metric clean {self.clean:.4f}, corrupted {self.corrupt:.4f}"]
        lines += [f"  layer {layer:>2} {col!r:<16} restores {v:+.2f} of the difference" for layer, col, v in self.top(n)]
        return "\n".join(lines)

    def plot(self, ax=None, title: str | None = None):
        """A heatmap of the normalised scores (layers x columns)."""
        import matplotlib.pyplot as plt

        if ax is None:
            width = min(12.0, max(4.0, 0.45 * len(self.columns) + 2))  # wider would shrink the labels on screen
            _, ax = plt.subplots(figsize=(width, 0.45 * self.scores.shape[0] + 1.8))
        data = self.normalised().numpy()
        lim = max(1.0, float(abs(data).max()))
        im = ax.imshow(data, cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto")
        ax.set_xticks(range(len(self.columns)), self.columns, rotation=90 if len(self.columns) > 16 else 45,
                      ha="center" if len(self.columns) > 16 else "right", fontsize=9)
        ax.set_yticks(range(self.scores.shape[0]), [f"layer {i}" for i in range(self.scores.shape[0])], fontsize=9)
        ax.set_title(title or f"{self.method}: {self.site} (1 = clean restored)", fontsize=11)
        ax.figure.colorbar(im, ax=ax, fraction=0.04)
        ax.figure.tight_layout()
        return ax.figure


def _check(model, clean, corrupt, site):
    if site not in SITES:
        raise InputError(f"site: expected one of {SITES}, got {site!r}")
    for name, ids in (("clean", clean), ("corrupt", corrupt)):
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[0] != 1:
            raise InputError(f"{name}: expected token ids of shape (1, S)")
    if clean.shape != corrupt.shape:
        raise InputError(f"clean and corrupt inputs must have the same length, got {clean.shape[1]} and "
                         f"{corrupt.shape[1]} tokens")
    if site == "experts" and not model.config.is_moe:
        raise InputError("site 'experts' needs a FlexOlmo model")


def _score(metric, logits: torch.Tensor) -> torch.Tensor:
    """The metric of each row of a (n, S, V) batch: (n,)."""
    out = []
    for row in logits.split(1):
        value = metric(row)
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            raise InputError(f"metric: expected a scalar (a number or a one-element tensor), got "
                             f"{tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__}")
        out.append(value.reshape(()).float())
    return torch.stack(out)


def _metric(metric, logits) -> float:
    value = metric(logits)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return float(_score(metric, logits)[0])


def _run(model, ids):
    """Logits and every recorded site of one run (post-RoPE keys and values too: the patched runs' prefix)."""
    L = model.config.num_hidden_layers
    names = [f"model.layers.{i}.{point}" for point in ("hook_resid_pre", "self_attn.hook_z", "self_attn.hook_k",
                                                        "self_attn.hook_v") for i in range(L)]
    if model.config.is_moe:
        names += [f"model.layers.{i}.hook_resid_mid" for i in range(L)]
    with trace(model, attention=False, routing=False, hooks=names) as tr:
        logits = model(ids).logits
    values = {n: tr[n].to(model.device) for n in names}
    values["logits"] = logits
    return logits, values


@torch.no_grad()
def patch(model, clean: torch.Tensor, corrupt: torch.Tensor, metric, site: str = "resid_pre",
          layers=None, direction: str = "denoise", batch: int = 24, progress: bool = True,
          metric_positions=None) -> PatchingResult:
    """Activation patching over one kind of site; see the module docstring. metric(logits (1, S, V)) -> scalar.

    metric_positions: the positions whose logits the metric reads (e.g. [-1]); default all of them.
    """
    _check(model, clean, corrupt, site)
    if direction not in ("denoise", "noise"):
        raise InputError(f"direction: expected 'denoise' or 'noise', got {direction!r}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise InputError(f"batch: expected a positive int, got {batch!r}")
    keep = _logits_kept(metric_positions, clean.shape[1])
    clean_logits, source = _run(model, clean)
    corrupt_logits, target = _run(model, corrupt)
    m_clean, m_corrupt = _metric(metric, clean_logits), _metric(metric, corrupt_logits)
    if direction == "noise":  # patch corrupted activations into the clean run
        source, target, corrupt = target, source, clean
    L = model.config.num_hidden_layers
    layers = list(range(L)) if layers is None else sorted(set(layers))
    S = clean.shape[1]
    columns = [str(p) for p in range(S)] if site == "resid_pre" else list(model.config.expert_names) \
        if site == "experts" else [f"head {h}" for h in range(model.config.num_attention_heads)]
    scores = torch.full((L, len(columns)), float("nan"))
    # Residual patches at later positions skip the work before them, so a forward holds a run of about
    # S / 4 neighbouring positions (its rows all start at the first: fewer, larger forwards measured
    # faster than S / 6 or S / 3 on the 153M OLMo 3); other sites patch whole layers.
    per_forward = min(batch, -(-S // 4)) if site == "resid_pre" else batch
    chunks = [(layer, list(range(len(columns)))[c:c + per_forward]) for layer in layers
              for c in range(0, len(columns), per_forward)]
    for layer, cols in tqdm(chunks, desc=f"patching {site}", disable=not progress):
        logits = _patched_logits(model, site, layer, cols, source, target, corrupt, keep)
        scores[layer, cols] = _score(metric, logits)
        if keep < S and bool(scores[layer, cols].isnan().any()):
            raise InputError(f"metric gave NaN with metric_positions={metric_positions!r}: it reads the logits of a "
                             f"position not listed there (those are not computed; they are NaN)")
    return PatchingResult(scores[layers] if len(layers) < L else scores, site, columns, m_clean, m_corrupt)


def _logits_kept(metric_positions, S: int) -> int:
    """How many last positions' logits the patched runs compute: S unless the metric reads fewer."""
    if metric_positions is None:
        return S
    try:
        positions = [int(p) for p in metric_positions]
    except (TypeError, ValueError):
        raise InputError(f"metric_positions: expected a list of positions, got {metric_positions!r}") from None
    if not positions or any(not -S <= p < S for p in positions):
        raise InputError(f"metric_positions: expected positions in [-{S}, {S}) (the prompt has {S} tokens), "
                         f"got {metric_positions!r}")
    return S - min(p % S for p in positions)


def _with_logits(logits, keep, target_logits, before):
    """(n, S, V): the computed logits of the last `keep` positions, the target run's where a row has not yet
    been patched (`before`, (n, S) or None), NaN where nothing was computed."""
    n, S = logits.shape[0], target_logits.shape[1]
    if keep == S and before is None:
        return logits
    full = logits.new_full((n, S, logits.shape[2]), float("nan"))
    full[:, S - logits.shape[1]:] = logits
    return full if before is None else torch.where(before[..., None], target_logits, full)


def _patched_logits(model, site, layer, cols, source, target, ids, keep):
    """Logits (n, S, V) of the target run with column cols[r] of `site` at `layer` patched in row r
    (only the last `keep` positions computed; see _with_logits)."""
    n = len(cols)
    p = f"model.layers.{layer}."
    if site == "resid_pre":
        return _patched_resid(model, layer, cols, source, target, ids, keep)
    resid = target[p + "hook_resid_pre"].expand(n, -1, -1).clone()  # (n, S, H)
    edits = {}
    if site == "heads":
        clean_z = source[p + "self_attn.hook_z"]  # (1, S, nh, hd)

        def heads(z, ctx):
            z = z.clone()  # (n, S, nh, hd)
            for r, h in enumerate(cols):
                z[r, :, h] = clean_z[0, :, h]
            return z
        edits[p + "self_attn.hook_z"] = heads
    else:  # experts: recomputed on the source run's input of this layer's MoE
        moe = model.model.layers[layer].mlp
        src = source[p + "hook_resid_mid"].reshape(-1, model.config.hidden_size)  # (S, H)
        S = src.shape[0]
        for r, e in enumerate(cols):
            def expert(y, ctx, r=r, e=e):
                mine = ctx.rows // S == r
                if not bool(mine.any()):
                    return None
                y = y.clone()
                y[mine] = moe.experts[e](src[ctx.rows[mine] % S])
                return y
            edits[f"{p}mlp.experts.{e}.hook_out"] = expert
    with intervene(model, edits):
        logits = model(ids.expand(n, -1), start_at_layer=layer, resid=resid, logits_to_keep=keep).logits
    return _with_logits(logits, keep, target["logits"], None)


def _patched_resid(model, layer, positions, source, target, ids, keep):
    """Logits (n, S, V) with the residual stream entering `layer` at positions[r] patched in row r.

    Only positions from the first patched one, p0, are computed: a causal model cannot change what comes
    before a patch, so each row keeps the target run's keys, values and logits there (the positions before
    p0 come from a KV cache of the target run, those between p0 and the row's own position are set to it).
    """
    n, p0, S = len(positions), min(positions), ids.shape[1]
    pos = torch.tensor(positions, device=ids.device)
    pre = f"model.layers.{layer}.hook_resid_pre"
    resid = target[pre][:, p0:].expand(n, -1, -1).clone()  # (n, S - p0, H)
    resid[torch.arange(n, device=ids.device), pos - p0] = source[pre][0, pos]
    before = torch.arange(S, device=ids.device)[None, :] < pos[:, None]  # (n, S): the target's own positions
    edits = {}
    if p0 < max(positions):
        for j in range(layer, model.config.num_hidden_layers):
            for kind in ("k", "v"):  # (1, nkv, S - p0, hd) post-RoPE, as the point carries them
                name = f"model.layers.{j}.self_attn.hook_{kind}"
                edits[name] = (lambda value, ctx, kept=target[name][:, :, p0:]:
                               torch.where(before[:, None, p0:, None], kept, value))
    with intervene(model, edits):
        cache = model.new_cache()  # the target run's keys and values before p0, in every layer from `layer` up
        for j in range(layer, model.config.num_hidden_layers):
            window = model.config.window(j)
            first = 0 if window is None else max(0, p0 - (window - 1))  # sliding layers keep W - 1 keys
            for store, kind in ((cache.keys, "k"), (cache.values, "v")):
                store[j] = target[f"model.layers.{j}.self_attn.hook_{kind}"][:, :, first:p0].expand(n, -1, -1, -1)
        cache.length = p0
        logits = model(ids[:, p0:].expand(n, -1), cache=cache, start_at_layer=layer, resid=resid,
                       logits_to_keep=min(keep, S - p0)).logits  # (n, <= S - p0, V)
    return _with_logits(logits, keep, target["logits"], before)


def attribution_patch(model, clean: torch.Tensor, corrupt: torch.Tensor, metric, site: str = "resid_pre") -> PatchingResult:
    """First-order estimate of `patch(...)` for every site at once: (a_clean - a_corrupt) . grad metric."""
    _check(model, clean, corrupt, site)
    if site == "experts":
        raise InputError("attribution_patch covers 'resid_pre' and 'heads'")
    L = model.config.num_hidden_layers
    point = "hook_resid_pre" if site == "resid_pre" else "self_attn.hook_z"
    names = [f"model.layers.{i}.{point}" for i in range(L)]
    with torch.no_grad():
        clean_logits, source = _run(model, clean)
    kept = {}

    def keep(value, ctx):
        value.retain_grad()
        kept[ctx.name] = value

    was = [p.requires_grad for p in model.parameters()]
    try:
        with torch.enable_grad():
            for p_ in model.parameters():
                p_.requires_grad_(False)
            handles = []
            try:
                # the gradient flows from the metric back to each site, not into the weights
                x = model.model.embed_tokens(corrupt).detach().requires_grad_(True)
                handles = [model.hooks.add(n, keep) for n in names]
                logits = model(corrupt, resid=x).logits
                value = metric(logits)
                if not isinstance(value, torch.Tensor) or value.numel() != 1:
                    raise InputError("metric: expected a scalar tensor (attribution patching differentiates it)")
                value.reshape(()).backward()
            finally:
                for h in handles:
                    h.remove()
    finally:
        for p_, w in zip(model.parameters(), was):
            p_.requires_grad_(w)
    rows = []
    for n in names:
        delta = (source[n] - kept[n].detach()) * kept[n].grad  # same shape as the site
        rows.append(delta.float().sum(-1)[0] if site == "resid_pre" else delta.float().sum(dim=(-1, 1))[0])
    columns = [str(p) for p in range(clean.shape[1])] if site == "resid_pre" else \
        [f"head {h}" for h in range(model.config.num_attention_heads)]
    m_corrupt = float(value.detach())
    return PatchingResult(torch.stack(rows).cpu() + m_corrupt, site, columns, _metric(metric, clean_logits), m_corrupt,
                          method="attribution patching")


