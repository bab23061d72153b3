"""The whole model on one screen: embeddings, post-norm decoder blocks, final norm, LM head.

The same block serves both families: its feed-forward is a dense SwiGLU (OLMo 2/3) or a mixture of
SwiGLU experts (FlexOlmo). Module names equal the Hugging Face checkpoint keys
(`model.layers.{i}.self_attn.q_proj.weight`, `model.layers.{i}.mlp.experts.{e}.gate_proj.weight`, ...),
so a state dict loads without renaming.
"""

from __future__ import annotations

from dataclasses import dataclass
import torch
from torch import nn

from .attention import Attention, build_mask
from .cache import KVCache, StaticKVCache
from .config import OlmoConfig
from ..errors import ExpertError, InputError
from .experts import ExpertToggles
from ..analysis.hooks import HookRegistry
from .mlp import SwiGLU
from .moe import MoE
from .norm import RMSNorm
from .quantized import check_conversion
from .rope import RotaryEmbedding


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (B, S, V), or the last `logits_to_keep` positions
    cache: KVCache | None = None

    def to(self, device) -> "ModelOutput":
        """The logits on `device` (a placed model returns them next to its inputs); the cache stays put."""
        return ModelOutput(self.logits.to(device), self.cache)


class Block(nn.Module):
    """Post-norm ("reordered norm") block: the norms sit on the outputs, not the inputs.

        h = x + norm(attention(x));  y = h + norm(ffn(h))
    """

    def __init__(self, config: OlmoConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MoE(config) if config.is_moe else SwiGLU(config.hidden_size, config.intermediate_size)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_feedforward_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.layer_idx = layer_idx
        self._hooks = None  # olmo_lab.hooks: the residual stream and the two outputs, before and after their norms

    def forward(self, x, cos_sin, mask, cache=None):
        hooks = self._hooks
        if hooks is None:  # the plain path, as written above
            h = x + self.post_attention_layernorm(self.self_attn(x, cos_sin, mask, cache))
            return h + self.post_feedforward_layernorm(self.mlp(h))
        x = hooks.run("hook_resid_pre", x)
        attn = hooks.run("self_attn.hook_out", self.self_attn(x, cos_sin, mask, cache))
        h = hooks.run("hook_resid_mid", x + hooks.run("post_attention_layernorm.hook_out",
                                                      self.post_attention_layernorm(attn)))
        ffn = hooks.run("mlp.hook_out", self.mlp(h))
        y = h + hooks.run("post_feedforward_layernorm.hook_out", self.post_feedforward_layernorm(ffn))
        return hooks.run("hook_resid_post", y)


class Transformer(nn.Module):
    """Token embeddings, the blocks and the final norm (transformers' `model.*`)."""

    def __init__(self, config: OlmoConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config)


class OlmoModel(nn.Module):
    """An OLMo 2 / OLMo 3 / FlexOlmo causal language model."""

    placement = None  # a checkpoints.placement.Placement when load_model spread it over devices and disk

    def __init__(self, config: OlmoConfig):
        super().__init__()
        self.config = config
        self.model = Transformer(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self._toggle_key: tuple = ()
        self.toggles_changed()
        self.hooks = HookRegistry(self)  # every named hook point; see olmo_lab.hooks
        self._interventions: tuple = ()  # ids of the active interventions: part of the KV-cache key
        self.quantization = None  # what load_model(quantize=...) quantized: olmo_lab.quantized.Quantization

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: KVCache | None = None,
                use_cache: bool = False, logits_to_keep: int = 0, start_at_layer: int = 0,
                resid: torch.Tensor | None = None) -> ModelOutput:
        """Logits for input_ids (B, S).

        attention_mask (B, past + S): 1 for real tokens, 0 for padding, covering the cached tokens too.
        position_ids (B, S): default `past + arange(S)` (not padding-aware, as in transformers' forward;
        `generate` derives them from the mask). cache: extended in place; `use_cache=True` starts one.
        logits_to_keep: 0 for every position, n for the last n.
        start_at_layer, resid: run only blocks start_at_layer.. on the residual stream resid (B, S, H)
        (e.g. a patched one; input_ids still give the shape and positions), skipping the embedding and the
        blocks below; with a cache, only the layers that run extend their entries.
        """
        if cache is None and use_cache:
            cache = self.new_cache()
        past = self._check_inputs(input_ids, attention_mask, position_ids, cache, logits_to_keep)
        B, S = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(past, past + S, device=input_ids.device)[None].expand(B, S)
        self._check_start(start_at_layer, resid, B, S)
        snapshot = cache.snapshot() if cache is not None else None
        hooks = self.hooks if self.hooks.active else None
        if hooks is not None:
            hooks.begin(input_ids, attention_mask, past, cache)
        try:
            x = self.model.embed_tokens(input_ids) if resid is None else resid  # (B, S, H)
            masks = {t: build_mask(B, S, past, self.config.window(self.config.layer_types.index(t)),
                                   attention_mask, input_ids.device) for t in self.model.rotary.layer_types}
            logits = self.run_blocks(x, position_ids, masks, cache, start_at_layer, logits_to_keep)
        except BaseException:
            if cache is not None:  # leave the cache exactly as it was
                cache.restore(snapshot)
            if hooks is not None:  # and a trace without the half-recorded call
                hooks.end(ok=False)
            raise
        if cache is not None:
            cache.length += S
        if hooks is not None:
            hooks.end(ok=True)
        return ModelOutput(logits, cache)

    def run_blocks(self, x: torch.Tensor, position_ids: torch.Tensor, masks: dict, cache=None, start_at_layer: int = 0,
                   logits_to_keep: int = 0) -> torch.Tensor:
        """The computation itself, on checked inputs: blocks start_at_layer.. on x (B, S, H), the final norm, the
        LM head. masks: {layer type: AttentionMask}. Shared by `forward` and the compiled decode step."""
        cos_sin = self.model.rotary(position_ids)  # {layer type: (cos, sin)}, fp32
        for block, layer_type in zip(self.model.layers[start_at_layer:], self.config.layer_types[start_at_layer:]):
            x = block(x, cos_sin[layer_type], masks[layer_type], cache)
        x = self.model.norm(x)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        return self.lm_head(x)

    def _check_inputs(self, input_ids, attention_mask, position_ids, cache, logits_to_keep=0) -> int:
        """Every forward argument's type, shape, device and range, before any work; returns the cached length."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (
                torch.int64, torch.int32):
            raise InputError("input_ids: expected an integer tensor of shape (batch, seq_len), got "
                             + (f"{input_ids.dtype} of shape {tuple(input_ids.shape)}"
                                if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__))
        B, S = input_ids.shape
        if B == 0:
            raise InputError("input_ids: the batch is empty (batch size 0)")
        if S == 0:
            raise InputError("input_ids: the sequence is empty")
        for name, t in (("input_ids", input_ids), ("attention_mask", attention_mask), ("position_ids", position_ids)):
            if isinstance(t, torch.Tensor) and t.device != self.device:
                raise InputError(f"{name}: is on {t.device}, but the model is on {self.device}"
                                 + (" (a meta tensor has no values)" if t.is_meta else ""))
        if int(input_ids.min()) < 0 or int(input_ids.max()) >= self.config.vocab_size:
            raise InputError(f"input_ids: token ids must lie in [0, {self.config.vocab_size}), got "
                             f"[{int(input_ids.min())}, {int(input_ids.max())}]")
        if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, int) or logits_to_keep < 0:
            raise InputError(f"logits_to_keep: expected an integer >= 0 (0 = every position), got "
                             f"{logits_to_keep!r:.80}")
        past = 0
        if cache is not None:
            if not isinstance(cache, KVCache):
                raise InputError(f"cache: expected a KVCache from model.new_cache(), got {type(cache).__name__}")
            cache.check(id(self), self.cache_key)
            if cache.batch_size not in (None, B):
                raise InputError(f"cache: it holds a batch of {cache.batch_size} sequences, but input_ids has {B}")
            past = cache.length
            if isinstance(cache, StaticKVCache):
                if past + S > cache.max_len:
                    raise InputError(f"cache: this static cache has room for {cache.max_len} positions; it holds "
                                     f"{past} and input_ids adds {S}")
                if cache.dtype != self.dtype or cache.key_buffers[0].device != self.device:
                    raise InputError(f"cache: this static cache holds {cache.dtype} on {cache.key_buffers[0].device}, "
                                     f"but the model is {self.dtype} on {self.device}; start a new cache")
        if past + S > self.config.max_position_embeddings:
            raise InputError(f"input_ids: {past + S} positions exceed the model's context of "
                             f"{self.config.max_position_embeddings} (max_position_embeddings)")
        if attention_mask is not None:
            if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != (B, past + S):
                shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else \
                    type(attention_mask).__name__
                raise InputError(f"attention_mask: expected a tensor of shape {(B, past + S)} (batch, cached + new "
                                 f"tokens), got {shape}")
            if bool(((attention_mask != 0) & (attention_mask != 1)).any()):
                raise InputError("attention_mask: values must be 1 (token) or 0 (padding)")
        if position_ids is not None:
            if not isinstance(position_ids, torch.Tensor) or position_ids.is_floating_point() or \
                    tuple(position_ids.shape) not in ((B, S), (1, S)):
                shape = tuple(position_ids.shape) if isinstance(position_ids, torch.Tensor) else \
                    type(position_ids).__name__
                raise InputError(f"position_ids: expected an integer tensor of shape {(B, S)}, got {shape}")
            if bool((position_ids < 0).any()):
                raise InputError("position_ids: positions must be >= 0")
        return past

    def _check_start(self, layer, resid, B, S) -> None:
        n, H = self.config.num_hidden_layers, self.config.hidden_size
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n:
            raise InputError(f"start_at_layer: expected a layer in 0..{n - 1}, got {layer!r}")
        if resid is None:
            if layer:
                raise InputError("start_at_layer > 0 needs resid, the residual stream entering that layer")
            return
        if not isinstance(resid, torch.Tensor) or resid.shape != (B, S, H) or resid.dtype != self.dtype \
                or resid.device != self.device:
            got = f"{resid.dtype} {tuple(resid.shape)} on {resid.device}" if isinstance(resid, torch.Tensor) else \
                type(resid).__name__
            raise InputError(f"resid: expected {self.dtype} {(B, S, H)} on {self.device}, got {got}")

    # ------------------------------------------------------------------ helpers
    def new_cache(self, batch_size: int | None = None, max_len: int | None = None) -> KVCache:
        """An empty KV cache for this model under its current expert toggles and interventions.

        With `batch_size` and `max_len`: a StaticKVCache, preallocated for that many sequences and positions.
        """
        windows = [self.config.window(i) for i in range(self.config.num_hidden_layers)]
        if batch_size is None and max_len is None:
            return KVCache(windows, id(self), self.cache_key)
        if self.placement is not None:  # its layers may run on several devices; the buffers sit on one
            raise InputError("a static cache needs a model on one device; this one was placed with a device map "
                             f"({', '.join(sorted(self.placement.bytes))}): use the default cache")
        limit = self.config.max_position_embeddings
        for name, value, top in (("batch_size", batch_size, 2**20), ("max_len", max_len, limit)):
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= top:
                raise InputError(f"{name}: a static cache needs an integer in [1, {top}], got {value!r:.80}")
        return StaticKVCache(windows, id(self), self.cache_key, batch_size, max_len, self.config.num_key_value_heads,
                             self.config.head_dim, self.dtype, self.device)

    def set_attention_backend(self, backend: str) -> "OlmoModel":
        """"sdpa" (fused, fast) or "eager" (explicit softmax). Both give the same logits up to rounding."""
        if backend not in ("sdpa", "eager"):
            raise InputError(f"backend: expected 'sdpa' or 'eager', got {backend!r:.80}")
        for block in self.model.layers:
            block.self_attn.backend = backend
        return self

    @property
    def experts(self) -> ExpertToggles:
        """The expert switchboard (FlexOlmo only)."""
        if not self.config.is_moe:
            raise ExpertError(f"this is a dense {self.config.model_type} model; it has no experts to toggle")
        return ExpertToggles(self)

    def hook_points(self, contains: str | None = None) -> list[str]:
        """Names of every hook point in forward order (or those containing `contains`); see olmo_lab.hooks."""
        return self.hooks.names(contains)

    @property
    def cache_key(self) -> tuple:
        """What a KV cache must have been built under to be reused: the expert toggles and the interventions."""
        return self._toggle_key, self._interventions

    def toggles_changed(self) -> None:
        """Record the current expert toggles; caches built under other toggles become stale."""
        if self.config.is_moe:
            self._toggle_key = tuple((b.mlp.opted_out, b.mlp.dropped) for b in self.model.layers)

    def _apply(self, fn, recurse=True):
        if self.quantization is not None:  # .to(), .float(), ...: a quantized model keeps its dtype and device
            check_conversion(self, fn)
        return super()._apply(fn, recurse)

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def device(self) -> torch.device:
        """Where inputs go: the device of the weights, or a placed model's main device."""
        return self.lm_head.weight.device if self.placement is None else self.placement.main_device

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
