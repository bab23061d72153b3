"""The static (preallocated) KV cache and the compiled decode step, on tiny random models."""

import pytest
import torch

import olmo_lab
from olmo_lab.decode_step import CompiledDecode
from olmo_lab.errors import GenerationError, InputError, StaleCacheError
from oracle import randomize

DENSE = dict(model_type="olmo3", vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, sliding_window=8, max_position_embeddings=128,
             pad_token_id=1, eos_token_id=2)
MOE = dict(model_type="flex_olmo", vocab_size=128, hidden_size=64, intermediate_size=48, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2, num_experts=3, num_experts_per_tok=2,
           max_position_embeddings=128, pad_token_id=1, eos_token_id=2)


def _model(cfg, dtype=torch.float32):
    return randomize(olmo_lab.OlmoModel(olmo_lab.OlmoConfig(**cfg)).eval()).to(dtype)


def _batch(seed=0, seq=12, pad=4):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (2, seq), generator=g)
    mask = torch.ones(2, seq, dtype=torch.long)
    mask[1, :pad] = 0  # left padding on the second row
    return ids, mask


@pytest.mark.parametrize("cfg", [DENSE, MOE], ids=["olmo3", "flexolmo"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_static_cache_gives_the_same_bits_as_the_growing_one(cfg, dtype):
    """Prefill with left padding, then 14 single-token steps (past the window of 8): every logit equal."""
    model = _model(cfg, dtype)
    ids, mask = _batch()
    extra = torch.randint(3, 128, (2, 14), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dyn, st = model.new_cache(), model.new_cache(batch_size=2, max_len=40)
        a = model(ids, attention_mask=mask, cache=dyn).logits
        b = model(ids, attention_mask=mask, cache=st).logits
        assert torch.equal(a, b)
        for i in range(extra.shape[1]):
            mask = torch.cat([mask, mask.new_ones(2, 1)], dim=1)
            a = model(extra[:, i:i + 1], attention_mask=mask, cache=dyn).logits
            b = model(extra[:, i:i + 1], attention_mask=mask, cache=st).logits
            assert torch.equal(a, b), i
    assert st.length == dyn.length == 26
    for layer in range(cfg["num_hidden_layers"]):  # the same keys held, sliding layers their last W-1
        assert st.layer_length(layer) == dyn.layer_length(layer)
        assert torch.equal(st.keys[layer], dyn.keys[layer]) and torch.equal(st.values[layer], dyn.values[layer])


@pytest.mark.parametrize("cfg", [DENSE, MOE], ids=["olmo3", "flexolmo"])
def test_generate_with_a_static_cache(cfg):
    model = _model(cfg)
    ids, mask = _batch(seed=2)
    prompts = [ids[0].tolist(), ids[1, 4:].tolist()]  # generate left-pads the shorter one
    for kw in (dict(), dict(temperature=0.8, top_k=20, seed=3)):
        expected = olmo_lab.generate(model, None, prompts, max_new_tokens=20, eos_token_id=[], **kw)
        assert olmo_lab.generate(model, None, prompts, max_new_tokens=20, eos_token_id=[], cache="static",
                                 **kw) == expected


def test_tracing_a_static_cache_generation_records_the_same():
    model = _model(DENSE)
    ids = _batch(seed=3)[0][:1]
    records = []
    for cache in ("dynamic", "static"):
        with olmo_lab.trace(model, attention=True, residual=True) as tr:
            olmo_lab.generate(model, None, ids, max_new_tokens=10, eos_token_id=[], cache=cache)
        records.append((tr.attention[3], tr.attention[0], tr.residual[2]))
    for a, b in zip(*records):
        assert torch.equal(a, b)


def test_interventions_and_toggles_restart_a_static_cache():
    """An intervention entered mid-stream changes model.cache_key: the stream re-prefills, as on the default path."""
    model = _model(MOE)
    ids = _batch(seed=4)[0][:1]
    outs = []
    for cache in ("dynamic", "static"):
        stream = olmo_lab.generate(model, None, ids, max_new_tokens=12, eos_token_id=[], cache=cache, stream=True)
        first = [next(stream) for _ in range(4)]
        with olmo_lab.experts_off(model, [1]):
            outs.append(first + list(stream))
    assert outs[0] == outs[1]
    cache = model.new_cache(batch_size=1, max_len=32)
    model(ids, cache=cache)
    with olmo_lab.experts_off(model, [1]), pytest.raises(StaleCacheError):
        model(ids[:, :1], cache=cache)


def test_static_cache_bad_input_leaves_it_as_it_was():
    model = _model(DENSE)
    ids = _batch()[0]
    for kw in (dict(batch_size=0, max_len=8), dict(batch_size=2, max_len=129), dict(batch_size=2, max_len=True),
               dict(batch_size=2.0, max_len=8)):
        with pytest.raises(InputError):
            model.new_cache(**kw)
    cache = model.new_cache(batch_size=2, max_len=16)
    model(ids, cache=cache)
    keys = [k.clone() for k in cache.keys]
    with pytest.raises(InputError, match="room for 16 positions; it holds 12 and input_ids adds 5"):
        model(ids[:, :5], cache=cache)
    with pytest.raises(InputError, match="batch of 2"):
        model(ids[:1, :1], cache=cache)
    with pytest.raises(InputError, match="static cache holds torch.float32"):
        model.to(torch.bfloat16)(ids[:, :1], cache=cache)
    model.to(torch.float32)
    assert cache.length == 12 and all(torch.equal(a, b) for a, b in zip(cache.keys, keys))
    with pytest.raises(StaleCacheError):
        _model(DENSE)(ids[:, :1], cache=cache)


def test_a_placed_model_refuses_a_static_cache(tmp_path):
    olmo_lab.save_model(_model(DENSE), tmp_path / "ckpt")
    placed = olmo_lab.load_model(tmp_path / "ckpt", device_map={"": "cpu"})
    with pytest.raises(InputError, match="static cache needs a model on one device"):
        placed.new_cache(batch_size=1, max_len=8)
    with pytest.raises(InputError, match="static cache needs a model on one device"):
        olmo_lab.generate(placed, None, [[5, 6]], max_new_tokens=2, cache="static")


def test_generate_refuses_bad_cache_arguments():
    dense, moe = _model(DENSE), _model(MOE)
    ids = [[5, 6, 7]]
    with pytest.raises(GenerationError, match="cache: expected 'dynamic' or 'static'"):
        olmo_lab.generate(dense, None, ids, cache="paged")
    with pytest.raises(GenerationError, match="compile: expected True or False"):
        olmo_lab.generate(dense, None, ids, cache="static", compile="yes")
    with pytest.raises(GenerationError, match="needs cache='static'"):
        olmo_lab.generate(dense, None, ids, compile=True)
    with pytest.raises(GenerationError, match="covers dense models"):
        olmo_lab.generate(moe, None, ids, cache="static", compile=True)
    with olmo_lab.trace(dense), pytest.raises(GenerationError, match="cannot call Python hook functions"):
        olmo_lab.generate(dense, None, ids, cache="static", compile=True)


def test_compiled_decode_matches_eager():
    """One compile of a tiny model: logits within 1e-4 (fp32) of the growing cache, the same greedy tokens, a weight
    edited in place after compiling is seen, and hooks attached mid-stream are refused."""
    model = _model(dict(DENSE, num_hidden_layers=2, max_position_embeddings=64))
    ids, mask = _batch(seed=5, seq=6, pad=2)
    steps = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(6))
    with torch.inference_mode():
        dyn, st, step = model.new_cache(), model.new_cache(batch_size=2, max_len=64), CompiledDecode(model)
        model(ids, attention_mask=mask, cache=dyn)
        model(ids, attention_mask=mask, cache=st)
        position = (mask.cumsum(-1) - 1)[:, -1:]
        for i in range(steps.shape[1]):
            mask, position = torch.cat([mask, mask.new_ones(2, 1)], dim=1), position + 1
            a = model(steps[:, i:i + 1], attention_mask=mask, position_ids=position, cache=dyn).logits[:, -1]
            b = step(steps[:, i:i + 1], position, mask, st)
            assert (a - b).abs().max() <= 1e-4 and not torch.equal(a, torch.zeros_like(a))
        prompts = [ids[0].tolist(), ids[1, 2:].tolist()]
        expected = olmo_lab.generate(model, None, prompts, max_new_tokens=30, eos_token_id=[])
        assert olmo_lab.generate(model, None, prompts, max_new_tokens=30, eos_token_id=[], cache="static",
                                 compile=True) == expected
        model.lm_head.weight[5] += 10.0  # token 5 now wins everywhere; a frozen copy of the weights would miss it
        assert olmo_lab.generate(model, None, prompts, max_new_tokens=3, eos_token_id=[], cache="static",
                                 compile=True) == [[5, 5, 5]] * 2
    stream = olmo_lab.generate(model, None, prompts[:1], max_new_tokens=5, eos_token_id=[], cache="static",
                               compile=True, stream=True)
    next(stream)  # the prompt (uncompiled); the next token would be a compiled step
    with olmo_lab.trace(model), pytest.raises(GenerationError, match="cannot call Python hook functions"):
        next(stream)


def test_a_failed_compile_is_a_generation_error(monkeypatch):
    """Without a working C++ compiler inductor fails at the first compiled step: one olmo_lab error, the cache kept."""
    from torch._dynamo.exc import BackendCompilerFailed
    from olmo_lab.modeling import decode_step

    def broken(*args):
        raise BackendCompilerFailed(lambda: None, RuntimeError("InvalidCxxCompiler: no working C++ compiler"), None)
    monkeypatch.setattr(decode_step, "_compiled_step", broken)
    model = _model(DENSE)
    with torch.inference_mode():
        cache = model.new_cache(batch_size=1, max_len=16)
        model(torch.tensor([[5, 6, 7]]), cache=cache)
        with pytest.raises(GenerationError, match="could not build the decode step"):
            CompiledDecode(model)(torch.tensor([[8]]), torch.tensor([[3]]), None, cache)
    assert cache.length == 3


def test_static_caches_come_in_a_few_sizes():
    from olmo_lab.generate import static_length
    assert [static_length(n, 256) for n in (1, 48, 64, 65, 158, 256)] == [64, 64, 64, 128, 256, 256]
    assert static_length(3000, 2048 + 1000) == 3048  # never past the context


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_a_quantized_model_gives_the_same_bits_with_a_static_cache(scheme):
    model = olmo_lab.load_model(olmo_lab.lab_model("olmo3-lab"), quantize=scheme)
    ids = torch.randint(3, 4000, (1, 9), generator=torch.Generator().manual_seed(7))
    expected = olmo_lab.generate(model, None, ids, max_new_tokens=8, eos_token_id=[])
    assert olmo_lab.generate(model, None, ids, max_new_tokens=8, eos_token_id=[], cache="static") == expected
    with torch.inference_mode():
        dyn, st = model.new_cache(), model.new_cache(batch_size=1, max_len=16)
        assert torch.equal(model(ids, cache=dyn).logits, model(ids, cache=st).logits)
        step = torch.tensor([expected[0][:1]])
        assert torch.equal(model(step, cache=dyn).logits, model(step, cache=st).logits)
