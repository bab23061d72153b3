"""Properties over random tiny configs and inputs (issue 8), checked with hypothesis.

- KV-cached decoding, in chunks of any size, equals one full forward;
- `save_model` then `load_model` is the identity on logits (sharded or not, tied or not);
- switching experts off in any way and then enabling every expert gives the untoggled model back;
- loading a subset of experts equals loading all of them and opting the others out;
- left padding does not change the logits of the real tokens when positions follow the mask.

Models are built directly from an `OlmoConfig` with random weights (norm gains included). Examples are
few and tiny so the whole file runs in seconds; `database=None` keeps hypothesis from writing files.
"""

from __future__ import annotations

import tempfile

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import olmo_lab
from olmo_lab.config import FULL, LAYER_TYPES, SLIDING, RopeConfig

SETTINGS = settings(max_examples=15, deadline=None, database=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def configs(draw, model_types=("olmo3", "olmo2", "flex_olmo")) -> olmo_lab.OlmoConfig:
    """A random valid tiny config: GQA or MHA, any layer pattern, tied or not, optional YaRN, 2-4 experts."""
    model_type = draw(st.sampled_from(model_types))
    kv_heads, groups = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    layers = draw(st.integers(1, 3))
    kw = dict(model_type=model_type, vocab_size=draw(st.integers(16, 64)), hidden_size=draw(st.sampled_from([16, 24])),
              intermediate_size=draw(st.sampled_from([8, 16])), num_hidden_layers=layers,
              num_attention_heads=kv_heads * groups, num_key_value_heads=kv_heads,
              head_dim=draw(st.sampled_from([4, 8])), max_position_embeddings=64, rms_norm_eps=1e-6,
              tie_word_embeddings=draw(st.booleans()), pad_token_id=0)
    full = RopeConfig(theta=draw(st.sampled_from([1e4, 5e5])))
    if draw(st.booleans()):
        full = RopeConfig(rope_type="yarn", theta=full.theta, factor=2.0, original_max_position_embeddings=32)
    kw["rope"] = {FULL: full, SLIDING: RopeConfig(theta=full.theta)}
    if model_type == "olmo3":
        kw["layer_types"] = draw(st.lists(st.sampled_from(LAYER_TYPES), min_size=layers, max_size=layers))
        kw["sliding_window"] = draw(st.integers(2, 6))
    if model_type == "flex_olmo":
        experts = draw(st.integers(2, 4))
        kw.update(num_experts=experts, num_experts_per_tok=draw(st.integers(1, experts)),
                  norm_topk_prob=draw(st.booleans()))
    return olmo_lab.OlmoConfig(**kw)


def build(config: olmo_lab.OlmoConfig, seed: int) -> olmo_lab.OlmoModel:
    """Random weights as in tests/oracle.py: N(0, 0.15^2), norm gains in [0.5, 1.5] (a gain of exactly 1
    would hide a skipped or misplaced norm); logits stay O(1), so absolute tolerances are meaningful."""
    model = olmo_lab.OlmoModel(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            gain = "norm" in name
            p.copy_(torch.rand(p.shape, generator=g) + 0.5 if gain else torch.randn(p.shape, generator=g) * 0.15)
    return model


def token_ids(draw, config, batch: int, length: int) -> torch.Tensor:
    values = draw(st.lists(st.integers(0, config.vocab_size - 1), min_size=batch * length, max_size=batch * length))
    return torch.tensor(values).view(batch, length)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@SETTINGS
@given(config=configs(), seed=st.integers(0, 2**16), data=st.data())
@torch.no_grad()
def test_cached_decoding_equals_a_full_forward(config, seed, data):
    model = build(config, seed)
    length = data.draw(st.integers(2, 14))
    ids = token_ids(data.draw, config, data.draw(st.integers(1, 2)), length)
    cuts = sorted(set(data.draw(st.lists(st.integers(1, length - 1), max_size=4))))  # chunk boundaries
    full = model(ids).logits
    cache = model.new_cache()
    pieces = [model(ids[:, a:b], cache=cache).logits for a, b in zip([0] + cuts, cuts + [length])]
    assert cache.length == length
    assert max_diff(torch.cat(pieces, dim=1), full) <= 1e-5


@SETTINGS
@given(config=configs(), seed=st.integers(0, 2**16), shard=st.sampled_from([None, 2_000, 10_000]), data=st.data())
@torch.no_grad()
def test_save_then_load_is_the_identity_on_logits(config, seed, shard, data):
    model = build(config, seed)
    ids = token_ids(data.draw, config, 2, data.draw(st.integers(1, 10)))
    with tempfile.TemporaryDirectory() as directory:
        olmo_lab.save_model(model, directory, max_shard_size=shard)
        loaded = olmo_lab.load_model(directory)
    assert loaded.config.to_dict() == model.config.replace(dtype="float32").to_dict()
    assert torch.equal(loaded(ids).logits, model(ids).logits)


@SETTINGS
@given(config=configs(model_types=("flex_olmo",)), seed=st.integers(0, 2**16), data=st.data())
@torch.no_grad()
def test_enabling_every_expert_gives_the_untoggled_model(config, seed, data):
    model = build(config, seed)
    ids = token_ids(data.draw, config, 2, data.draw(st.integers(1, 10)))
    untoggled = model(ids).logits
    E, L = config.num_experts, config.num_hidden_layers
    for _ in range(data.draw(st.integers(1, 3))):  # a few random switch-offs, each leaving one expert on
        off = data.draw(st.lists(st.integers(0, E - 1), min_size=1, max_size=E - 1, unique=True))
        layers = data.draw(st.lists(st.integers(0, L - 1), min_size=1, max_size=L, unique=True))
        model.experts.reset().disable(off, layers=layers, mode=data.draw(st.sampled_from(["opt_out", "drop"])))
    model.experts.enable("all")
    assert all(status == ["on"] * L for status in model.experts.state().values())
    assert torch.equal(model(ids).logits, untoggled)


@SETTINGS
@given(config=configs(model_types=("flex_olmo",)), seed=st.integers(0, 2**16), data=st.data())
@torch.no_grad()
def test_expert_subset_loading_equals_opting_the_rest_out(config, seed, data):
    model = build(config, seed)
    E = config.num_experts
    keep = data.draw(st.lists(st.integers(0, E - 1), min_size=1, max_size=E, unique=True))
    ids = token_ids(data.draw, config, 2, data.draw(st.integers(1, 10)))
    with tempfile.TemporaryDirectory() as directory:
        olmo_lab.save_model(model, directory)
        full = olmo_lab.load_model(directory)
        subset = olmo_lab.load_model(directory, experts=keep)
    assert subset.experts.names == [config.expert_names[e] for e in sorted(keep)]
    rest = [e for e in range(E) if e not in keep]
    if rest:
        full.experts.disable(rest)
    # Same function, not the same float ops: the full router's (E, H) matmul rounds the kept rows' logits
    # differently from the subset's (k, H) one (about 1 ulp, ~2e-7), and three layers grow that to
    # ~1.5e-6 in about 1 random case of 150; 1e-5 stays far below any real routing difference.
    assert max_diff(subset(ids).logits, full(ids).logits) <= 1e-5


@SETTINGS
@given(config=configs(), seed=st.integers(0, 2**16), data=st.data())
@torch.no_grad()
def test_left_padding_does_not_change_the_real_tokens(config, seed, data):
    model = build(config, seed)
    length, pad = data.draw(st.integers(1, 10)), data.draw(st.integers(1, 5))
    ids = token_ids(data.draw, config, 1, length)
    padded = torch.cat([torch.full((1, pad), config.pad_token_id), ids], dim=1)
    mask = torch.cat([torch.zeros(1, pad, dtype=torch.long), torch.ones(1, length, dtype=torch.long)], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    # Batch it with an unpadded row, as generate does for prompts of different lengths.
    other = token_ids(data.draw, config, 1, pad + length)
    batch_ids, batch_mask = torch.cat([padded, other]), torch.cat([mask, torch.ones_like(mask)])
    batch_positions = torch.cat([positions, torch.arange(pad + length)[None]])
    logits = model(batch_ids, attention_mask=batch_mask, position_ids=batch_positions).logits
    assert max_diff(logits[0, pad:], model(ids).logits[0]) <= 1e-5
    assert max_diff(logits[1], model(other).logits[0]) <= 1e-5
