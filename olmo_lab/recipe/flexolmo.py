"""The FlexOlmo recipe (Shi et al. 2025, arXiv:2507.07024) as library functions, at any scale.

    stats = residual_stats(public_model, public_windows)                      # public, shared by all
    rows = gaussian_router_rows(stats, [residual_stats(public_model, code_windows).mean])  # (L, 2, H)
    owner = upcycle(public_model, "code", rows, train_router=False)  # [frozen public FFN, trainable copy]
    train_expert(owner, code_data, TrainConfig(...))       # each data owner alone, on its own data
    flex = merge(public_model, [owner_code, owner_math], ["code", "math"])   # no joint training
    with olmo_lab.experts_off(flex, ["math"]): ...         # opt-out == a merge that never had "math"

What each step does and why:
1. Anchor: a dense public model trained on public data only.
2. Upcycle (`upcycle`): every FFN becomes a 2-expert MoE, expert 0 = the public FFN (frozen), expert 1 =
   a copy to train; top-k = 2 of 2, so every token goes through both and the router only mixes.
3. Freeze (`freeze_shared`, `mask_public_grads`): embeddings, attention, norms and LM head get
   `requires_grad=False`, and so does the public expert (a separate tensor here). The public router
   row shares one (E, H) tensor with the trainable row, so -- as the FlexOlmo repo does for its fused
   tensors -- its gradient is zeroed after every backward. With weight decay 0 (checked), AdamW then
   never moves it. Every owner therefore trains against the *same* frozen public model: that shared
   coordinate system is what makes independently trained experts mergeable.
4. Router rows from domain embeddings, two ways:
   - `router_rows`, the paper's: row i = the mean embedding of domain i's documents from a fixed
     external embedder (the paper: GritLM-7B; here `HashedNgramEmbedder`, hashed character 3-grams
     through a seeded random projection, deterministic and download-free), scaled per layer;
   - `gaussian_router_rows`, what the lab models use: the embedder is the public model itself (a
     document's embedding at layer l = the mean of its feed-forward inputs), and rows S^-1 mu_i make
     the router a Gaussian classifier of the domain. An external embedder's space has nothing to do
     with this model's hidden states; at our scale rows from it, trained against the public row only,
     learned "not public", and after merging one row won nearly every token. In a merge, a layer's
     input has passed through the experts below it, so the lab build lets each owner re-measure mu_i
     on its own 2-expert model between training rounds and write the new rows (`set_router_rows`).
5. Merge (`merge`): stack [r_pub; r_1..r_n] and [FFN_pub, FFN_1..FFN_n]; shared weights come from the
   public model, and the merge asserts they are bit-identical in every owner's model.
6. Opt-out: `olmo_lab.experts_off(model, [name])` removes an expert before softmax and top-k, which is
   exactly the model merged without it (no router tuning happened, so no other weight saw its data).
7. Router tuning (`tune_router`, optional, the paper's "-RT"): only the router rows train, briefly,
   on a small mixed set. It is a small joint step and weakens the strict opt-out guarantee.

The router has no bias term: the paper adds a negative bias b_i to each closed expert's logit, but the
released checkpoints and transformers' FlexOlmo have none, and these checkpoints must load in
transformers. So a bias is folded into the row along the residual stream's mean direction, which is
nearly constant across tokens (`router_rows(public_margin=...)`, `gaussian_router_rows(closed_bias=...)`).

Variant (not in the paper): `train_expert(..., public_negatives=stream)` also shows a trainable *router
row* (never the expert) batches of public text, so r_i learns "domain i versus public" rather than only
"domain i"; no closed data is shared.
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple, Sequence

import torch

from ..modeling.config import FULL, SLIDING, OlmoConfig
from ..modeling.model import OlmoModel
from ..analysis.trace import trace
from .train import TokenStream, TrainConfig, TrainResult, lm_loss, train

PUBLIC = "public"


# ------------------------------------------------------------------------------------ embeddings
class HashedNgramEmbedder:
    """A fixed document embedder: hashed character n-gram counts -> seeded random projection -> unit norm.

    E(doc) = normalise(P^T c(doc)), with c the counts of the document's character n-grams hashed
    (md5, stable across runs and machines) into `buckets` bins, and P a (buckets, dim) Gaussian matrix
    drawn once from `seed`. Same text, same vector, on any machine.
    """

    def __init__(self, dim: int, n: int = 3, buckets: int = 8192, seed: int = 0):
        self.dim, self.n, self.buckets = dim, n, buckets
        g = torch.Generator().manual_seed(seed)
        self.projection = torch.randn(buckets, dim, generator=g) / dim ** 0.5  # (buckets, dim)

    def counts(self, text: str) -> torch.Tensor:
        """(buckets,) n-gram counts of one text."""
        grams = [text[i:i + self.n] for i in range(max(1, len(text) - self.n + 1))]
        index = [int.from_bytes(hashlib.md5(g.encode()).digest()[:4], "little") % self.buckets for g in grams]
        return torch.bincount(torch.tensor(index), minlength=self.buckets).float()

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, dim) unit-norm embeddings."""
        vectors = torch.stack([self.counts(t) for t in texts]) @ self.projection  # (N, dim)
        return vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def domain(self, docs: Sequence[str], max_docs: int = 1000, max_chars: int = 4000) -> torch.Tensor:
        """(dim,) the domain embedding: mean of the first `max_docs` documents' embeddings (each cut to max_chars)."""
        return self([d[:max_chars] for d in docs[:max_docs]]).mean(dim=0)


class ResidualStats(NamedTuple):
    """Statistics of each layer's feed-forward input h (the residual stream) over some text."""

    norm: torch.Tensor  # (L,) mean |h|
    mean: torch.Tensor  # (L, H)
    covariance: torch.Tensor  # (L, H, H)


@torch.no_grad()
def residual_stats(model: OlmoModel, windows: torch.Tensor, batch_size: int = 16) -> ResidualStats:
    """Mean norm, mean and covariance of every layer's feed-forward input over `windows` (N, S)."""
    L, H = model.config.num_hidden_layers, model.config.hidden_size
    norm, total = torch.zeros(L, dtype=torch.float64), torch.zeros(L, H, dtype=torch.float64)
    outer = torch.zeros(L, H, H, dtype=torch.float64)
    for i in range(0, len(windows), batch_size):
        with trace(model, attention=False, routing=False, residual=True) as tr:
            model(windows[i:i + batch_size])
        for layer in range(L):
            h = tr.block(layer, "resid_mid").reshape(-1, H).double().cpu()  # (B*S, H)
            norm[layer] += h.norm(dim=-1).sum()
            total[layer] += h.sum(dim=0)
            outer[layer] += h.T @ h
    n = windows.numel()  # tokens
    mean = total / n
    covariance = outer / n - mean[:, :, None] * mean[:, None, :]  # (L, H, H)
    return ResidualStats((norm / n).float(), mean.float(), covariance.float())


def _unit_logit(means: torch.Tensor) -> torch.Tensor:
    """(L, H) m / |m|^2 for each layer's mean residual m: a row that adds about 1 to every token's logit."""
    return means / (means * means).sum(-1, keepdim=True)


def router_rows(embeddings: torch.Tensor, norms: torch.Tensor, means: torch.Tensor | None = None,
                public_margin: float = 0.0) -> torch.Tensor:
    """(L, E, H) router weights from (E, H) domain embeddings (row 0 = public), one copy per layer.

    As in `dense_to_expert_moe.py` the same vectors go into every layer; each layer's copy is divided
    by that layer's mean residual norm, so the initial router logits are O(1).

    public_margin > 0 stands in for the paper's negative bias b_i = -margin on every closed expert,
    which a bias-free router cannot hold: the residual stream has a large mean component m (`means`,
    measured on public text), shared by all tokens, so adding margin * m / |m|^2 to the public row
    raises the public logit by about `margin` on a typical token. Closed experts then start "off" and
    each owner's row has to earn its expert's share on its own data -- the default stays public.
    """
    rows = embeddings[None] / norms[:, None, None]  # (L, E, H)
    if public_margin:
        rows[:, 0] += public_margin * _unit_logit(means)
    return rows


def gaussian_router_rows(public: ResidualStats, domain_means: Sequence[torch.Tensor], shrinkage: float = 0.1,
                         closed_bias: float = 0.0) -> torch.Tensor:
    """(L, 1 + n, H) router rows that make each layer's router a Gaussian domain classifier.

    Treat each domain's feed-forward inputs as Gaussian with its own mean mu_i (`domain_means[i]`,
    (L, H), measured by the owner on its own data with the frozen public model, or with its own
    2-expert model, whose expert changes the layers above the first) and one shared
    covariance S (the public text's, shrunk towards a multiple of I). Bayes' rule then gives linear
    logits  h . S^-1 mu_i  -  mu_i . S^-1 mu_i / 2,  so softmax(router) is the posterior P(domain | h).
    Each row needs only its own domain's mean and public statistics, so owners compute theirs
    independently and the rows of a merge still form one classifier. A bias-free router cannot add
    the constant, so it is folded along the public mean m: exact where h . m / |m|^2 = 1, which holds
    on average on public text and roughly elsewhere (the posterior is then approximate).
    closed_bias < 0 adds the paper's negative bias b_i to every closed expert's logit the same way: a
    prior for the public expert, so a closed expert needs evidence to take a token.
    """
    eye = torch.eye(public.mean.shape[-1])
    scale = public.covariance.diagonal(dim1=-2, dim2=-1).mean(-1)  # (L,)
    shrunk = (1 - shrinkage) * public.covariance + shrinkage * scale[:, None, None] * eye  # (L, H, H)
    mus = torch.stack([public.mean, *domain_means], dim=1)  # (L, E, H)
    # Cholesky, not torch.linalg.solve: with 2 threads, torch 2.13's CPU LU solve fails in MKL (DLASWP).
    factor = torch.linalg.cholesky(shrunk.double())  # (L, H, H)
    # One solve per row, so a row's bits never depend on which other rows were solved with it: the
    # merge checks that every owner's public row is identical.
    rows = torch.stack([torch.cholesky_solve(mus[:, e, :, None].double(), factor)[..., 0]
                        for e in range(mus.shape[1])], dim=1).float()  # (L, E, H): S^-1 mu_i
    constant = -0.5 * (rows * mus).sum(-1)  # (L, E)
    constant[:, 1:] += closed_bias
    return rows + constant[:, :, None] * _unit_logit(public.mean)[:, None, :]


# ------------------------------------------------------------------------------------ upcycling
def flex_config(dense: OlmoConfig, expert_names: list[str], top_k: int | None = None) -> OlmoConfig:
    """The FlexOlmo config with `dense`'s shapes and these experts.

    FlexOlmo has full attention in every layer. An OLMo 3 anchor with sliding-window layers computes
    the same thing only while the context fits the window, so the MoE's `max_position_embeddings`
    becomes the window: train and evaluate the MoE at contexts up to that length.
    """
    if dense.is_moe:
        raise ValueError("expected a dense public model, got a FlexOlmo model")
    max_pos = dense.max_position_embeddings
    if SLIDING in dense.layer_types:
        if dense.rope[SLIDING].to_dict() != dense.rope[FULL].to_dict():
            raise ValueError("sliding and full layers use different RoPE; the FlexOlmo MoE cannot reproduce both")
        max_pos = min(max_pos, dense.sliding_window)
    return dense.replace(model_type="flex_olmo", layer_types=[FULL] * dense.num_hidden_layers, sliding_window=None,
                         rope={FULL: dense.rope[FULL]}, max_position_embeddings=max_pos,
                         num_experts=len(expert_names), num_experts_per_tok=top_k or len(expert_names),
                         expert_names=list(expert_names), dtype=None)


def upcycle(dense: OlmoModel, expert_name: str, rows: torch.Tensor | None = None, train_router: bool = True) -> OlmoModel:
    """A 2-expert FlexOlmo [public, expert_name] whose experts both start as `dense`'s FFN.

    rows: (L, 2, H) router weights (`router_rows`); None keeps FlexOlmo's no-embedding init,
    trunc_normal(std=0.002, a=-0.006, b=0). The result is frozen with `freeze_shared`, ready for
    `train_expert`; train_router=False also keeps the owner's router row where `rows` put it.
    """
    config = flex_config(dense.config, [PUBLIC, expert_name], top_k=2)
    moe = OlmoModel(config)
    state = {}
    for key, value in dense.state_dict().items():
        if ".mlp." in key:  # model.layers.{i}.mlp.{proj}.weight -> ...mlp.experts.{0,1}.{proj}.weight
            prefix, proj = key.split(".mlp.")
            for e in range(2):
                state[f"{prefix}.mlp.experts.{e}.{proj}"] = value.clone()
        else:
            state[key] = value.clone()
    for i, block in enumerate(moe.model.layers):
        if rows is None:
            torch.nn.init.trunc_normal_(block.mlp.gate.weight, std=0.002, a=-0.006, b=0.0)
        else:
            block.mlp.gate.weight.data.copy_(rows[i])
        state[f"model.layers.{i}.mlp.gate.weight"] = block.mlp.gate.weight.detach().clone()
    moe.load_state_dict(state, strict=True)
    freeze_shared(moe, train_router)
    return moe


@torch.no_grad()
def set_router_rows(model: OlmoModel, rows: torch.Tensor) -> None:
    """Write (L, E, H) router weights into every layer's router, e.g. rows re-measured by an owner."""
    expected = (model.config.num_hidden_layers, model.config.num_experts, model.config.hidden_size)
    if tuple(rows.shape) != expected:
        raise ValueError(f"router rows have shape {tuple(rows.shape)}; this model needs {expected} (L, E, H)")
    for i, block in enumerate(model.model.layers):
        block.mlp.gate.weight.copy_(rows[i])


def freeze_shared(model: OlmoModel, train_router: bool = True) -> None:
    """Only the non-public experts (and the router) train; everything inherited from the anchor is frozen."""
    for name, p in model.named_parameters():
        router = train_router and ".mlp.gate." in name
        p.requires_grad = router or (".mlp.experts." in name and ".mlp.experts.0." not in name)


def mask_public_grads(model: OlmoModel) -> None:
    """Zero the public router row's gradient (row 0 of every `mlp.gate.weight`), after backward."""
    for block in model.model.layers:
        grad = block.mlp.gate.weight.grad
        if grad is not None:
            grad[0] = 0


# ------------------------------------------------------------------------------------ training
def train_expert(model: OlmoModel, data: TokenStream, config: TrainConfig, *,
                 public_negatives: TokenStream | None = None, negative_batch_size: int | None = None,
                 **train_kwargs) -> TrainResult:
    """One data owner's training: the 2-expert `model` learns from `data` only (see the module docstring).

    With `public_negatives`, each step first back-propagates the LM loss of a public batch and then
    discards the expert's part of that gradient, so only the router row learns from public text.
    """
    if config.weight_decay:
        raise ValueError("train_expert needs weight_decay=0: AdamW's decay would move the frozen public router "
                         "row even though its gradient is zeroed")
    if public_negatives is not None and not any(b.mlp.gate.weight.requires_grad for b in model.model.layers):
        raise ValueError("public_negatives train the router rows only, but this model's router is frozen "
                         "(upcycle(train_router=False)); drop public_negatives or let the router train")
    trainable_experts = [p for b in model.model.layers for e in b.mlp.experts[1:] for p in e.parameters()]

    def step_fn(model, step):
        if public_negatives is not None:
            negatives = public_negatives.batch(step, negative_batch_size or config.batch_size // 2,
                                               config.seq_len, config.seed + 1)
            lm_loss(model, negatives).backward()
            for p in trainable_experts:  # the expert never learns from anything but its own data
                p.grad = None
        loss = lm_loss(model, data.batch(step, config.batch_size, config.seq_len, config.seed))
        loss.backward()
        return loss.item()

    return train(model, data, config, step_fn=step_fn, after_backward=mask_public_grads, **train_kwargs)


def tune_router(model: OlmoModel, data: TokenStream, config: TrainConfig, **train_kwargs) -> TrainResult:
    """Optional router tuning: only the router rows (all of them, r_pub included) train on `data`."""
    saved = {name: p.requires_grad for name, p in model.named_parameters()}
    for name, p in model.named_parameters():
        p.requires_grad = ".mlp.gate." in name
    try:
        return train(model, data, config, **train_kwargs)
    finally:
        for name, p in model.named_parameters():
            p.requires_grad = saved[name]


# ------------------------------------------------------------------------------------ merging
def shared_state(model: OlmoModel) -> dict[str, torch.Tensor]:
    """Every tensor outside the feed-forward: embeddings, attention, norms, LM head."""
    return {k: v for k, v in model.state_dict().items() if ".mlp." not in k}


def merge(public: OlmoModel, experts: Sequence[OlmoModel], names: Sequence[str], top_k: int | None = None) -> OlmoModel:
    """One FlexOlmo [public, *names] from the dense anchor and each owner's 2-expert model, without training.

    Asserts the coordination constraint the FlexOlmo merge script checks: every owner's shared
    weights, public expert and public router row are bit-identical to the anchor's (and to each other).
    top_k: experts per token (default: all).
    """
    if len(experts) != len(names):
        raise ValueError(f"{len(experts)} expert models but {len(names)} names")
    config = flex_config(public.config, [PUBLIC, *names], top_k=top_k)
    anchor = public.state_dict()
    owners = [owner.state_dict() for owner in experts]
    state = {k: v.clone() for k, v in shared_state(public).items()}
    for name, owner, sd in zip(names, experts, owners):
        if owner.config.num_experts != 2:
            raise ValueError(f"expert model {name!r} has {owner.config.num_experts} experts; expected 2 (public + one)")
        for k, v in shared_state(owner).items():
            if not torch.equal(v, anchor[k]):
                raise ValueError(f"expert model {name!r}: shared weight {k} differs from the public model's")
    projs = ("gate_proj", "up_proj", "down_proj")
    for i in range(config.num_hidden_layers):
        prefix = f"model.layers.{i}.mlp"
        r_pub = owners[0][f"{prefix}.gate.weight"][0]  # (H,)
        for name, sd in zip(names, owners):
            if not torch.equal(sd[f"{prefix}.gate.weight"][0], r_pub):
                raise ValueError(f"expert model {name!r}: public router row of layer {i} differs from the others'")
            for proj in projs:
                if not torch.equal(sd[f"{prefix}.experts.0.{proj}.weight"], anchor[f"{prefix}.{proj}.weight"]):
                    raise ValueError(f"expert model {name!r}: public expert {proj} of layer {i} was changed")
        for proj in projs:  # slot 0: the anchor's FFN; slot j: owner j's trained expert (its slot 1)
            state[f"{prefix}.experts.0.{proj}.weight"] = anchor[f"{prefix}.{proj}.weight"].clone()
            for j, sd in enumerate(owners, start=1):
                state[f"{prefix}.experts.{j}.{proj}.weight"] = sd[f"{prefix}.experts.1.{proj}.weight"].clone()
        state[f"{prefix}.gate.weight"] = torch.stack([r_pub] + [sd[f"{prefix}.gate.weight"][1] for sd in owners])  # (E, H)
    merged = OlmoModel(config)
    merged.load_state_dict(state, strict=True)
    return merged.eval()
