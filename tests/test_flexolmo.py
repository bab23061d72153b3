"""FlexOlmo against transformers: logits, routers, cache, generation; expert toggles and subset loading."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import olmo_lab
from olmo_lab.compare import compare_with_transformers
from oracle import decode_step_by_step, flex_config, load_hf, make_checkpoint, max_diff

COMBOS = [(3, 2, False), (3, 2, True), (2, 2, False), (4, 1, False), (7, 7, False)]


@pytest.fixture(scope="module", params=COMBOS, ids=lambda c: f"E{c[0]}K{c[1]}{'norm' if c[2] else ''}")
def flex_ckpt(request, tmp_path_factory):
    E, K, norm = request.param
    return make_checkpoint(flex_config(E, K, norm), tmp_path_factory.mktemp(f"flex{E}{K}{norm}"))


@pytest.fixture(scope="module")
def flex4(tmp_path_factory):
    d = make_checkpoint(flex_config(4, 2, num_hidden_layers=3), tmp_path_factory.mktemp("flex4"))
    cfg = json.loads((d / "config.json").read_text())
    cfg["expert_names"] = ["public", "math", "code", "news"]
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def _inputs(seq=13, pad=4, seed=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (2, seq), generator=g)
    mask = torch.ones(2, seq, dtype=torch.long)
    mask[-1, :pad] = 0
    return ids, mask


@pytest.mark.parametrize("experts_impl", ["grouped_mm", "eager"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_logits_match_transformers_fp32(flex_ckpt, attn, experts_impl):
    hf = load_hf(flex_ckpt, torch.float32, attn, experts=experts_impl)
    ours = olmo_lab.load_model(flex_ckpt).set_attention_backend(attn)
    ids, mask = _inputs()
    with torch.no_grad():
        assert max_diff(ours(ids).logits, hf(ids).logits) <= 1e-5
        assert max_diff(ours(ids, attention_mask=mask).logits, hf(ids, attention_mask=mask).logits, mask) <= 1e-5


def test_logits_match_transformers_bf16(flex_ckpt):
    """bf16: bit-exact against transformers' default grouped_mm experts (one fp32-accumulated slot sum)."""
    hf = load_hf(flex_ckpt, torch.bfloat16, "sdpa", experts="grouped_mm")
    ours = olmo_lab.load_model(flex_ckpt, dtype=torch.bfloat16)
    ids, mask = _inputs()
    with torch.no_grad():
        assert max_diff(ours(ids, attention_mask=mask).logits, hf(ids, attention_mask=mask).logits, mask) <= 2e-2
        assert torch.equal(ours(ids).logits, hf(ids).logits)


def test_router_by_router(flex_ckpt):
    ours = olmo_lab.load_model(flex_ckpt)
    ids, mask = _inputs(seq=20)
    report = compare_with_transformers(ours, ids, attention_mask=mask)
    assert len(report.router_logit_diffs) == ours.config.num_hidden_layers
    assert max(report.router_logit_diffs) <= 1e-5, str(report)
    assert min(report.topk_agreement) == 1.0, str(report)
    assert report.first_divergence(1e-5) is None, str(report)


def test_cached_decoding_and_greedy_generation(flex_ckpt):
    model = olmo_lab.load_model(flex_ckpt)
    ids, mask = _inputs(seq=16)
    full = model(ids, attention_mask=mask).logits
    stepped, _ = decode_step_by_step(model, ids, mask, prefix=5)
    assert max_diff(stepped, full, mask) <= 1e-5
    hf = load_hf(flex_ckpt, attn="sdpa")
    prompt = [7, 8, 9, 10, 11]
    theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, eos_token_id=None,
                         pad_token_id=1, min_new_tokens=32)[0, 5:].tolist()
    assert olmo_lab.generate(model, None, prompt, max_new_tokens=32, eos_token_id=[]) == theirs


@pytest.mark.parametrize("toggle", [None, "opt_out", "drop"])
def test_one_token_steps_match_the_full_forward(flex4, toggle):
    """Batch-1 decoding routes one token at a time (MoE's one-token path): same logits and routing."""
    model = olmo_lab.load_model(flex4)
    ids = _inputs(seq=12)[0][:1]
    mask = torch.ones_like(ids)
    if toggle:
        model.experts.disable(["math"], mode=toggle)
    routes = []
    handle = model.hooks.add("model.layers.1.mlp.hook_routing", lambda r, ctx: routes.append(r))
    full = model(ids).logits
    stepped, _ = decode_step_by_step(model, ids, mask, prefix=1)
    assert max_diff(stepped, full) <= 1e-5
    assert torch.equal(torch.cat([r.topk_indices for r in routes[1:]]), routes[0].topk_indices)
    handle.remove()  # the hook-free path computes the same
    assert max_diff(decode_step_by_step(model, ids, mask, prefix=1)[0], stepped) == 0


def test_fused_layout_loads(flex4, tmp_path):
    """transformers 5's in-memory fused layout (gate_up_proj, down_proj) loads to the same model."""
    state = load_file(flex4 / "model.safetensors")
    fused = {}
    for k, v in state.items():
        if ".experts." not in k:
            fused[k] = v
    for layer in range(3):
        p = f"model.layers.{layer}.mlp.experts"
        fused[f"{p}.gate_up_proj"] = torch.stack(
            [torch.cat([state[f"{p}.{e}.gate_proj.weight"], state[f"{p}.{e}.up_proj.weight"]]) for e in range(4)])
        fused[f"{p}.down_proj"] = torch.stack([state[f"{p}.{e}.down_proj.weight"] for e in range(4)])
    d = tmp_path / "fused"
    d.mkdir()
    save_file(fused, d / "model.safetensors")
    (d / "config.json").write_text((flex4 / "config.json").read_text())
    ids, _ = _inputs()
    a, b = olmo_lab.load_model(flex4), olmo_lab.load_model(d)
    assert torch.equal(a(ids).logits, b(ids).logits)
    sub = olmo_lab.load_model(d, experts=["public", "code"])  # subset loading from the fused layout too
    with olmo_lab.experts_off(a, ["math", "news"]):
        assert max_diff(sub(ids).logits, a(ids).logits) == 0  # exact: the same function


def test_save_model_writes_per_expert_layout(flex4, tmp_path):
    model = olmo_lab.load_model(flex4)
    olmo_lab.save_model(model, tmp_path)
    keys = load_file(tmp_path / "model.safetensors").keys()
    assert "model.layers.0.mlp.experts.3.gate_proj.weight" in keys and "model.layers.0.mlp.gate.weight" in keys
    assert not any("gate_up_proj" in k for k in keys)
    assert json.loads((tmp_path / "config.json").read_text())["expert_names"] == ["public", "math", "code", "news"]
    ids, _ = _inputs()
    assert max_diff(load_hf(tmp_path)(ids).logits, model(ids).logits) <= 1e-5


# ---------------------------------------------------------------------------------------- toggles
def _deleted(src, j, dst):
    """A checkpoint that never had expert j: router row and weights removed, num_experts lowered."""
    state = load_file(src / "model.safetensors")
    cfg = json.loads((src / "config.json").read_text())
    E = cfg["num_experts"]
    out = {}
    for k, v in state.items():
        if k.endswith("mlp.gate.weight"):
            out[k] = torch.cat([v[:j], v[j + 1:]]).contiguous()
        elif ".mlp.experts." in k:
            prefix, rest = k.split(".mlp.experts.")
            e, tail = rest.split(".", 1)
            if int(e) != j:
                out[f"{prefix}.mlp.experts.{int(e) - (int(e) > j)}.{tail}"] = v
        else:
            out[k] = v
    dst.mkdir()
    save_file(out, dst / "model.safetensors")
    cfg["num_experts"] = E - 1
    cfg["num_experts_per_tok"] = min(cfg["num_experts_per_tok"], E - 1)
    cfg["expert_names"] = [n for i, n in enumerate(cfg["expert_names"]) if i != j]
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("j", [0, 1, 3])
def test_opt_out_equals_a_model_that_never_had_the_expert(flex4, tmp_path, j):
    model = olmo_lab.load_model(flex4)
    without = olmo_lab.load_model(_deleted(flex4, j, tmp_path / "deleted"))
    ids, mask = _inputs(seq=17)
    name = model.experts.names[j]
    with olmo_lab.experts_off(model, [name]):
        ours = model(ids, attention_mask=mask).logits
    ref = without(ids, attention_mask=mask).logits
    assert max_diff(ours, ref, mask) == 0  # exact: the same function, not merely close
    hf = load_hf(tmp_path / "deleted")  # and the deleted checkpoint is a valid transformers model
    assert max_diff(hf(ids, attention_mask=mask).logits, ref, mask) <= 1e-5
    assert max_diff(model(ids, attention_mask=mask).logits, ours, mask) > 1e-3  # toggling did something


def test_top_k_larger_than_enabled_uses_all_enabled(flex4):
    model = olmo_lab.load_model(flex4)  # top-2 of 4
    model.experts.disable(["math", "code", "news"])
    ids, _ = _inputs()
    routes = []
    model.hooks.add("model.layers.0.mlp.hook_routing", lambda r, ctx: routes.append(r))
    model(ids)
    r = routes[0]
    assert r.topk_indices.shape[1] == 1 and bool((r.topk_indices == 0).all())
    assert torch.allclose(r.topk_weights.float(), torch.ones_like(r.topk_weights.float()))
    assert bool((r.probs[:, 1:] == 0).all())


def test_drop_after_routing_keeps_routing_and_zeroes_the_expert(flex4):
    model = olmo_lab.load_model(flex4)
    ids, _ = _inputs()
    routes = {}
    block = model.model.layers[1]
    model.hooks.add("model.layers.1.mlp.hook_routing", lambda r, ctx: routes.__setitem__("r", r))
    model(ids)
    base = routes["r"]
    with olmo_lab.experts_off(model, "math", layers=[1], mode="drop"):  # earlier layers unchanged
        assert model.experts.state()["math"] == ["on", "dropped", "on"]
        model(ids)
        dropped = routes["r"]
    assert torch.equal(base.topk_indices, dropped.topk_indices) and torch.equal(base.probs, dropped.probs)
    is_math = base.topk_indices == 1
    assert bool((dropped.topk_weights[is_math] == 0).all())
    assert torch.equal(dropped.topk_weights[~is_math], base.topk_weights[~is_math])  # not renormalised
    # The layer output equals the weighted sum of the remaining experts, computed by hand.
    x = torch.randn(5, 64)
    mlp = block.mlp
    mlp.dropped = frozenset({1})
    r = mlp.route(x)
    manual = torch.zeros_like(x)
    for t in range(5):
        for s in range(r.topk_indices.shape[1]):
            e = r.topk_indices[t, s].item()
            if e != 1:
                manual[t] += mlp.experts[e](x[t:t + 1])[0] * r.topk_weights[t, s]
    assert max_diff(mlp(x[None])[0], manual) <= 1e-6


def test_toggles_by_layer_index_and_state(flex4):
    model = olmo_lab.load_model(flex4)
    ex = model.experts
    assert ex.names == ["public", "math", "code", "news"]
    ex.disable(2, layers=[0, 2])
    ex.disable("news", layers=1, mode="drop")
    assert ex.state() == {"public": ["on"] * 3, "math": ["on"] * 3, "code": ["opted out", "on", "opted out"],
                          "news": ["on", "dropped", "on"]}
    assert ex.enabled(1) == ["public", "math", "code"]
    assert "code: off in layers 0:opted out, 2:opted out" in ex.summary()
    ex.enable("code")
    assert ex.state()["code"] == ["on"] * 3
    ex.reset()
    assert ex.summary() == "public: on\nmath: on\ncode: on\nnews: on"


@pytest.mark.parametrize("bad,message", [
    (lambda ex: ex.disable("physics"), "unknown expert name 'physics'"),
    (lambda ex: ex.disable(4), "expert index 4 is out of range"),
    (lambda ex: ex.disable(-1), "expert index -1 is out of range"),
    (lambda ex: ex.disable(["public", "math", "code", "news"]), "no expert would be left enabled"),
    (lambda ex: ex.disable(["math", "code", "news", "public"], mode="drop"), "no expert would be left enabled"),
    (lambda ex: ex.disable("math", layers=[7]), "layer 7 is out of range"),
    (lambda ex: ex.disable("math", mode="zero"), "unknown toggle mode 'zero'"),
    (lambda ex: ex.disable([]), "list of experts is empty"),
    (lambda ex: ex.disable(1.5), "expected a name, an index or a list"),
    (lambda ex: ex.enable("physics"), "unknown expert name"),
])
def test_bad_toggles_raise_and_change_nothing(flex4, bad, message):
    model = olmo_lab.load_model(flex4)
    model.experts.disable("math", layers=[1])
    before = model.experts.state()
    ids, _ = _inputs()
    logits = model(ids).logits
    with pytest.raises(olmo_lab.ExpertError, match=message):
        bad(model.experts)
    assert model.experts.state() == before
    assert torch.equal(model(ids).logits, logits)


def test_everything_but_one_expert_off_in_a_context_is_restored_after_an_error(flex4):
    model = olmo_lab.load_model(flex4)
    with pytest.raises(RuntimeError, match="boom"):
        with olmo_lab.experts_off(model, ["math", "code", "news"]):
            assert model.experts.enabled() == ["public"]
            raise RuntimeError("boom")
    assert model.experts.enabled() == ["public", "math", "code", "news"]


def test_a_stale_cache_is_refused_and_generate_recomputes(flex4):
    model = olmo_lab.load_model(flex4)
    ids = torch.tensor([[5, 6, 7, 8]])
    cache = model.new_cache()
    model(ids, cache=cache)
    snapshot = [t.clone() for t in cache.keys]
    model.experts.disable("math")
    with pytest.raises(olmo_lab.StaleCacheError, match="expert toggles changed"):
        model(torch.tensor([[9]]), cache=cache)
    assert cache.length == 4 and all(torch.equal(a, b) for a, b in zip(snapshot, cache.keys))
    model.experts.enable("math")
    model(torch.tensor([[9]]), cache=cache)  # same toggles as when it was built: fine again
    # A stream whose consumer toggles an expert midway continues under the new toggles, from a fresh prefix.
    stream = olmo_lab.generate(model, None, [5, 6, 7], max_new_tokens=8, stream=True, eos_token_id=[])
    first = [next(stream) for _ in range(3)]
    model.experts.disable("math")
    rest = list(stream)
    expected_rest = olmo_lab.generate(model, None, [5, 6, 7] + first, max_new_tokens=5, eos_token_id=[])
    assert rest == expected_rest


def test_dense_model_has_no_experts(tmp_path):
    from oracle import olmo3_config
    model = olmo_lab.load_model(make_checkpoint(olmo3_config(), tmp_path))
    with pytest.raises(olmo_lab.ExpertError, match="dense olmo3 model"):
        model.experts.disable("math")
    with pytest.raises(olmo_lab.ExpertError, match="no experts"):
        olmo_lab.load_model(tmp_path, experts=["public"])


# ---------------------------------------------------------------------------------------- subset loading
@pytest.mark.parametrize("keep", [["public", "code"], [0, 3], ["math"], ["news", 0]])
def test_expert_subset_equals_opting_out_the_rest(flex4, keep):
    full = olmo_lab.load_model(flex4)
    sub = olmo_lab.load_model(flex4, experts=keep)
    kept = full.experts.resolve(keep)
    assert sub.experts.names == [full.experts.names[e] for e in kept]
    assert sub.config.num_experts == len(kept)
    ids, mask = _inputs(seq=15)
    others = [e for e in range(4) if e not in kept]
    with olmo_lab.experts_off(full, others):
        ref = full(ids, attention_mask=mask).logits
    assert max_diff(sub(ids, attention_mask=mask).logits, ref, mask) == 0


def test_expert_subset_errors(flex4):
    with pytest.raises(olmo_lab.ExpertError, match="unknown expert name 'physics'"):
        olmo_lab.load_model(flex4, experts=["public", "physics"])
    with pytest.raises(olmo_lab.ExpertError, match="out of range"):
        olmo_lab.load_model(flex4, experts=[9])
    with pytest.raises(olmo_lab.ExpertError, match="empty"):
        olmo_lab.load_model(flex4, experts=[])


def test_names_for_released_checkpoints_and_user_names(flex4):
    from olmo_lab.checkpoint import default_expert_names
    assert default_expert_names("allenai/Flex-math-2x7B-1T", 2) == ["public", "math"]
    assert default_expert_names("allenai/FlexOlmo-7x7B-1T-RT", 7)[:3] == ["public", "math", "news"]
    assert default_expert_names("someone/else", 4) is None
    model = olmo_lab.load_model(flex4, expert_names=["a", "b", "c", "d"])
    assert model.experts.names == ["a", "b", "c", "d"]
    with pytest.raises(olmo_lab.ExpertError, match="4 experts"):
        olmo_lab.load_model(flex4, expert_names=["a", "b"])
