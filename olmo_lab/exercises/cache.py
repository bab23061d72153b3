"""Exercise 6, the KV cache: a class `Cache(windows)` and a function `cache_mask(q_len, past, window)`.

`Cache.update(layer, k, v)` appends this step's (B, nkv, S, hd) keys/values and returns every key/value
the step can attend to; a sliding layer with window W keeps only its last W-1 keys (the next query is
the W-th), full layers keep everything; `Cache.layer_length(layer)` says how many it holds.
`cache_mask(q_len, past, window)` -> (q_len, kv_len) bool: which of the returned keys each new query
may see (`past` tokens came before; the cache returned kv_len = kept past + q_len keys).
When both are right, the checker plugs the student's cache into the library model and generates past
olmo3-lab's window of 128, comparing the tokens with the library's own cached generation.
"""

from __future__ import annotations

from functools import cache

import torch

from ..modeling.attention import build_mask
from ..modeling.cache import KVCache
from ..modeling.generate import generate
from ..recipe.lab import lab_model
from ..checkpoints.tokenizer import load_tokenizer
from .forward import lab_text_ids
from .grading import Case, Mistake, Verdict, grade
from .weights import lab_library_model


class SketchCache:
    """The cache with switches for the known mistakes (defaults: the library's behaviour)."""

    def __init__(self, windows, keep=lambda w: w - 1, trim_full: bool = False, oldest: bool = False,
                 return_kept: bool = False):
        self.windows, self.keep, self.trim_full, self.oldest, self.return_kept = windows, keep, trim_full, oldest, return_kept
        self.k, self.v = [None] * len(windows), [None] * len(windows)

    def update(self, layer, k, v):
        if self.k[layer] is not None:
            k, v = torch.cat([self.k[layer], k], dim=2), torch.cat([self.v[layer], v], dim=2)  # (B, nkv, past+S, hd)
        window = self.windows[layer] or (min(w for w in self.windows if w) if self.trim_full else None)
        n = k.shape[2] if window is None else min(k.shape[2], self.keep(window))
        kept = slice(0, n) if self.oldest else slice(k.shape[2] - n, k.shape[2])
        self.k[layer], self.v[layer] = k[:, :, kept], v[:, :, kept]
        return (self.k[layer], self.v[layer]) if self.return_kept else (k, v)

    def layer_length(self, layer):
        return 0 if self.k[layer] is None else self.k[layer].shape[2]


def run_cache(cache_cls, windows, steps):
    """Feed (layer, k, v) steps to a new cache; the outputs and lengths after each step."""
    c = cache_cls(windows)
    return [(*c.update(layer, k, v), torch.tensor(c.layer_length(layer))) for layer, k, v in steps]


def _library(windows):
    return KVCache(windows, 0, ())


UPDATE_MISTAKES = [
    Mistake("keeps_w", "the sliding layers keep W past keys; they need only W-1 (the new query is the W-th "
            "key of its window)", lambda w, s: run_cache(lambda ws: SketchCache(ws, keep=lambda n: n), w, s)),
    Mistake("keeps_w_minus_2", "the sliding layers keep W-2 past keys; they need W-1 (the new query is the W-th)",
            lambda w, s: run_cache(lambda ws: SketchCache(ws, keep=lambda n: n - 2), w, s)),
    Mistake("unbounded", "the sliding layers are not bounded: they keep every key, so memory grows with the "
            "generation", lambda w, s: run_cache(lambda ws: SketchCache(ws, keep=lambda n: 10**9), w, s)),
    Mistake("keeps_oldest", "the sliding layers keep their oldest keys; keep the most recent W-1",
            lambda w, s: run_cache(lambda ws: SketchCache(ws, oldest=True), w, s)),
    Mistake("returns_kept", "update returns only the kept keys; it must return every key this step can see "
            "(the kept past plus all new keys: a long prompt needs more than W-1)",
            lambda w, s: run_cache(lambda ws: SketchCache(ws, return_kept=True), w, s)),
    Mistake("trims_full_layers", "full-attention layers are trimmed too; they keep everything",
            lambda w, s: run_cache(lambda ws: SketchCache(ws, trim_full=True), w, s)),
]


def _steps(seed: int, batch: int, prefill: int, singles: int, layers: int = 2) -> list:
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in [prefill] + [1] * singles:
        for layer in range(layers):
            out.append((layer, torch.randn(batch, 2, s, 4, generator=g), torch.randn(batch, 2, s, 4, generator=g)))
    return out


@cache
def update_cases() -> list[Case]:
    return [
        Case("windows [4, full]: a 3-token prompt, then 6 single tokens", ([4, None], _steps(6, 1, 3, 6))),
        Case("windows [4, full]: a 7-token prompt (longer than W-1), then 3 single tokens",
             ([4, None], _steps(7, 2, 7, 3))),
        Case("windows [full, 2, 5]: a 2-token prompt, then 5 single tokens", ([None, 2, 5], _steps(8, 1, 2, 5, 3))),
    ]


# ------------------------------------------------------------------------------------ mask
def library_mask(q_len: int, past: int, window) -> torch.Tensor:
    """The library's mask as (q_len, kv_len) bool (it leaves plain causal masks to SDPA: None)."""
    m = build_mask(1, q_len, past, window, None, "cpu")
    if m.allowed is not None:
        return m.allowed[0, 0]
    return torch.ones(q_len, m.kv_len, dtype=torch.bool).tril(m.kv_len - q_len)


def sketch_mask(q_len, past, window, *, causal: bool = True, offset: bool = True, shift: int = 0):
    kv_start = past - min(past, window - 1) if window else 0
    q = torch.arange(past, past + q_len)[:, None] if offset else torch.arange(q_len)[:, None]  # (q_len, 1)
    kv = torch.arange(kv_start, past + q_len)[None] if offset else torch.arange(past + q_len - kv_start)[None]
    allowed = kv <= q if causal else torch.ones(q_len, kv.shape[1], dtype=torch.bool)
    if window:
        allowed = allowed & (kv > q - (window + shift))
    return allowed


MASK_MISTAKES = [
    Mistake("no_causal_mask_first_call", "causal mask missing on the first call: one new token may see every "
            "returned key, but the prompt's queries (and any chunk of several) must not see later ones",
            lambda *a: sketch_mask(*a, causal=False)),
    Mistake("positions_not_offset", "query and key positions are not offset by what came before: query i sits "
            "at position past + i, and the first returned key at past - (number of kept keys)",
            lambda *a: sketch_mask(*a, offset=False)),
    Mistake("window_w_minus_1", "window off by one: each query must see W keys, itself included",
            lambda *a: sketch_mask(*a, shift=-1)),
    Mistake("window_w_plus_1", "window off by one: each query must see W keys, itself included, not W+1",
            lambda *a: sketch_mask(*a, shift=1)),
]


@cache
def mask_cases() -> list[Case]:
    return [Case(f"q_len={q}, past={p}, window={w}", (q, p, w)) for q, p, w in
            [(5, 0, 3), (1, 10, 4), (3, 10, 4), (1, 10, None), (6, 0, None), (2, 1, 4), (4, 2, None)]]


def check_cache_mask(mask_fn) -> Verdict:
    """Exercise 6b: grade `mask_fn(q_len, past, window) -> (q_len, kv_len) bool` (window None: full attention)."""
    return grade("cache_mask", mask_fn, library_mask, mask_cases(), MASK_MISTAKES)


# ------------------------------------------------------------------------------------ end to end
class StudentCache(KVCache):
    """The library model's cache with the student's storage inside."""

    def __init__(self, student, model):
        super().__init__([model.config.window(i) for i in range(model.config.num_hidden_layers)], id(model),
                         model.cache_key)
        self.student = student

    def update(self, layer, k, v, mask=None):
        return self.student.update(layer, k, v)


def check_kv_cache(cache_cls, prompt_tokens: int = 100, new_tokens: int = 40) -> Verdict:
    """Exercise 6a: grade `cache_cls(windows)` (update / layer_length), then generate with it on olmo3-lab."""
    verdict = grade("KV cache", lambda w, s: run_cache(cache_cls, w, s), lambda w, s: run_cache(_library, w, s),
                    update_cases(), UPDATE_MISTAKES)
    if not verdict.correct:
        return verdict
    model = lab_library_model("olmo3-lab")
    ids = lab_text_ids(prompt_tokens)
    student = cache_cls(model.new_cache().windows)
    c = StudentCache(student, model)
    tokens, longest = [], 0
    with torch.no_grad():
        step = ids
        for _ in range(new_tokens):
            nxt = model(step, cache=c).logits[:, -1].argmax(-1, keepdim=True)  # (1, 1) greedy
            tokens.append(int(nxt))
            step = nxt
            longest = max(longest, *(student.layer_length(i) for i, w in enumerate(c.windows) if w))
    library = generate(model, None, ids, max_new_tokens=new_tokens)[0]
    n = min(len(tokens), len(library))  # the library stops at an end-of-text token
    if tokens[:n] != library[:n]:
        first = next(i for i in range(n) if tokens[i] != library[i])
        return Verdict("KV cache", "diverges", f"generation with your cache departs from the library's at new "
                       f"token {first} (position {prompt_tokens + first})")
    W = model.config.sliding_window
    verdict.message += (f"\n  {new_tokens} greedy tokens after a {prompt_tokens}-token prompt on olmo3-lab (past "
                        f"its window of {W}) agree with the library's; your sliding layers held at most "
                        f"{longest} keys (W-1 = {W - 1})")
    return verdict
