"""The one-token decode step as a fixed-shape function over a static KV cache, compiled with torch.compile.

On small models batch-1 decoding is dominated by the cost of launching each operator from Python, not
by arithmetic; a compiled step fuses the norms, RoPE and masking into a few kernels and calls them
without the interpreter. Every shape is fixed (a (B, 1) token, a (B, max_len) key-padding row, the
cache's (B, nkv, max_len, hd) buffers; the write slot is a tensor), so one graph serves every step of
a generation, and later generations of the same model, dtype, batch size and cache length reuse it
(torch.compile keeps at most 8 graphs of the step, its recompile limit; past that the step runs
uncompiled, with the same results). Weights are inputs of the graph, not constants, so weights edited
in place are seen.

torch.compile's code cache does not tell kernels built under ATEN_CPU_CAPABILITY=avx2 from others: a
step compiled without it and reused with it failed (index out of bounds), so runs that pin it keep their
own cache (the Makefile sets TORCHINDUCTOR_CACHE_DIR).

A compiled graph cannot call Python hook functions, so tracing and interventions are refused here
(`GenerationError`): they run on the uncompiled static or dynamic path, which has every hook point.
"""

from __future__ import annotations

import torch

from .attention import static_mask
from .cache import StaticKVCache
from ..errors import GenerationError

# torch.compile's options: inductor's own C++ kernels with no Python between them ("cpp_wrapper"). No
# "freezing": the weights stay inputs of the graph (edits are seen), and freezing measured no faster.
COMPILE_OPTIONS = {"cpp_wrapper": True}


def _step(model, input_ids, position_ids, slot, key_padding, cache: StaticKVCache, windows: dict):
    """Logits (B, V) of the one token input_ids (B, 1) at cache index `slot` (1,), written into `cache`."""
    masks = {t: static_mask(slot, cache.max_len, w, key_padding) for t, w in windows.items()}
    x = model.model.embed_tokens(input_ids)  # (B, 1, H)
    return model.run_blocks(x, position_ids, masks, cache, logits_to_keep=1)[:, -1]


def refuse_hooks(model) -> None:
    """GenerationError if any hook function is attached: a compiled graph would silently skip it."""
    if model.hooks.active:
        raise GenerationError("compile=True: a compiled decode step cannot call Python hook functions, and hooks "
                              "are attached (a trace or interventions); generate with compile=False, where every "
                              "hook point runs")


_compiled_step = None  # torch.compile's wrapper, made on first use so importing olmo_lab never imports the compiler


class CompiledDecode:
    """Decode steps for one model through the compiled `_step` (the prompt itself runs uncompiled)."""

    def __init__(self, model):
        self.model = model
        types = model.model.rotary.layer_types
        self.windows = {t: model.config.window(model.config.layer_types.index(t)) for t in types}

    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 cache: StaticKVCache) -> torch.Tensor:
        """Logits (B, V) for input_ids (B, 1); attention_mask (B, cache.length + 1) or None; extends `cache`."""
        global _compiled_step
        refuse_hooks(self.model)  # hooks attached mid-generation, e.g. between the items of a stream
        cache.check(id(self.model), self.model.cache_key)
        if _compiled_step is None:
            _compiled_step = torch.compile(_step, dynamic=False, options=COMPILE_OPTIONS)
        B, past = input_ids.shape[0], cache.length
        key_padding = torch.ones(B, cache.max_len, dtype=torch.bool, device=input_ids.device)  # (B, max_len)
        if attention_mask is not None:
            key_padding[:, :past + 1] = attention_mask.bool()
        slot = torch.tensor([past], device=input_ids.device)  # (1,)
        try:
            logits = _compiled_step(self.model, input_ids, position_ids, slot, key_padding, cache, self.windows)
        except torch._dynamo.exc.BackendCompilerFailed as e:  # e.g. no C++ compiler on the machine
            raise GenerationError(f"compile=True: torch.compile could not build the decode step "
                                  f"({e.__class__.__name__}: {str(e).splitlines()[0][:200]}); generate with "
                                  "compile=False") from e
        cache.length += 1
        return logits
