"""The model configuration: one plain dataclass for OLMo 2, OLMo 3 and FlexOlmo.

`OlmoConfig.from_dict` reads every `config.json` form the released and transformers-written
checkpoints use (legacy `rope_theta`/`rope_scaling`, v5 `rope_parameters` nested by layer type or
flat, explicit `layer_types`, `head_dim`, ...) and checks it; `to_dict` writes the transformers 5
form back. Invalid or inconsistent input raises `ConfigError` naming the field.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from dataclasses import dataclass, field

from ..errors import ConfigError, brief
from ..checkpoints.json_file import read_json

MODEL_TYPES = ("olmo3", "olmo2", "flex_olmo")
SLIDING, FULL = "sliding_attention", "full_attention"
LAYER_TYPES = (SLIDING, FULL)
ROPE_TYPES = ("default", "yarn")
# Names of the experts of the released FlexOlmo checkpoints, in router order (model card order).
RELEASED_7X7B_EXPERTS = ["public", "math", "news", "academic", "code", "creative", "reddit"]
# Generous bounds on every size, checked before anything is built from it, so an absurd config fails
# at once instead of hanging while per-layer lists are built or overflowing inside torch. The largest
# released models are far inside them (OLMo 3 32B: 64 layers, hidden 5120; vocabularies ~256k).
MAX_SIZES = {"vocab_size": 2**24, "hidden_size": 2**20, "intermediate_size": 2**20, "num_hidden_layers": 2**12,
             "num_attention_heads": 2**14, "num_key_value_heads": 2**14, "head_dim": 2**14,
             "max_position_embeddings": 2**30, "sliding_window": 2**30, "original_max_position_embeddings": 2**30,
             "num_experts": 2**12, "num_experts_per_tok": 2**12}
MAX_EXPERTS_IN_ALL_LAYERS = 2**16  # num_hidden_layers * num_experts: each expert is three modules to build


class UnstatedContextWarning(UserWarning):
    """config.json gives `max_position_embeddings` <= 0 ("not stated", as OLMo-core's exporter writes it);
    the family's default context applies instead."""


class RemoteCodeIgnoredWarning(UserWarning):
    """A config asked for remote code (`auto_map`); olmo-lab never runs code from a checkpoint."""


@dataclass
class RopeConfig:
    """Rotary-embedding parameters of one layer type: plain RoPE or YaRN."""

    rope_type: str = "default"
    theta: float = 500000.0
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    attention_factor: float | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True

    def to_dict(self) -> dict:
        """The transformers v5 `rope_parameters` entry for this layer type."""
        out = {"rope_type": self.rope_type, "rope_theta": self.theta}
        if self.rope_type == "yarn":
            out.update(factor=self.factor, original_max_position_embeddings=self.original_max_position_embeddings,
                       beta_fast=self.beta_fast, beta_slow=self.beta_slow)
            for key in ("attention_factor", "mscale", "mscale_all_dim"):
                if getattr(self, key) is not None:
                    out[key] = getattr(self, key)
            if not self.truncate:
                out["truncate"] = False
        return out


@dataclass
class OlmoConfig:
    """Shapes and hyper-parameters of an OLMo 2 / OLMo 3 (dense) or FlexOlmo (MoE) model."""

    model_type: str = "olmo3"
    vocab_size: int = 100278
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: same as num_attention_heads (MHA)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 65536
    sliding_window: int | None = None  # W keys visible to a query on sliding layers, itself included
    layer_types: list[str] | None = None  # None: olmo3's default pattern, full attention elsewhere
    rope: dict[str, RopeConfig] | None = None  # per layer type; None: default RoPE, theta 500000
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    # Mixture of experts (flex_olmo only); num_experts == 0 means a dense SwiGLU MLP.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    norm_topk_prob: bool = False
    expert_names: list[str] | None = None
    dtype: str | None = None  # the checkpoint's stored dtype, e.g. "bfloat16"

    def __post_init__(self):
        for name in ("num_hidden_layers", "num_attention_heads", "hidden_size", "num_experts"):
            _check_int(name, getattr(self, name))  # the defaults below compute with them (bounded first)
        if self.num_hidden_layers * self.num_experts > MAX_EXPERTS_IN_ALL_LAYERS:
            raise ConfigError(f"num_experts: {self.num_experts} experts in each of {self.num_hidden_layers} layers "
                              f"is more than the {MAX_EXPERTS_IN_ALL_LAYERS} olmo-lab builds")
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and self.num_attention_heads and self.hidden_size % self.num_attention_heads == 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.layer_types is None:
            self.layer_types = default_layer_types(self.model_type, self.num_hidden_layers)
        if self.rope is None:
            self.rope = {t: RopeConfig() for t in LAYER_TYPES}
        if self.model_type == "olmo3" and self.sliding_window is None and SLIDING in self.layer_types:
            self.sliding_window = 4096
        if self.is_moe and self.expert_names is None:
            self.expert_names = [f"expert_{i}" for i in range(self.num_experts)]
        self.validate()

    # ------------------------------------------------------------------ derived
    @property
    def is_moe(self) -> bool:
        return self.model_type == "flex_olmo"

    @property
    def kv_groups(self) -> int:
        """How many query heads share one key/value head (1 = MHA)."""
        return self.num_attention_heads // self.num_key_value_heads

    def window(self, layer_idx: int) -> int | None:
        """The sliding window of a layer, or None for full attention."""
        return self.sliding_window if self.layer_types[layer_idx] == SLIDING else None

    def replace(self, **changes) -> "OlmoConfig":
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Raise ConfigError naming the first impossible or inconsistent field."""
        if self.model_type not in MODEL_TYPES:
            raise ConfigError(f"model_type: {brief(self.model_type)} is not supported "
                              f"(expected one of {', '.join(MODEL_TYPES)})")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            _check_int(name, getattr(self, name), minimum=1)
        _check_float("rms_norm_eps", self.rms_norm_eps)
        if self.rms_norm_eps <= 0:
            raise ConfigError(f"rms_norm_eps: must be > 0, got {self.rms_norm_eps}")
        if self.head_dim is None:
            raise ConfigError(f"num_attention_heads: {self.num_attention_heads} does not divide hidden_size "
                              f"{self.hidden_size}; give head_dim explicitly")
        _check_int("head_dim", self.head_dim, minimum=2)
        if self.head_dim % 2:
            raise ConfigError(f"head_dim: must be even for rotary embeddings, got {self.head_dim}")
        if self.num_attention_heads * self.head_dim > MAX_SIZES["hidden_size"]:
            raise ConfigError(f"head_dim: {self.num_attention_heads} heads of {self.head_dim} is wider than the "
                              f"{MAX_SIZES['hidden_size']} olmo-lab allows")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_key_value_heads: {self.num_key_value_heads} does not divide "
                              f"num_attention_heads {self.num_attention_heads}")
        if not isinstance(self.layer_types, list) or len(self.layer_types) != self.num_hidden_layers:
            n = len(self.layer_types) if isinstance(self.layer_types, list) else type(self.layer_types).__name__
            raise ConfigError(f"layer_types: has {n} entries but num_hidden_layers is {self.num_hidden_layers}")
        for i, t in enumerate(self.layer_types):
            if t not in LAYER_TYPES:
                raise ConfigError(f"layer_types[{i}]: unknown layer type {brief(t)} "
                                  f"(expected {' or '.join(LAYER_TYPES)})")
        if SLIDING in self.layer_types:
            if self.model_type != "olmo3":
                raise ConfigError(f"layer_types: {self.model_type} has no sliding-window layers")
            _check_int("sliding_window", self.sliding_window, minimum=1)
        for t in set(self.layer_types):
            rope = self.rope.get(t) if isinstance(self.rope, dict) else None
            if not isinstance(rope, RopeConfig):
                raise ConfigError(f"rope_parameters: no RoPE parameters for layer type {t!r}")
            _check_rope(f"rope_parameters[{t!r}]", rope)
        if self.is_moe:
            _check_int("num_experts", self.num_experts, minimum=1)
            _check_int("num_experts_per_tok", self.num_experts_per_tok, minimum=1)
            if self.num_experts_per_tok > self.num_experts:
                raise ConfigError(f"num_experts_per_tok: top-k {self.num_experts_per_tok} is larger than "
                                  f"num_experts {self.num_experts}")
            names = self.expert_names
            if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
                raise ConfigError(f"expert_names: must be a list of non-empty strings, got {brief(names)}")
            if len(names) != self.num_experts:
                raise ConfigError(f"expert_names: {len(names)} names for {self.num_experts} experts")
            if len(set(names)) != len(names):
                raise ConfigError(f"expert_names: names must be unique, got {names}")
        elif self.num_experts:
            raise ConfigError(f"num_experts: {self.model_type} is a dense model and has no experts")

    # ------------------------------------------------------------------ reading
    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "OlmoConfig":
        """Read and check a `config.json` file."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.isfile(path):
            raise ConfigError(f"config.json: file not found at {path}")
        return cls.from_dict(read_json(path, "config.json", ConfigError))

    @classmethod
    def from_dict(cls, d: dict) -> "OlmoConfig":
        """Build a config from a Hugging Face `config.json` dict (any released or transformers-written form)."""
        if not isinstance(d, dict):
            raise ConfigError(f"config.json: expected a JSON object, got {type(d).__name__}")
        if "auto_map" in d:
            warnings.warn("config.json: 'auto_map' (remote code) is ignored; olmo-lab never executes code "
                          "from a checkpoint", RemoteCodeIgnoredWarning, stacklevel=2)
        model_type = d.get("model_type")
        if model_type is None:
            raise ConfigError("model_type: missing from config.json")
        if model_type not in MODEL_TYPES:
            raise ConfigError(f"model_type: {brief(model_type)} is not supported "
                              f"(expected one of {', '.join(MODEL_TYPES)})")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if name not in d:
                raise ConfigError(f"{name}: missing from config.json")
            _check_int(name, d[name], minimum=1)
        kw = {k: d[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                "num_attention_heads")}
        defaults = {"olmo3": (65536, 1e-5), "olmo2": (2048, 1e-5), "flex_olmo": (4096, 1e-6)}[model_type]
        kw["max_position_embeddings"] = d.get("max_position_embeddings", defaults[0])
        if _is_int(kw["max_position_embeddings"]) and kw["max_position_embeddings"] <= 0:
            warnings.warn(f"config.json: max_position_embeddings {kw['max_position_embeddings']} means 'not stated'; "
                          f"using the {model_type} default context of {defaults[0]} positions", UnstatedContextWarning,
                          stacklevel=2)
            kw["max_position_embeddings"] = defaults[0]
        _check_int("max_position_embeddings", kw["max_position_embeddings"], minimum=1)  # YaRN computes with it
        kw["rms_norm_eps"] = d.get("rms_norm_eps", defaults[1])
        for name in ("num_key_value_heads", "head_dim"):
            if d.get(name) is not None:
                _check_int(name, d[name], minimum=1)
                kw[name] = d[name]
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"hidden_act: only 'silu' (SwiGLU) is supported, got {brief(act)}")
        for name in ("attention_bias", "tie_word_embeddings", "norm_topk_prob"):
            if name in d:
                if not isinstance(d[name], bool):
                    raise ConfigError(f"{name}: must be true or false, got {brief(d[name])}")
                kw[name] = d[name]
        for name in ("pad_token_id", "bos_token_id"):
            if d.get(name) is not None and not _is_token_id(d[name]):
                raise ConfigError(f"{name}: must be a token id (an integer >= 0) or null, got {brief(d[name])}")
            kw[name] = d.get(name)
        eos = d.get("eos_token_id")
        if eos is not None and not all(_is_token_id(i) for i in (eos if isinstance(eos, list) else [eos])):
            raise ConfigError(f"eos_token_id: must be a token id (an integer >= 0), a list of them, or null, "
                              f"got {brief(eos)}")
        kw["eos_token_id"] = eos
        kw["dtype"] = d.get("dtype", d.get("torch_dtype"))
        if kw["dtype"] is not None and not isinstance(kw["dtype"], str):
            raise ConfigError(f"dtype: must be a string such as 'bfloat16', got {brief(kw['dtype'])}")
        if d.get("clip_qkv") is not None:
            raise ConfigError(f"clip_qkv: {brief(d['clip_qkv'])} is not supported (OLMo 2/3 and FlexOlmo use QK-norm, "
                              "and transformers ignores this field)")

        layer_types = d.get("layer_types")
        if model_type == "olmo3":
            kw["sliding_window"] = d.get("sliding_window", 4096)
            if layer_types is None:
                layer_types = default_layer_types("olmo3", d["num_hidden_layers"])
        elif layer_types is None:
            layer_types = [FULL] * d["num_hidden_layers"]
        if not isinstance(layer_types, list):
            raise ConfigError(f"layer_types: must be a list, got {type(layer_types).__name__}")
        kw["layer_types"] = list(layer_types)
        kw["rope"] = _parse_rope(d, model_type, kw["max_position_embeddings"])

        if model_type == "flex_olmo":
            kw["num_experts"] = d.get("num_experts", d.get("num_local_experts", 7))
            kw["num_experts_per_tok"] = d.get("num_experts_per_tok", 5)
            kw["expert_names"] = d.get("expert_names")
        return cls(model_type=model_type, **kw)

    # ------------------------------------------------------------------ writing
    def to_dict(self) -> dict:
        """The transformers 5 `config.json` dict (plus `expert_names` for FlexOlmo)."""
        arch = {"olmo3": "Olmo3ForCausalLM", "olmo2": "Olmo2ForCausalLM", "flex_olmo": "FlexOlmoForCausalLM"}
        d = {
            "architectures": [arch[self.model_type]], "model_type": self.model_type,
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim, "hidden_act": "silu", "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings, "attention_bias": self.attention_bias,
            "attention_dropout": 0.0, "tie_word_embeddings": self.tie_word_embeddings,
            "pad_token_id": self.pad_token_id, "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id,
        }
        if self.dtype is not None:
            d["dtype"] = self.dtype
        if self.model_type == "olmo3":
            d["sliding_window"] = self.sliding_window
            d["layer_types"] = list(self.layer_types)
            d["rope_parameters"] = {t: self.rope[t].to_dict() for t in LAYER_TYPES if t in self.rope}
        else:
            d["rope_parameters"] = self.rope[FULL].to_dict()
        if self.is_moe:
            d.update(num_experts=self.num_experts, num_experts_per_tok=self.num_experts_per_tok,
                     norm_topk_prob=self.norm_topk_prob, expert_names=list(self.expert_names),
                     output_router_logits=False, router_aux_loss_coef=0.01)
        return d


def default_layer_types(model_type: str, num_layers: int) -> list[str]:
    """OLMo 3: every 4th layer full attention, the rest sliding. Others: all full attention."""
    if model_type != "olmo3":
        return [FULL] * num_layers
    return [FULL if (i + 1) % 4 == 0 else SLIDING for i in range(num_layers)]


def _check_int(name, value, minimum=None):
    """An int (not a bool) >= minimum and within the size bound of its field (`MAX_SIZES`)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name}: must be an integer, got {brief(value)}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name}: must be >= {minimum}, got {value}")
    maximum = MAX_SIZES.get(name.rsplit(".", 1)[-1])
    if maximum is not None and value > maximum:
        raise ConfigError(f"{name}: {brief(value)} is larger than the {maximum} olmo-lab allows")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_token_id(value) -> bool:
    return _is_int(value) and 0 <= value < MAX_SIZES["vocab_size"]


def _check_rope(where: str, rope: "RopeConfig") -> None:
    """Every RoPE value the rotary tables compute with: finite, and in the range the formulas need."""
    if rope.rope_type not in ROPE_TYPES:
        raise ConfigError(f"{where}.rope_type: unknown rope type {brief(rope.rope_type)} "
                          f"(supported: {', '.join(ROPE_TYPES)})")
    _check_float(f"{where}.rope_theta", rope.theta)
    if not rope.theta > (1 if rope.rope_type == "yarn" else 0):  # YaRN divides by log(theta)
        raise ConfigError(f"{where}.rope_theta: must be > {1 if rope.rope_type == 'yarn' else 0} for "
                          f"{rope.rope_type} RoPE, got {rope.theta!r}")
    if rope.rope_type != "yarn":
        return
    _check_float(f"{where}.factor", rope.factor)
    if not rope.factor >= 1:
        raise ConfigError(f"{where}.factor: YaRN needs a factor >= 1, got {rope.factor!r}")
    _check_int(f"{where}.original_max_position_embeddings", rope.original_max_position_embeddings, minimum=1)
    for key in ("beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim"):
        value = getattr(rope, key)
        if value is not None or key.startswith("beta"):
            _check_float(f"{where}.{key}", value)
            if key in ("beta_fast", "beta_slow", "attention_factor") and not value > 0:
                raise ConfigError(f"{where}.{key}: must be > 0, got {value!r}")
    if not isinstance(rope.truncate, bool):
        raise ConfigError(f"{where}.truncate: must be true or false, got {brief(rope.truncate)}")


def _check_float(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name}: must be a finite number, got {brief(value)}")


def _parse_rope(d: dict, model_type: str, max_pos: int) -> dict[str, RopeConfig]:
    """RoPE parameters per layer type, from v5 `rope_parameters` (nested or flat) or legacy keys.

    Decisions where transformers 5.24 is inconsistent (see docs/architecture.md §1.3):
    - a legacy `rope_theta` applies to every layer type (5.24 gives sliding layers 500000 instead);
    - YaRN in a flat or legacy form applies to the full-attention layers only for OLMo 3
      (5.24 silently drops flat YaRN); sliding layers always use plain RoPE.
    """
    params = d.get("rope_parameters")
    if params is not None and not isinstance(params, dict):
        raise ConfigError(f"rope_parameters: must be an object, got {type(params).__name__}")
    if params and set(params) <= set(LAYER_TYPES):  # nested by layer type
        for t, v in params.items():
            if not isinstance(v, dict):
                raise ConfigError(f"rope_parameters[{t!r}]: must be an object, got {type(v).__name__}")
        nested = {t: _rope_entry(f"rope_parameters[{t!r}]", v, max_pos) for t, v in params.items()}
        if model_type != "olmo3":
            if set(nested) != {FULL}:
                raise ConfigError(f"rope_parameters: {model_type} has only full_attention layers, got {sorted(nested)}")
            return {FULL: nested[FULL]}
        full = nested.get(FULL, RopeConfig())
        sliding = nested.get(SLIDING, RopeConfig(theta=full.theta))
        return {FULL: full, SLIDING: sliding}
    if params:  # flat v5 form
        entry = _rope_entry("rope_parameters", params, max_pos)
    else:  # legacy form, or nothing at all
        theta = d.get("rope_theta", 500000.0)
        scaling = d.get("rope_scaling")
        if scaling is not None and not isinstance(scaling, dict):
            raise ConfigError(f"rope_scaling: must be an object or null, got {type(scaling).__name__}")
        entry = _rope_entry("rope_scaling", {**(scaling or {}), "rope_theta": theta}, max_pos)
    if model_type != "olmo3":
        return {FULL: entry}
    return {FULL: entry, SLIDING: RopeConfig(theta=entry.theta)}


def _rope_entry(where: str, p: dict, max_pos: int) -> RopeConfig:
    """One RoPE entry, checked (`_check_rope`) before anything is computed from it."""
    rope_type = p.get("rope_type", p.get("type", "default"))
    if not isinstance(rope_type, str) or rope_type not in ROPE_TYPES:
        raise ConfigError(f"{where}.rope_type: unknown rope type {brief(rope_type)} "
                          f"(supported: {', '.join(ROPE_TYPES)})")
    theta = p.get("rope_theta", 500000.0)
    _check_float(f"{where}.rope_theta", theta)
    if rope_type == "default":
        rope = RopeConfig(theta=float(theta))
        _check_rope(where, rope)
        return rope
    orig = p.get("original_max_position_embeddings")
    if orig is None or (isinstance(orig, int) and not isinstance(orig, bool) and orig == 0):
        orig = max_pos  # not stated: transformers falls back to max_position_embeddings
    _check_int(f"{where}.original_max_position_embeddings", orig, minimum=1)
    factor = p.get("factor")
    if factor is None:
        factor = max_pos / orig
    _check_float(f"{where}.factor", factor)
    extra = {k: p[k] for k in ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim")
             if p.get(k) is not None}
    for key, value in extra.items():
        _check_float(f"{where}.{key}", value)
    truncate = p.get("truncate", True)
    if not isinstance(truncate, bool):
        raise ConfigError(f"{where}.truncate: must be true or false, got {brief(truncate)}")
    rope = RopeConfig(rope_type="yarn", theta=float(theta), factor=float(factor),
                      original_max_position_embeddings=orig, truncate=truncate, **extra)
    _check_rope(where, rope)
    return rope
