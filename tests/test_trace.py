"""Tracing: attention and routing equal transformers' own outputs; tracing changes nothing; attributions add up."""

import pytest
import torch

import olmo_lab
from olmo_lab.lens import direct_logit_attribution, expert_usage, logit_lens, logit_lens_table
from olmo_lab.trace import trace
from oracle import flex_config, load_hf, make_checkpoint, olmo3_config


@pytest.fixture(scope="module")
def olmo3(tmp_path_factory):
    return make_checkpoint(olmo3_config(sliding_window=6), tmp_path_factory.mktemp("o3"))


@pytest.fixture(scope="module")
def flex(tmp_path_factory):
    return make_checkpoint(flex_config(4, 2, num_hidden_layers=3), tmp_path_factory.mktemp("fx"))


IDS = torch.tensor([[5, 9, 33, 17, 64, 2, 8, 91, 45, 12, 77, 3, 19, 100]])


def test_traced_attention_equals_transformers_output_attentions(olmo3):
    model = olmo_lab.load_model(olmo3)
    hf = load_hf(olmo3, attn="eager")
    with torch.no_grad():
        theirs = hf(IDS, output_attentions=True).attentions
    with trace(model) as tr:
        model(IDS)
    assert sorted(tr.attention) == [0, 1, 2, 3]
    for layer in range(4):
        ours = tr.attention[layer]
        assert ours.shape == theirs[layer].shape == (1, 4, 14, 14)
        assert (ours - theirs[layer]).abs().max() <= 1e-6
        assert bool((ours[0, :, ~tr.visible(layer)] == 0).all())  # nothing outside causal/window
    assert tr.visible(0)[13].sum() == 6 and tr.visible(3)[13].sum() == 14  # window 6 vs full layer
    assert tr.kv_heads() == [0, 0, 1, 1]


def test_traced_generation_covers_prompt_and_generated_tokens(olmo3):
    model = olmo_lab.load_model(olmo3)
    prompt = IDS[0, :6].tolist()
    with trace(model, layers=[0, 3]) as tr:
        new = olmo_lab.generate(model, None, prompt, max_new_tokens=8, eos_token_id=[])
    # Every token the model read: the prompt and all generated tokens but the last (never fed back).
    assert tr.token_ids[0].tolist() == prompt + new[:-1]
    assert sorted(tr.attention) == [0, 3]
    full = torch.tensor([prompt + new[:-1]])
    with trace(model, layers=[0, 3]) as ref:
        model(full)
    for layer in (0, 3):
        assert (tr.attention[layer] - ref.attention[layer]).abs().max() <= 1e-5


def test_tracing_changes_nothing_and_leaves_no_hooks(flex):
    model = olmo_lab.load_model(flex)
    plain = model(IDS).logits
    with trace(model, attention=False, routing=True, residual=True) as tr:
        assert torch.equal(model(IDS).logits, plain)  # routing and residual capture: bit for bit
    with trace(model, attention=True):  # attention capture keeps the fused kernel: bit for bit
        assert torch.equal(model(IDS).logits, plain)
    model.set_attention_backend("eager")
    eager = model(IDS).logits
    with trace(model, attention=True):
        assert torch.equal(model(IDS).logits, eager)
    for block in model.model.layers:
        assert block._hooks is None and block.self_attn._hooks is None and block.mlp._hooks is None
    assert not model.hooks.active and not model._forward_pre_hooks
    assert tr.routing[0].logits.shape == (14, 4)


def test_traced_router_logits_equal_transformers(flex):
    model = olmo_lab.load_model(flex)
    hf = load_hf(flex)
    with torch.no_grad():
        theirs = hf(IDS, output_router_logits=True).router_logits
    with trace(model, attention=False) as tr:
        model(IDS)
    for layer in range(3):
        r = tr.routing[layer]
        assert (r.logits - theirs[layer]).abs().max() <= 1e-5
        expected = torch.topk(theirs[layer].float().softmax(-1), 2).indices
        assert torch.equal(r.topk_indices, expected)
        assert torch.allclose(r.probs.sum(-1), torch.ones(14))
    assert len(tr.routing[0].top_expert) == 14 and "top" in tr.routing[1].table()


def test_routing_of_generated_tokens_and_usage(flex):
    model = olmo_lab.load_model(flex)
    with trace(model, attention=False) as tr:
        new = olmo_lab.generate(model, None, [5, 6, 7, 8], max_new_tokens=6, eos_token_id=[])
    assert tr.routing[2].logits.shape == (4 + 5, 4)
    with trace(model, attention=False) as ref:
        model(torch.tensor([[5, 6, 7, 8] + new[:-1]]))
    assert (tr.routing[2].probs - ref.routing[2].probs).abs().max() <= 1e-5
    usage = tr.routing[0].usage()
    assert usage.shape == (4,) and abs(usage.sum().item() - 2.0) < 1e-6  # top-2: two experts per token
    first = tr.routing[0].usage(top=1)  # the highest-weight expert only
    top1 = tr.routing[0].topk_indices[:, 0]
    assert torch.equal(first, torch.bincount(top1, minlength=4) / len(top1))
    assert (first <= usage).all() and not torch.equal(first, usage)


def test_opted_out_experts_show_zero_probability(flex):
    model = olmo_lab.load_model(flex)
    with olmo_lab.experts_off(model, [1]), trace(model, attention=False) as tr:
        model(IDS)
    assert bool((tr.routing[0].probs[:, 1] == 0).all()) and 1 not in tr.routing[0].topk_indices


@pytest.mark.parametrize("which", ["olmo3", "flex"])
def test_direct_logit_attribution_sums_to_the_logit(request, which):
    model = olmo_lab.load_model(request.getfixturevalue(which))
    with trace(model, attention=False, residual=True) as tr:
        logits = model(IDS).logits
    token = int(logits[0, -1].argmax())
    att = direct_logit_attribution(model, tr, token, position=-1)
    assert abs(att.logit - logits[0, -1, token].item()) <= 1e-5
    assert abs(att.total - att.logit) <= 1e-4, att.summary()
    assert "layer 0 attention" in att.parts
    if which == "flex":
        assert sum(1 for k in att.parts if " expert " in k) == 3 * 2  # top-2 in 3 layers
        assert set(att.experts()) <= {"expert_0", "expert_1", "expert_2", "expert_3"}
    else:
        assert "layer 3 mlp" in att.parts


def test_logit_lens_last_layer_is_the_model_prediction(olmo3):
    model = olmo_lab.load_model(olmo3)
    with trace(model, attention=False, residual=True) as tr:
        logits = model(IDS).logits
    lens = logit_lens(model, tr, position=-1, top=3)
    assert len(lens) == 4 and len(lens[0]) == 3
    assert lens[-1][0][0] == str(int(logits[0, -1].argmax()))
    assert logit_lens_table(lens).startswith("layer  0:")


def test_expert_usage_by_group(flex):
    model = olmo_lab.load_model(flex)

    class Chars:  # a toy tokenizer: one id per character
        def encode(self, text):
            return [3 + ord(c) % 120 for c in text]

    usage = expert_usage(model, Chars(), {"a": ["hello there", "general"], "b": ["12345 678"]})
    assert set(usage) == {"a", "b"} and usage["a"].shape == (3, 4)
    assert torch.allclose(usage["b"].sum(-1), torch.full((3,), 2.0))
    first = expert_usage(model, Chars(), {"a": ["hello there", "general"], "b": ["12345 678"]}, top=1)
    assert torch.allclose(first["b"].sum(-1), torch.full((3,), 1.0)) and (first["a"] <= usage["a"]).all()


def test_nested_traces_each_record_what_they_asked(olmo3):
    model = olmo_lab.load_model(olmo3)
    with trace(model, layers=[0]) as outer:
        with trace(model, attention=False, residual=True) as inner:
            model(IDS)
        model(IDS[:, :5])
    assert sorted(outer.attention) == [0] and [r.length for r in outer.runs] == [14, 5]
    assert len(inner.runs) == 1 and inner.residual[3].shape == (1, 14, model.config.hidden_size)
    assert not model.hooks.active


def test_each_traced_sequence_is_kept(flex):
    model = olmo_lab.load_model(flex)
    with trace(model, attention=False) as tr:
        model(IDS[:, :5])
        model(IDS[:, :9])
    per_seq = tr.routing_per_sequence()
    assert [seq[0].logits.shape[0] for seq in per_seq] == [5, 9]
    assert torch.equal(per_seq[1][0].logits, tr.routing[0].logits)


def test_routing_tables_fit_long_expert_names():
    """The text tables widen their columns to the longest expert name instead of cutting it."""
    from olmo_lab.lens import usage_table
    from olmo_lab.trace import RoutingRecord

    names = ["public", "dictionary", "a-very-long-expert-name"]
    probs = torch.tensor([[0.2, 0.5, 0.3], [0.6, 0.1, 0.3]])
    record = RoutingRecord(logits=probs.log(), probs=probs, topk_indices=probs.argsort(-1, descending=True),
                           topk_weights=probs.sort(-1, descending=True).values, tokens=["a", "b"], expert_names=names)
    for table in (record.table(), usage_table({"text": probs, "code": probs.flip(0)}, names)):
        lines = table.splitlines()
        assert all(n in lines[0] for n in names) and len({len(line) for line in lines}) == 1, table
