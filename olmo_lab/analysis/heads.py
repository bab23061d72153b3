"""Finding attention heads by what they do: previous-token heads and induction heads, scored per head.

    scores = previous_token_scores(model, ids)   # (L, nh): mean attention from position i to i-1
    scores = induction_scores(model)             # (L, nh): on [r, r] with r random tokens, mean attention
                                                 # from the 2nd copy's token t to the token after t's 1st copy
    best_head(scores)                            # (layer, head, score)

A previous-token head copies "what came just before" into each position; an induction head then
looks for an earlier occurrence of the current token and attends to the token that followed it, so
the model can continue a repeated sequence -- the two-head circuit of Olsson et al. (2022). Random
tokens make the induction score measure copying, not knowledge of the language.
"""

from __future__ import annotations

import torch

from .trace import trace


@torch.no_grad()
def attention_maps(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """Per layer, the attention probabilities (B, nh, S, S) of `model` on ids (B, S), via `olmo_lab.trace`."""
    with trace(model, attention=True, routing=False) as tr:
        model(ids)
    attention = tr.attention
    return [attention[i] for i in range(len(model.model.layers))]


def previous_token_scores(model, ids: torch.Tensor) -> torch.Tensor:
    """(L, nh) mean attention weight from each position i >= 1 to position i - 1, over ids (B, S)."""
    scores = []
    for probs in attention_maps(model, ids):  # (B, nh, S, S)
        scores.append(probs.diagonal(offset=-1, dim1=-2, dim2=-1).mean(dim=(0, 2)))  # (nh,)
    return torch.stack(scores)


def repeated_random_tokens(vocab: int, length: int = 48, batch: int = 8, seed: int = 0,
                           low: int = 0) -> torch.Tensor:
    """(batch, 2 * length) rows [r, r]: `length` random ids from [low, vocab), repeated once."""
    g = torch.Generator().manual_seed(seed)
    r = torch.randint(low, vocab, (batch, length), generator=g)
    return torch.cat([r, r], dim=1)


def induction_scores(model, ids: torch.Tensor | None = None, length: int = 48, vocab: int | None = None,
                     seed: int = 0) -> torch.Tensor:
    """(L, nh) induction score: mean attention from position length + i to position i + 1 on [r, r] rows.

    ids: (B, 2 * length) repeated sequences; by default `repeated_random_tokens` over the first
    `vocab` ids (default: the model's vocabulary minus its last two, the special tokens).
    """
    if ids is None:
        ids = repeated_random_tokens(vocab or model.config.vocab_size - 2, length, seed=seed)
    length = ids.shape[1] // 2
    scores = []
    for probs in attention_maps(model, ids):  # (B, nh, 2L, 2L)
        # query length + i (i = 0 .. length - 1) looks back length - 1 positions: to the token after r_i's first copy
        scores.append(probs.diagonal(offset=-(length - 1), dim1=-2, dim2=-1)[..., 1:].mean(dim=(0, 2)))
    return torch.stack(scores)


def best_head(scores: torch.Tensor) -> tuple[int, int, float]:
    """(layer, head, score) of the highest-scoring head in an (L, nh) score table."""
    flat = int(scores.argmax())
    layer, head = divmod(flat, scores.shape[1])
    return layer, head, float(scores[layer, head])
