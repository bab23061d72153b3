"""How well can router rows classify a token's domain on the public model's own residual streams?

    python -m lab.probe_routing     # needs the lab data (lab/build_data.py); about a minute on 2 cores

In the merged FlexOlmo each layer's input has been changed by the experts below it (routing drift).
This probe removes that: it classifies held-out tokens of every domain with the rows of the rebuild's
first training round, measured on the frozen olmo3-lab, and compares other ways of computing them:
- those rows (`gaussian_router_rows`: shared public covariance, constant folded along m);
- the same Gaussian classifier with a true bias term (a bias-free FlexOlmo router cannot have one);
- the constant folded along the minimum-variance direction S^-1 m instead of m;
- each owner's covariance pooled from public and its own text (a domain-vs-public discriminant).
Prints, per rule and domain, the share of tokens whose highest logit is the domain's own row, per layer.
"""

from __future__ import annotations

import torch

from lab import build_data
from lab.rebuild import CLOSED, PRESETS
from olmo_lab import load_model, load_tokenizer
from olmo_lab.flexolmo import gaussian_router_rows, residual_stats
from olmo_lab.lab import lab_model
from olmo_lab.trace import trace
from olmo_lab.train import TokenStream

DOMAINS = ["public", *CLOSED]


def shrink(covariance: torch.Tensor, shrinkage: float = 0.1) -> torch.Tensor:
    """(L, H, H) covariance shrunk towards a multiple of I, as `gaussian_router_rows` does."""
    scale = covariance.diagonal(dim1=-2, dim2=-1).mean(-1)
    return (1 - shrinkage) * covariance + shrinkage * scale[:, None, None] * torch.eye(covariance.shape[-1])


def solve(matrix: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """(L, E, H) matrix^-1 v for each layer's (H, H) matrix and its E vectors (L, E, H)."""
    return torch.cholesky_solve(vectors.double().transpose(1, 2), torch.linalg.cholesky(matrix.double())) \
        .transpose(1, 2).float()


def main() -> None:
    torch.manual_seed(0)
    p = PRESETS["full"]
    path = lab_model("olmo3-lab")
    model, tok = load_model(path, dtype=torch.float32), load_tokenizer(path)
    L, H = model.config.num_hidden_layers, model.config.hidden_size
    streams = {d: {part: TokenStream.from_texts(tok, build_data.read_docs(d, part)) for part in ("train", "heldout")}
               for d in DOMAINS}
    stats = {d: residual_stats(model, streams[d]["train"].windows(p["window"], p["stats_windows"])[:, :-1])
             for d in DOMAINS}
    held = {}
    for d in DOMAINS:
        with torch.no_grad(), trace(model, attention=False, routing=False, residual=True) as tr:
            model(streams[d]["heldout"].windows(p["window"], 16)[:, :-1])
        held[d] = torch.stack([tr.block(layer, "resid_mid").reshape(-1, H) for layer in range(L)])  # (L, N, H)

    pub, bias = stats["public"], p["closed_bias"]
    S = shrink(pub.covariance)
    mus = torch.stack([stats[d].mean for d in DOMAINS], dim=1)  # (L, E, H)
    closed = torch.tensor([0.0] + [bias] * len(CLOSED))  # (E,)
    w = solve(S, mus)  # (L, E, H): S^-1 mu_i
    constant = -0.5 * (w * mus).sum(-1) + closed  # (L, E)
    u = solve(S, pub.mean[:, None, :])[:, 0]  # (L, H): S^-1 m, scaled so that m . u = 1
    u = u / (u * pub.mean).sum(-1, keepdim=True)
    pooled = [solve(shrink(0.5 * (pub.covariance + stats[d].covariance)), (mus[:, e] - mus[:, 0])[:, None])[:, 0]
              for e, d in enumerate(DOMAINS)]  # each owner's discriminant against public, (L, H) each
    pooled_w = torch.stack(pooled, dim=1)  # (L, E, H); the public row is 0
    pooled_c = -(pooled_w * 0.5 * (mus + mus[:, :1])).sum(-1) + closed
    shipped = torch.stack([gaussian_router_rows(pub, [stats[d].mean], closed_bias=bias)[:, min(e, 1)]
                           for e, d in enumerate(DOMAINS)], dim=1)  # (L, E, H), as the merge stacks them
    rules = {"shipped rows (constant folded along m)": (shipped, None),
             "Gaussian classifier with a true bias": (w, constant),
             "constant folded along S^-1 m": (w + constant[:, :, None] * u[:, None, :], None),
             "per-owner pooled covariance, true bias": (pooled_w, pooled_c)}
    print(f"share of held-out tokens whose top row is their own domain's, layers 0-{L - 1} (closed bias {bias})")
    for name, (rows, const) in rules.items():
        cells = []
        for e, d in enumerate(DOMAINS):
            logits = torch.einsum("lnh,leh->lne", held[d], rows)
            if const is not None:
                logits = logits + const[:, None, :]
            right = (logits.argmax(-1) == e).float().mean(-1)  # (L,)
            cells.append(f"{d} " + "/".join(f"{x:.2f}" for x in right.tolist()))
        print(f"{name:40s} " + "  ".join(cells))


if __name__ == "__main__":
    main()
