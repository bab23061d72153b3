"""OLMo 3 and OLMo 2 against transformers on tiny random checkpoints: logits, layers, cache, generate, save."""

import json
import os

import pytest
import torch
import transformers

import olmo_lab
from olmo_lab.compare import compare_with_transformers
from oracle import decode_step_by_step, load_hf, make_checkpoint, max_diff, olmo2_config, olmo3_config

YARN = {"full_attention": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                           "rope_theta": 10000.0, "beta_fast": 32.0, "beta_slow": 1.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}

CONFIGS = {
    "gqa": dict(),
    "mha": dict(num_key_value_heads=4),
    "yarn": dict(rope_parameters=YARN),
    "head_dim": dict(head_dim=24, num_attention_heads=4, num_key_value_heads=1),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def olmo3_ckpt(request, tmp_path_factory):
    return make_checkpoint(olmo3_config(**CONFIGS[request.param]), tmp_path_factory.mktemp(request.param))


def _inputs(seq=21, batch=2, pad=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[-1, :pad] = 0  # left padding on the last row
    return ids, mask


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_logits_match_transformers(olmo3_ckpt, attn, dtype, tol):
    hf = load_hf(olmo3_ckpt, dtype, attn)
    ours = olmo_lab.load_model(olmo3_ckpt, dtype=dtype).set_attention_backend(attn)
    ids, mask = _inputs(seq=21)  # longer than the window of 8
    with torch.no_grad():
        assert max_diff(ours(ids).logits, hf(ids).logits) <= tol
        assert max_diff(ours(ids, attention_mask=mask).logits, hf(ids, attention_mask=mask).logits, mask) <= tol
    assert ours(ids).logits.dtype == dtype


def test_bit_exact_in_fp32_and_bf16(olmo3_ckpt):
    """The spec's strongest claim: same op order and dtypes give identical bits, not just close values."""
    ids, mask = _inputs()
    for dtype in (torch.float32, torch.bfloat16):
        hf = load_hf(olmo3_ckpt, dtype, "sdpa")
        ours = olmo_lab.load_model(olmo3_ckpt, dtype=dtype)
        with torch.no_grad():
            assert torch.equal(ours(ids, attention_mask=mask).logits[mask.bool()],
                               hf(ids, attention_mask=mask).logits[mask.bool()])


def test_layer_by_layer_report(olmo3_ckpt):
    ours = olmo_lab.load_model(olmo3_ckpt)
    ids, mask = _inputs()
    report = compare_with_transformers(ours, ids, attention_mask=mask)
    names = [s.name for s in report.stages]
    assert names == ["embeddings", "block 0", "block 1", "block 2", "block 3", "final norm", "logits"]
    assert report.first_divergence(1e-5) is None, str(report)
    assert "block 3" in str(report)


def test_layer_report_finds_a_broken_layer(olmo3_ckpt):
    ours = olmo_lab.load_model(olmo3_ckpt)
    with torch.no_grad():
        ours.model.layers[2].post_feedforward_layernorm.weight.mul_(1.5)
    report = compare_with_transformers(ours, _inputs()[0])
    assert report.first_divergence(1e-5) == "block 2"


def test_cached_decoding_equals_full_forward(olmo3_ckpt):
    model = olmo_lab.load_model(olmo3_ckpt)
    ids, mask = _inputs(seq=30)
    full = model(ids, attention_mask=mask).logits
    stepped, cache = decode_step_by_step(model, ids, mask, prefix=7)  # positions follow the cache
    assert max_diff(stepped, full, mask) <= 1e-5
    window = model.config.sliding_window
    for i, t in enumerate(model.config.layer_types):
        assert cache.layer_length(i) == (window - 1 if t == "sliding_attention" else 30)


def test_chunked_prefill_matches(olmo3_ckpt):
    model = olmo_lab.load_model(olmo3_ckpt)
    ids = _inputs(seq=25)[0][:1]
    full = model(ids).logits
    cache = model.new_cache()
    a = model(ids[:, :10], cache=cache).logits
    b = model(ids[:, 10:], cache=cache).logits  # 15 new queries over a trimmed sliding cache
    assert max_diff(torch.cat([a, b], 1), full) <= 1e-5


def test_greedy_generate_matches_transformers(olmo3_ckpt):
    hf = load_hf(olmo3_ckpt, attn="sdpa")
    model = olmo_lab.load_model(olmo3_ckpt)
    prompt = [5, 17, 42, 99, 3, 64]
    ours = olmo_lab.generate(model, None, prompt, max_new_tokens=32, eos_token_id=[])
    theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, eos_token_id=None,
                         pad_token_id=1, min_new_tokens=32)[0, len(prompt):].tolist()
    assert ours == theirs and len(ours) == 32


def test_batched_left_padded_generate_matches_single(olmo3_ckpt):
    model = olmo_lab.load_model(olmo3_ckpt)
    prompts = [[5, 17, 42, 99, 3, 64, 7, 8], [9, 10, 11]]
    batch = olmo_lab.generate(model, None, prompts, max_new_tokens=12, eos_token_id=[])
    singles = [olmo_lab.generate(model, None, p, max_new_tokens=12, eos_token_id=[]) for p in prompts]
    assert batch == singles


def test_sampling_is_reproducible_with_a_seed(olmo3_ckpt):
    model = olmo_lab.load_model(olmo3_ckpt)
    kw = dict(max_new_tokens=20, temperature=1.0, top_k=50, top_p=0.9, eos_token_id=[])
    a = olmo_lab.generate(model, None, [5, 6, 7], seed=123, **kw)
    b = olmo_lab.generate(model, None, [5, 6, 7], seed=123, **kw)
    c = olmo_lab.generate(model, None, [5, 6, 7], seed=124, **kw)
    assert a == b and a != c


def test_generation_stops_at_eos(olmo3_ckpt):
    model = olmo_lab.load_model(olmo3_ckpt)
    free = olmo_lab.generate(model, None, [5, 6, 7], max_new_tokens=10, eos_token_id=[])
    stopped = olmo_lab.generate(model, None, [5, 6, 7], max_new_tokens=10, eos_token_id=free[3])
    assert stopped == free[:free.index(free[3]) + 1]


def test_long_generation_keeps_sliding_cache_bounded(tmp_path):
    ckpt = make_checkpoint(olmo3_config(num_hidden_layers=4, sliding_window=4), tmp_path)
    model = olmo_lab.load_model(ckpt)
    cache = model.new_cache()
    ids = torch.tensor([[5, 6, 7]])
    model(ids, cache=cache)
    for step in range(60):
        model(torch.tensor([[8 + step % 50]]), cache=cache)
    assert [cache.layer_length(i) for i in range(4)] == [3, 3, 3, 63]


def test_save_model_round_trip_through_transformers(olmo3_ckpt, tmp_path):
    model = olmo_lab.load_model(olmo3_ckpt)
    olmo_lab.save_model(model, tmp_path / "saved")
    hf = load_hf(tmp_path / "saved", attn="sdpa")
    ids, mask = _inputs()
    with torch.no_grad():
        assert torch.equal(hf(ids, attention_mask=mask).logits[mask.bool()],
                           model(ids, attention_mask=mask).logits[mask.bool()])
    again = olmo_lab.load_model(tmp_path / "saved")
    assert torch.equal(again(ids).logits, model(ids).logits)
    assert again.config == model.config
    umask = os.umask(0o022)
    try:
        olmo_lab.save_model(model, tmp_path / "public")
    finally:
        os.umask(umask)
    for f in (tmp_path / "public").iterdir():  # the usual permissions, not mkstemp's private 0600
        assert f.stat().st_mode & 0o777 == 0o644, f.name


def test_sharded_checkpoints_load_and_save(tmp_path):
    ckpt = make_checkpoint(olmo3_config(), tmp_path / "hf", max_shard_size="60KB")
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    model = olmo_lab.load_model(ckpt)
    hf = load_hf(ckpt)
    ids, _ = _inputs()
    assert max_diff(model(ids).logits, hf(ids).logits) <= 1e-5
    out = olmo_lab.save_model(model, tmp_path / "ours", max_shard_size="50KB")
    files = sorted(p.name for p in (tmp_path / "ours").iterdir())
    assert "model.safetensors.index.json" in files and "model.safetensors" not in files
    assert torch.equal(olmo_lab.load_model(out)(ids).logits, model(ids).logits)
    assert max_diff(load_hf(out)(ids).logits, model(ids).logits) <= 1e-5


def test_dtype_cast_at_load_keeps_rope_in_fp32(olmo3_ckpt):
    model = olmo_lab.load_model(olmo3_ckpt, dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(inv.dtype == torch.float32 for inv, _ in model.model.rotary.tables.values())
    model.to(torch.float16)  # .to() cannot round the RoPE tables (transformers' .to(bf16) trap)
    assert all(inv.dtype == torch.float32 for inv, _ in model.model.rotary.tables.values())


def test_tied_embeddings(tmp_path):
    ckpt = make_checkpoint(olmo3_config(tie_word_embeddings=True), tmp_path)
    model = olmo_lab.load_model(ckpt)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids, _ = _inputs()
    assert max_diff(model(ids).logits, load_hf(ckpt)(ids).logits) <= 1e-5
    olmo_lab.save_model(model, tmp_path / "saved")
    assert max_diff(load_hf(tmp_path / "saved")(ids).logits, model(ids).logits) <= 1e-5


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_olmo2_matches_transformers(tmp_path, attn):
    ckpt = make_checkpoint(olmo2_config(), tmp_path)
    model = olmo_lab.load_model(ckpt).set_attention_backend(attn)
    assert model.config.model_type == "olmo2" and set(model.config.layer_types) == {"full_attention"}
    ids, mask = _inputs(seq=40)
    hf = load_hf(ckpt, attn=attn)
    assert max_diff(model(ids, attention_mask=mask).logits, hf(ids, attention_mask=mask).logits, mask) <= 1e-5
    olmo_lab.save_model(model, tmp_path / "saved")
    assert isinstance(load_hf(tmp_path / "saved"), transformers.Olmo2ForCausalLM)


def test_legacy_config_with_yarn_matches_transformers(tmp_path):
    """A released-style config.json (top-level rope_theta + rope_scaling) puts YaRN on full layers only."""
    ckpt = make_checkpoint(olmo3_config(rope_parameters=YARN), tmp_path)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg.pop("rope_parameters")
    cfg["rope_theta"] = 500000.0  # transformers 5.24 reads a legacy theta correctly only when it is 500000
    cfg["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                           "beta_fast": 32.0, "beta_slow": 1.0}
    (ckpt / "config.json").write_text(json.dumps(cfg))
    model = olmo_lab.load_model(ckpt)
    assert model.config.rope["full_attention"].rope_type == "yarn"
    assert model.config.rope["sliding_attention"].rope_type == "default"
    ids = _inputs(seq=100)[0]
    assert max_diff(model(ids).logits, load_hf(ckpt)(ids).logits) <= 1e-5


@pytest.fixture(scope="module")
def with_tokenizer(tmp_path_factory):
    from oracle import char_tokenizer
    d = make_checkpoint(olmo3_config(eos_token_id=0, pad_token_id=1), tmp_path_factory.mktemp("tok"))
    char_tokenizer(d)
    return olmo_lab.load_model(d), olmo_lab.load_tokenizer(d)


def test_text_generation_streaming_and_stop_strings(with_tokenizer):
    model, tok = with_tokenizer
    text = olmo_lab.generate(model, tok, "Hello", max_new_tokens=20, eos_token_id=[])
    assert len(tok.encode(text)) == 20
    pieces = list(olmo_lab.generate(model, tok, "Hello", max_new_tokens=20, stream=True, eos_token_id=[]))
    assert "".join(pieces) == text and len(pieces) > 1
    stop = text[5:7]  # a string the greedy continuation is known to produce
    cut = olmo_lab.generate(model, tok, "Hello", max_new_tokens=20, stop=stop, eos_token_id=[])
    assert cut == text[:text.index(stop)]
    streamed = "".join(olmo_lab.generate(model, tok, "Hello", max_new_tokens=20, stop=[stop], stream=True,
                                         eos_token_id=[]))
    assert streamed == cut
    batch = olmo_lab.generate(model, tok, ["Hello", "Hi there"], max_new_tokens=8, eos_token_id=[])
    assert batch == [olmo_lab.generate(model, tok, p, max_new_tokens=8, eos_token_id=[]) for p in ["Hello", "Hi there"]]


def test_zero_new_tokens(with_tokenizer):
    model, tok = with_tokenizer
    assert olmo_lab.generate(model, tok, "Hello", max_new_tokens=0) == ""
    assert olmo_lab.generate(model, None, [5, 6], max_new_tokens=0) == []
