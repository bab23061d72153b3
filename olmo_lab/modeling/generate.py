"""Text generation with a KV cache: greedy or sampled, EOS and stop strings, left-padded batches, streaming.

    generate(model, tok, "Once upon a time", max_new_tokens=20)          # -> continuation text
    generate(model, None, [[1, 2, 3]], max_new_tokens=5)                 # ids in, ids out
    for piece in generate(model, tok, "Hi", stream=True): print(piece, end="")

The prompt is run once (prefill), then one token per step reads the cache; sliding-window layers keep
only their window, so memory stays bounded on long generations. Positions follow the attention mask
(`cumsum(mask) - 1`), so left padding does not shift a sequence. If the expert toggles or the
interventions change while a stream is being consumed, the cache is stale: the prefix is recomputed.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch

from .decode_step import CompiledDecode, refuse_hooks
from ..errors import GenerationError, TokenizerError, brief


def generate(model, tokenizer, prompt_or_ids, max_new_tokens: int = 32, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             stop: str | list[str] | None = None, stream: bool = False, eos_token_id=None,
             cache: str = "dynamic", compile: bool = False):
    """Continue a prompt (str, list of str, list of ids, list of id lists, or a (B, S) tensor).

    Returns the continuation in the prompt's form: text for text, new token ids for ids. With
    `stream=True`, an iterator of text pieces (of id lists when ids are given), batch size 1.
    temperature 0 is greedy; > 0 samples (optionally restricted by top_k / top_p) from a generator
    seeded with `seed`. Generation ends at an EOS token (the model's, the tokenizer's, or
    `eos_token_id`) or a `stop` string; the text is cut before the stop string.
    cache: "dynamic" (grows by concatenation; the default) or "static" (preallocated, the same logits);
    compile=True (needs cache="static") runs each decode step through torch.compile: no hooks, and the
    first call compiles (seconds); see olmo_lab.decode_step.
    """
    ids, mask, as_text, single = _encode(model, tokenizer, prompt_or_ids)
    stops = _stops(stop)
    _check_args(model, ids, max_new_tokens, temperature, top_k, top_p, seed, stops, tokenizer, stream)
    _check_cache_args(model, cache, compile)
    eos = _eos_ids(model, tokenizer, _check_eos(eos_token_id))
    sampler = Sampler(temperature, top_k, top_p, seed, _vocab_limit(model, tokenizer))
    steps = decode(model, ids, mask, max_new_tokens, sampler, eos, _stop_check(tokenizer, stops),
                   static=cache == "static", compile=compile)
    if stream:
        return _stream_text(steps, tokenizer, stops) if as_text else (t[0].item() for t in steps)
    new = [[] for _ in range(ids.shape[0])]
    finished = [False] * ids.shape[0]
    for tokens in steps:
        for b, t in enumerate(tokens.tolist()):
            if not finished[b]:
                new[b].append(t)
                finished[b] = t in eos
    if as_text:
        out = [_cut(tokenizer.decode([t for t in seq if t not in eos]), stops) for seq in new]
    else:
        out = new
    return out[0] if single else out


class Sampler:
    """Picks the next token from logits: argmax, or a seeded draw from the (top-k / top-p) softmax."""

    def __init__(self, temperature: float, top_k: int | None, top_p: float | None, seed: int | None,
                 vocab_limit: int | None = None):
        self.temperature, self.top_k, self.top_p, self.vocab_limit = temperature, top_k, top_p, vocab_limit
        self.generator = None
        if temperature > 0:
            self.generator = torch.Generator()
            self.generator.manual_seed(seed if seed is not None else torch.seed())

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (B, V) -> next tokens (B,)."""
        if self.vocab_limit is not None:  # padded embedding rows the tokenizer cannot decode
            logits = logits[:, :self.vocab_limit]
        if self.temperature == 0:
            return logits.argmax(dim=-1)
        if not bool(torch.isfinite(logits).all()):
            raise GenerationError("the model produced NaN or Inf logits; sampling needs finite ones (check the "
                                  "weights and dtype)")
        scaled = logits.float() / self.temperature
        if not bool(torch.isfinite(scaled).all()):  # a tiny temperature overflowed: the same softmax, shifted to
            top = logits.double().amax(dim=-1, keepdim=True)  # <= 0 and in float64, where any temperature > 0 is
            scaled = (logits.double() - top) / self.temperature  # nonzero: the top logit stays 0, not NaN
        logits = scaled
        if self.top_k is not None:
            kth = torch.topk(logits, min(self.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p is not None and self.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
            cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
            drop = cumulative <= 1 - self.top_p  # the low tail holding at most 1 - top_p of the mass
            drop[:, -1] = False  # always keep the most likely token
            logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
        probs = logits.softmax(dim=-1)
        return torch.multinomial(probs.cpu(), 1, generator=self.generator).squeeze(1).to(logits.device)


def static_length(needed: int, context: int) -> int:
    """A static cache's size: the next power of two (at least 64, at most the context), so that generations of
    different lengths share a few compiled graphs, at most twice the memory they need."""
    return min(max(64, 1 << (needed - 1).bit_length()), context)


@torch.inference_mode()
def decode(model, ids: torch.Tensor, mask: torch.Tensor | None, max_new_tokens: int, sampler, eos: set,
           stop_check=None, static: bool = False, compile: bool = False) -> Iterator[torch.Tensor]:
    """Yield the next token of every sequence (B,), step by step, until all are done.

    Finished sequences keep receiving their last token (callers ignore what follows EOS).
    static: a preallocated cache for the prompt and every new token; compile: decode steps (not the
    prompt) through the compiled step.
    """
    B = ids.shape[0]
    device = model.device
    ids = ids.to(device)
    mask = None if mask is None else mask.to(device)
    seq, full_mask = ids, mask
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    cache, step_ids, position = None, ids, _positions(mask, ids)
    last = None
    max_len = static_length(ids.shape[1] + max_new_tokens, model.config.max_position_embeddings)
    compiled = CompiledDecode(model) if compile else None
    for _ in range(max_new_tokens):
        prefill = cache is None or cache.key != model.cache_key
        if prefill:  # first step, or toggles/interventions changed: (re)prefill
            cache = model.new_cache(B, max_len) if static else model.new_cache()
            step_ids, position = seq, _positions(full_mask, seq)
        if compiled is None or prefill:
            logits = model(step_ids, attention_mask=full_mask, position_ids=position, cache=cache,
                           logits_to_keep=1).logits[:, -1]  # (B, V)
        else:
            logits = compiled(step_ids, position, full_mask, cache)  # (B, V)
        nxt = sampler(logits)
        if last is not None:
            nxt = torch.where(finished, last, nxt)
        yield nxt
        finished |= torch.tensor([t in eos for t in nxt.tolist()], device=device)
        if stop_check is not None:
            finished |= stop_check(seq[:, ids.shape[1]:], nxt)
        if bool(finished.all()):
            return
        last = nxt
        seq = torch.cat([seq, nxt[:, None]], dim=1)
        step_ids = nxt[:, None]
        position = position[:, -1:] + 1
        if full_mask is not None:
            full_mask = torch.cat([full_mask, full_mask.new_ones(B, 1)], dim=1)


def _positions(mask: torch.Tensor | None, ids: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding: cumsum(mask) - 1, pads at 0 (as transformers' generate)."""
    if mask is None:
        return torch.arange(ids.shape[1], device=ids.device)[None].expand(ids.shape[0], -1)
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


def _encode(model, tokenizer, prompt):
    """-> (ids (B, S), left-padding mask or None, prompt was text, prompt was a single item)."""
    if isinstance(prompt, str) or (isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt)):
        if tokenizer is None:
            raise TokenizerError("a text prompt needs a tokenizer; pass token ids to generate without one")
        texts = [prompt] if isinstance(prompt, str) else list(prompt)
        if any(t == "" for t in texts):
            raise GenerationError("prompt is empty: there is no token to continue from")
        seqs = [tokenizer.encode(t) for t in texts]
        for text, seq in zip(texts, seqs):
            if not seq:
                raise GenerationError(f"prompt {brief(text)} tokenizes to no tokens: there is no token to continue from")
        ids, mask = _pad(seqs, _pad_id(model, tokenizer))
        return ids, mask, True, isinstance(prompt, str)
    if isinstance(prompt, torch.Tensor):
        if prompt.dim() == 1:
            prompt = prompt[None]
        if prompt.dim() != 2 or prompt.dtype not in (torch.int64, torch.int32) or prompt.is_meta:
            raise GenerationError(f"prompt ids: expected an integer tensor (batch, seq_len), got {prompt.dtype} "
                                  f"of shape {tuple(prompt.shape)}" + (" on the meta device" if prompt.is_meta else ""))
        if prompt.shape[0] == 0:
            raise GenerationError("prompt ids: the batch is empty (batch size 0)")
        if prompt.shape[1] == 0:
            raise GenerationError("prompt is empty: there is no token to continue from")
        return prompt.long(), None, False, False
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return torch.tensor([_in_vocab(model, prompt)]), None, False, True
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(s, (list, tuple)) for s in prompt):
        if not all(s and all(isinstance(t, int) and not isinstance(t, bool) for t in s) for s in prompt):
            raise GenerationError("prompt ids: every sequence must be a non-empty list of ints")
        ids, mask = _pad([_in_vocab(model, s) for s in prompt], _pad_id(model, tokenizer))
        return ids, mask, False, False
    if isinstance(prompt, (list, tuple, str)) and not prompt:
        raise GenerationError("prompt is empty: there is no token to continue from")
    raise GenerationError(f"prompt: expected text, a list of texts, token ids or a (batch, seq_len) tensor, got "
                          f"{type(prompt).__name__}")


def _in_vocab(model, ids) -> list[int]:
    """A list of token ids, checked before it becomes a tensor (an id beyond int64 cannot)."""
    bad = next((t for t in ids if not 0 <= t < model.config.vocab_size), None)
    if bad is not None:
        raise GenerationError(f"prompt ids: token ids must lie in [0, {model.config.vocab_size}), got {brief(bad)}")
    return list(ids)


def _pad(seqs: list[list[int]], pad_id: int):
    """Left-pad to a batch; the mask is None when nothing was padded."""
    longest = max(len(s) for s in seqs)
    if all(len(s) == longest for s in seqs):
        return torch.tensor(seqs), None
    ids = torch.tensor([[pad_id] * (longest - len(s)) + s for s in seqs])
    mask = torch.tensor([[0] * (longest - len(s)) + [1] * len(s) for s in seqs])
    return ids, mask


def _vocab_limit(model, tokenizer) -> int | None:
    """Models may have more embedding rows than the tokenizer has tokens (FlexOlmo: 100352 vs 100278).
    Those padding ids are never produced by the tokenizer and cannot be decoded, so text generation
    never picks them."""
    size = getattr(tokenizer, "vocab_size", None)
    return size if isinstance(size, int) and size < model.config.vocab_size else None


def _pad_id(model, tokenizer) -> int:
    for candidate in (getattr(tokenizer, "pad_token_id", None), model.config.pad_token_id,
                      getattr(tokenizer, "eos_token_id", None)):
        if isinstance(candidate, int):
            return candidate
    return 0


def _eos_ids(model, tokenizer, eos_token_id) -> set:
    if eos_token_id is not None:
        return set([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id)
    out = set()
    for source in (model.config.eos_token_id, getattr(tokenizer, "stop_token_ids", None)):
        if isinstance(source, int):
            out.add(source)
        elif isinstance(source, (list, tuple)):
            out.update(source)
    return out


def _stops(stop) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
        raise GenerationError(f"stop: expected a string or a list of strings, got {brief(stop)}")
    return list(stop)


def _check_eos(eos_token_id):
    ids = eos_token_id if isinstance(eos_token_id, (list, tuple, set, frozenset)) else [eos_token_id]
    if eos_token_id is not None and not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise GenerationError(f"eos_token_id: expected a token id (an int >= 0) or a list of them, got "
                              f"{brief(eos_token_id)}")
    return eos_token_id


def _check_args(model, ids, max_new_tokens, temperature, top_k, top_p, seed, stops, tokenizer, stream):
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise GenerationError(f"max_new_tokens: must be a non-negative integer, got {max_new_tokens!r}")
    if int(ids.min()) < 0 or int(ids.max()) >= model.config.vocab_size:
        raise GenerationError(f"prompt ids: token ids must lie in [0, {model.config.vocab_size}), got "
                              f"[{int(ids.min())}, {int(ids.max())}]")
    limit = model.config.max_position_embeddings
    if ids.shape[1] > limit:
        raise GenerationError(f"prompt: {ids.shape[1]} tokens is longer than the model's context of {limit}")
    if ids.shape[1] + max_new_tokens > limit:
        raise GenerationError(f"max_new_tokens: {ids.shape[1]} prompt tokens + {max_new_tokens} new tokens exceed "
                              f"the model's context of {limit} positions")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature < math.inf:
        raise GenerationError(f"temperature: must be >= 0 (0 = greedy) and finite, got {brief(temperature)}")
    if temperature == 0 and (top_k is not None or top_p is not None):
        raise GenerationError("top_k/top_p: sampling filters need temperature > 0 (temperature 0 is greedy)")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise GenerationError(f"top_k: must be a positive integer, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise GenerationError(f"top_p: must be in (0, 1], got {top_p!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise GenerationError(f"seed: must be an integer, got {brief(seed)}")
    if seed is not None and not 0 <= seed < 2**64:
        raise GenerationError(f"seed: must lie in [0, 2**64) (a 64-bit seed), got {brief(seed)}")
    if stops and (tokenizer is None or not all(isinstance(s, str) and s for s in stops)):
        raise GenerationError("stop: stop strings must be non-empty strings and need a tokenizer")
    if stream and ids.shape[0] != 1:
        raise GenerationError(f"stream: streaming needs a single prompt, got a batch of {ids.shape[0]}")


def _check_cache_args(model, cache, compile):
    if cache not in ("dynamic", "static"):
        raise GenerationError(f"cache: expected 'dynamic' or 'static', got {brief(cache)}")
    if not isinstance(compile, bool):
        raise GenerationError(f"compile: expected True or False, got {brief(compile)}")
    if compile and cache != "static":
        raise GenerationError("compile=True needs cache='static': a compiled step needs the fixed shapes of a "
                              "preallocated cache")
    if compile and model.config.is_moe:
        raise GenerationError("compile=True covers dense models: FlexOlmo's expert dispatch is decided in Python per "
                              "token (which experts run), so a compiled step would recompile at routing decisions "
                              "and is no faster; use cache='static' without compile")
    if compile:
        refuse_hooks(model)


def _stop_check(tokenizer, stops):
    if not stops:
        return None

    def check(new_ids: torch.Tensor, nxt: torch.Tensor) -> torch.Tensor:
        texts = [tokenizer.decode(row + [t]) for row, t in zip(new_ids.tolist(), nxt.tolist())]
        return torch.tensor([any(s in text for s in stops) for text in texts], device=nxt.device)
    return check


def _cut(text: str, stops: list[str]) -> str:
    """Text up to (not including) the first stop string."""
    cut = min((text.index(s) for s in stops if s in text), default=len(text))
    return text[:cut]


def _stream_text(steps, tokenizer, stops) -> Iterator[str]:
    """Turn a stream of tokens into text pieces, holding back incomplete characters and stop strings."""
    ids, sent = [], 0
    eos = {tokenizer.eos_token_id}
    for tokens in steps:
        t = tokens[0].item()
        if t in eos:
            break
        ids.append(t)
        text = _cut(tokenizer.decode(ids), stops)
        hold = max((len(s) - 1 for s in stops), default=0)  # a stop string may still be forming
        ready = len(text) - hold if not any(s in tokenizer.decode(ids) for s in stops) else len(text)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for the next token
            ready = min(ready, len(text) - 1)
        if ready > sent:
            yield text[sent:ready]
            sent = ready
    text = _cut(tokenizer.decode(ids), stops)
    if len(text) > sent:
        yield text[sent:]
