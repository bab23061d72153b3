"""Exercise 8, a causal experiment: which of olmo3-lab's heads does the copying on repeated tokens?

    copy_loss(logits, ids)                 -> the mean loss on the predictable tokens of the second copy
    ablate(model, ids, layer, head)        -> logits with that head's output zeroed (olmo_lab.interventions)
    head_effects(model, ids)               -> (L, nh): how much zeroing each head raises the copy loss

ids are rows [r, r] of random tokens. The checkers compute their answers without the interventions
API: zeroing a head's output (hook_z) is zeroing its slice of o_proj's input, done here with a plain
torch forward pre-hook, so the API the student uses is checked against an independent computation.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import cache

import torch
import torch.nn.functional as F

from ..analysis.heads import repeated_random_tokens
from .grading import Case, Mistake, Verdict, grade
from .weights import lab_library_model


def copy_task(length: int = 24, batch: int = 8, seed: int = 0) -> torch.Tensor:
    """(batch, 2 * length) rows [r, r] of random olmo3-lab tokens (its two special tokens excluded)."""
    return repeated_random_tokens(lab_library_model("olmo3-lab").config.vocab_size - 2, length, batch, seed)


# ------------------------------------------------------------------------------------ the loss
def reference_copy_loss(logits, ids):
    """Cross-entropy of tokens n+1 .. 2n-1 (the second copy but its first token, which nothing predicts)."""
    n = ids.shape[1] // 2
    return F.cross_entropy(logits[:, n:-1].flatten(0, 1).float(), ids[:, n + 1:].flatten())


LOSS_MISTAKES = [
    Mistake("not_shifted", "the logits at position t predict token t+1: compare logits[:, t] with ids[:, t+1]",
            lambda lg, ids: F.cross_entropy(lg[:, ids.shape[1] // 2:].flatten(0, 1).float(),
                                            ids[:, ids.shape[1] // 2:].flatten())),
    Mistake("whole_sequence", "the loss covers the whole sequence; the copy loss is the second copy's only",
            lambda lg, ids: F.cross_entropy(lg[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())),
    Mistake("includes_first_copied_token", "the loss includes the second copy's first token, which nothing in "
            "the context predicts; start at the one after it",
            lambda lg, ids: F.cross_entropy(lg[:, ids.shape[1] // 2 - 1:-1].flatten(0, 1).float(),
                                            ids[:, ids.shape[1] // 2:].flatten())),
]


@cache
def loss_cases() -> list[Case]:
    model, ids = lab_library_model("olmo3-lab"), copy_task(length=16, batch=4, seed=1)
    g = torch.Generator().manual_seed(8)
    with torch.no_grad():
        logits = model(ids).logits
    return [Case("olmo3-lab's logits on 4 rows [r, r] of 16 random tokens", (logits, ids)),
            Case("random logits over 50 tokens", (torch.randn(2, 10, 50, generator=g),
                                                  torch.randint(0, 50, (2, 10), generator=g)))]


def check_copy_loss(copy_loss) -> Verdict:
    """Exercise 8a: grade `copy_loss(logits (B, 2n, V), ids (B, 2n)) -> scalar`."""
    return grade("copy_loss", copy_loss, reference_copy_loss, loss_cases(), LOSS_MISTAKES)


# ------------------------------------------------------------------------------------ the ablation
@contextmanager
def zeroed(model, layers, head_slice, positions=None):
    """Zero part of o_proj's input (B, S, nh*hd) in some layers: a plain torch pre-hook, removed on exit."""
    def hook(module, args):
        z = args[0].clone()
        if positions is None:
            z[..., head_slice] = 0
        else:
            z[:, positions] = 0
        return (z,)
    handles = [model.model.layers[i].self_attn.o_proj.register_forward_pre_hook(hook) for i in layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _head(model, head):
    hd = model.config.head_dim
    return slice(head * hd, (head + 1) * hd)


def reference_ablate(model, ids, layer, head):
    with torch.no_grad(), zeroed(model, [layer], _head(model, head)):
        return model(ids).logits


ABLATION_MISTAKES = [
    Mistake("whole_layer", "the whole attention layer was zeroed; zero one head: Zero(heads=[head]) on "
            "model.layers.{layer}.self_attn.hook_z",
            lambda m, ids, layer, head: _run_zeroed(m, ids, [layer], slice(None))),
    Mistake("positions_not_heads", "Zero(positions=[head]) zeroes a token position, not a head: use heads=[head]",
            lambda m, ids, layer, head: _run_zeroed(m, ids, [layer], None, positions=[head])),
    Mistake("every_layer", "the head was zeroed in every layer; only in the layer asked for",
            lambda m, ids, layer, head: _run_zeroed(m, ids, range(m.config.num_hidden_layers), _head(m, head))),
]


def _run_zeroed(model, ids, layers, head_slice, positions=None):
    with torch.no_grad(), zeroed(model, layers, head_slice, positions):
        return model(ids).logits


@cache
def ablation_cases() -> list[Case]:
    model, ids = lab_library_model("olmo3-lab"), copy_task(length=12, batch=2, seed=2)
    return [Case(f"olmo3-lab, layer {layer} head {head}", (model, ids, layer, head))
            for layer, head in [(3, 0), (2, 0), (0, 3)]]


def check_ablation(ablate) -> Verdict:
    """Exercise 8b: grade `ablate(model, ids, layer, head) -> logits` (B, S, V) with that head zeroed."""
    return _untouched("ablation", lambda: grade("ablation", ablate, reference_ablate, ablation_cases(),
                                                 ABLATION_MISTAKES))


# ------------------------------------------------------------------------------------ the experiment
def reference_effects(model, ids):
    with torch.no_grad():
        clean = reference_copy_loss(model(ids).logits, ids)
    L, nh = model.config.num_hidden_layers, model.config.num_attention_heads
    return torch.tensor([[float(reference_copy_loss(reference_ablate(model, ids, layer, head), ids) - clean)
                          for head in range(nh)] for layer in range(L)])


EFFECT_MISTAKES = [
    Mistake("sign_flipped", "the sign is flipped: the effect is the ablated loss minus the clean loss (positive: "
            "the head helps)", lambda m, ids: -reference_effects(m, ids)),
]


@cache
def effect_cases() -> list[Case]:
    return [Case("olmo3-lab on 2 rows [r, r] of 12 random tokens",
                 (lab_library_model("olmo3-lab"), copy_task(length=12, batch=2, seed=4)))]


def check_head_effects(head_effects) -> Verdict:
    """Exercise 8c: grade `head_effects(model, ids) -> (L, nh)` float tensor of copy-loss increases."""
    def as_float(model, ids):
        out = head_effects(model, ids)
        return torch.as_tensor(out, dtype=torch.float32)
    return _untouched("head effects", lambda: grade("head effects", as_float, reference_effects, effect_cases(),
                                                     EFFECT_MISTAKES, tol=1e-4))


def _untouched(exercise: str, run) -> Verdict:
    """Run a check, then make sure the student's code left the shared lab model as it found it."""
    model, ids = lab_library_model("olmo3-lab"), copy_task(length=8, batch=1, seed=3)
    with torch.no_grad():
        before = model(ids).logits
    verdict = run()
    with torch.no_grad():
        after = model(ids).logits
    if not torch.equal(after, before):
        return Verdict(exercise, "error", "your code left the model changed (an intervention still attached? "
                       "use `with intervene(...):` so it is removed)")
    return verdict
