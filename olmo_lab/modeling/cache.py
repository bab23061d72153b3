"""The KV cache: post-RoPE keys and values per layer, bounded on sliding-window layers.

A sliding layer with window W only ever needs the last W-1 past keys (the query itself is the W-th),
so its cache stays that size however long the generation runs; full layers keep everything.
The cache also remembers the expert toggles and interventions it was built under: both change the
function, so a cache filled under others is stale and the model refuses to extend it.

`StaticKVCache` is the preallocated variant (transformers' `cache_implementation="static"`): fixed
(B, nkv, max_len, hd) buffers written in place, the shapes a compiled decode step needs.
"""

from __future__ import annotations

import torch

from ..errors import StaleCacheError


class KVCache:
    def __init__(self, windows: list[int | None], owner_id: int, key: tuple):
        self.windows = windows  # per layer: None (full attention) or the sliding window W
        self.keys: list[torch.Tensor | None] = [None] * len(windows)
        self.values: list[torch.Tensor | None] = [None] * len(windows)
        self.length = 0  # tokens seen so far (cache index of the next token)
        self.owner_id = owner_id
        self.key = key  # (expert toggles, active interventions): model.cache_key when it was built

    def check(self, owner_id: int, key: tuple) -> None:
        """Raise StaleCacheError unless this cache was built by this model under these toggles and interventions."""
        if owner_id != self.owner_id:
            raise StaleCacheError("this KV cache was built by a different model; start a new cache")
        if key[0] != self.key[0]:
            raise StaleCacheError("the expert toggles changed since this KV cache was built, so its keys and "
                                  "values are stale; recompute the prefix with a new cache")
        if key[1] != self.key[1]:
            raise StaleCacheError("the active interventions changed since this KV cache was built, so its keys and "
                                  "values are stale; recompute the prefix with a new cache")

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, mask=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this step's (B, nkv, S, hd) keys/values; return every key/value the step can attend to.

        mask (the step's AttentionMask) is not needed here: what is kept already is what can be seen."""
        if self.keys[layer] is not None:
            k = torch.cat([self.keys[layer], k], dim=2)  # (B, nkv, past + S, hd)
            v = torch.cat([self.values[layer], v], dim=2)
        window = self.windows[layer]
        first = 0 if window is None else k.shape[2] - min(k.shape[2], window - 1)  # sliding: keep W-1
        self.keys[layer], self.values[layer] = k[:, :, first:], v[:, :, first:]
        return k, v

    @property
    def batch_size(self) -> int | None:
        """How many sequences the cache holds (None while empty)."""
        return next((k.shape[0] for k in self.keys if k is not None), None)

    def layer_length(self, layer: int) -> int:
        """How many positions layer `layer` holds (bounded by W-1 on sliding layers)."""
        return 0 if self.keys[layer] is None else self.keys[layer].shape[2]

    def snapshot(self) -> tuple:
        """Everything needed to restore this cache after a failed call."""
        return list(self.keys), list(self.values), self.length

    def restore(self, snap: tuple) -> None:
        self.keys, self.values, self.length = list(snap[0]), list(snap[1]), snap[2]

    def select(self, rows: torch.Tensor) -> None:
        """Keep only some batch rows (e.g. sequences still generating)."""
        self.keys = [None if k is None else k[rows] for k in self.keys]
        self.values = [None if v is None else v[rows] for v in self.values]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values if t is not None)


class StaticKVCache(KVCache):
    """A KV cache preallocated for `max_len` positions: every layer one (B, nkv, max_len, hd) buffer per
    keys and values, written in place and never reallocated.

    Run eagerly it hands attention exactly the keys the growing cache would (a view of the slots written
    so far, the last W-1 on sliding layers), so logits are the same bits; a compiled step instead reads
    every slot behind a fixed-shape mask (`static_mask`). The price of fixed shapes: sliding layers hold
    max_len slots too, not W-1. `keys` / `values` are views of what each layer holds, as in KVCache.
    """

    def __init__(self, windows: list[int | None], owner_id: int, key: tuple, batch_size: int, max_len: int,
                 kv_heads: int, head_dim: int, dtype: torch.dtype, device):
        self.windows, self.owner_id, self.key, self.max_len = windows, owner_id, key, max_len
        self.length = 0
        shape = (batch_size, kv_heads, max_len, head_dim)
        self.key_buffers = [torch.zeros(shape, dtype=dtype, device=device) for _ in windows]
        self.value_buffers = [torch.zeros(shape, dtype=dtype, device=device) for _ in windows]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, mask) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's (B, nkv, S, hd) keys/values at their slots; return the slots `mask` covers."""
        slots = mask.query_slots if mask.query_slots is not None else \
            torch.arange(self.length, self.length + k.shape[2], device=k.device)  # (S,) cache indices
        self.key_buffers[layer].index_copy_(2, slots, k)
        self.value_buffers[layer].index_copy_(2, slots, v)
        end = mask.kv_start + mask.kv_len
        return self.key_buffers[layer][:, :, mask.kv_start:end], self.value_buffers[layer][:, :, mask.kv_start:end]

    def _held(self, buffers: list[torch.Tensor]) -> list[torch.Tensor | None]:
        return [None if not self.length else b[:, :, self.length - self.layer_length(i):self.length]
                for i, b in enumerate(buffers)]

    @property
    def keys(self) -> list[torch.Tensor | None]:
        return self._held(self.key_buffers)

    @property
    def values(self) -> list[torch.Tensor | None]:
        return self._held(self.value_buffers)

    @property
    def batch_size(self) -> int:
        return self.key_buffers[0].shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.key_buffers[0].dtype

    def layer_length(self, layer: int) -> int:
        window = self.windows[layer]
        return self.length if window is None else min(self.length, window - 1)

    def snapshot(self) -> tuple:
        """Only the length: slots a failed call wrote lie past it, hidden until a later call overwrites them."""
        return (self.length,)

    def restore(self, snap: tuple) -> None:
        self.length = snap[0]

    def select(self, rows: torch.Tensor) -> None:
        self.key_buffers = [b[rows] for b in self.key_buffers]
        self.value_buffers = [b[rows] for b in self.value_buffers]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.key_buffers + self.value_buffers)
