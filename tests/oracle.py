"""Tiny random models built with transformers (the oracle) and saved as checkpoints for olmo-lab to load."""

import torch
import transformers


def randomize(model, seed=0):
    """Random weights everywhere, norm gains included (a gain of exactly 1 would hide norm bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.15)
    return model


def olmo3_config(**kw):
    base = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, sliding_window=8, max_position_embeddings=256, pad_token_id=1,
                eos_token_id=2, bos_token_id=None, rms_norm_eps=1e-6)
    base.update(kw)
    return transformers.Olmo3Config(**base)


def olmo2_config(**kw):
    base = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=4, max_position_embeddings=256, pad_token_id=1, eos_token_id=2)
    base.update(kw)
    return transformers.Olmo2Config(**base)


def flex_config(num_experts=3, top_k=2, norm_topk_prob=False, **kw):
    base = dict(vocab_size=128, hidden_size=64, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, num_experts=num_experts, num_experts_per_tok=top_k,
                norm_topk_prob=norm_topk_prob, max_position_embeddings=256, pad_token_id=1, eos_token_id=2)
    base.update(kw)
    return transformers.FlexOlmoConfig(**base)


CLASSES = {"olmo3": transformers.Olmo3ForCausalLM, "olmo2": transformers.Olmo2ForCausalLM,
           "flex_olmo": transformers.FlexOlmoForCausalLM}


def make_checkpoint(config, directory, seed=0, **save_kw):
    """Save a random transformers model as a checkpoint; returns the directory."""
    model = randomize(CLASSES[config.model_type]._from_config(config, dtype=torch.float32), seed)
    model.save_pretrained(directory, **save_kw)
    return directory


def load_hf(directory, dtype=torch.float32, attn="eager", experts=None):
    kw = {"experts_implementation": experts} if experts else {}
    return transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, attn_implementation=attn,
                                                             **kw).eval()


def max_diff(a, b, mask=None):
    d = (a.float() - b.float()).abs()
    if mask is not None:
        d = d[mask.bool()]
    return d.max().item()


def char_tokenizer(directory):
    """A character-level tokenizer with ids < 103 (fits the tiny models' 128-row vocabularies)."""
    import json
    import string

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    chars = ["<|endoftext|>", "<|pad|>", "<unk>"] + list(string.printable)
    tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(["<|endoftext|>", "<|pad|>"])
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>",
                                                                  "pad_token": "<|pad|>"}))
    return directory


def decode_step_by_step(model, ids, mask, prefix):
    """Logits of a `prefix`-token prefill then one token at a time through a KV cache, and the cache."""
    cache = model.new_cache()
    pieces = [model(ids[:, :prefix], attention_mask=mask[:, :prefix], cache=cache).logits]
    for i in range(prefix, ids.shape[1]):
        pieces.append(model(ids[:, i:i + 1], attention_mask=mask[:, :i + 1], cache=cache).logits)
    return torch.cat(pieces, 1), cache
