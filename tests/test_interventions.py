"""Hook points, interventions and patching (issue 18): observing changes nothing, edits do exactly what
they say, patching sweeps agree with one-site-at-a-time runs and with hooks on transformers' own modules,
and a bad edit leaves the model as it was."""

import pytest
import torch

import olmo_lab
from olmo_lab.errors import ExpertError, HookError, InputError, StaleCacheError
from olmo_lab.interventions import (Add, BiasRouter, ForceRouting, MeanAblate, Replace, Scale, Zero, intervene,
                                    mean_activation, run_with)
from olmo_lab.moe import Routing
from olmo_lab.patching import attribution_patch, patch
from olmo_lab.trace import trace
from oracle import flex_config, load_hf, make_checkpoint, olmo3_config

DENSE = dict(model_type="olmo3", vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, sliding_window=4, max_position_embeddings=160)
FLEX = dict(model_type="flex_olmo", vocab_size=128, hidden_size=32, intermediate_size=24, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
            expert_names=["public", "math", "code", "news"], max_position_embeddings=160)


def build(spec, dtype=torch.float32, seed=0, **kw):
    torch.manual_seed(seed)
    return olmo_lab.OlmoModel(olmo_lab.OlmoConfig(**{**spec, **kw})).eval().to(dtype)


def ids(S=12, B=1, seed=1):
    return torch.randint(3, 128, (B, S), generator=torch.Generator().manual_seed(seed))


def idle(model):
    return not model.hooks.active and model._interventions == () and all(
        m._hooks is None for m in model.modules() if hasattr(m, "_hooks"))


# ---------------------------------------------------------------------------------------------- observing
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("spec,extra", [(DENSE, {}), (DENSE, {"num_key_value_heads": 4}), (FLEX, {})])
def test_traced_forward_and_generation_are_bit_identical(spec, extra, dtype):
    model = build(spec, dtype, **extra)
    x = ids(20, B=3)
    mask = torch.ones_like(x)
    mask[1, :5] = 0  # a left-padded row
    plain = model(x, attention_mask=mask).logits
    plain_gen = olmo_lab.generate(model, None, x[:2, 5:].tolist(), max_new_tokens=40, eos_token_id=[])
    with trace(model, attention=True, routing=True, residual=True) as tr:
        traced = model(x, attention_mask=mask).logits
        traced_gen = olmo_lab.generate(model, None, x[:2, 5:].tolist(), max_new_tokens=40, eos_token_id=[])
    assert torch.equal(traced, plain) and traced_gen == plain_gen
    assert tr.attention[0].shape[-1] == 15 + 39 and idle(model)


def test_recorded_attention_equals_the_eager_probabilities_and_slices_equal_the_whole():
    model = build(DENSE)
    x = ids(40, B=2)
    mask = torch.ones_like(x)
    mask[0, :3] = 0
    seen = {}
    with trace(model, layers=[0, 3]) as tr:
        handle = model.hooks.add("model.layers.0.self_attn.hook_pattern", lambda p, ctx: seen.setdefault("p", p))
        out = model(x, attention_mask=mask).logits
        handle.remove()
    assert torch.equal(out, model(x, attention_mask=mask).logits)  # a read-only pattern hook changes nothing
    assert torch.equal(tr.attention[0], seen["p"].float())  # the recorded pattern is what the hook saw
    full = tr.attention[3]
    part = tr.pattern(3, heads=[2, 1], queries=slice(10, 33), keys=slice(5, 30), batch=1)
    assert torch.equal(part, full[1:2, [2, 1], 10:33, 5:30])
    assert bool((tr.attention[0][1, :, ~tr.visible(0)] == 0).all())  # row 1: no padding


@pytest.mark.parametrize("name", ["olmo3-lab", "flexolmo-lab"])
def test_shipped_models_trace_without_changing_a_token(name):
    path = olmo_lab.lab_model(name)
    model, tok = olmo_lab.load_model(path), olmo_lab.load_tokenizer(path)
    prompts = ["The man said that", "In the beginning", "def f(x):", "It was a dark and", "She walked to the",
               "1 + 1 = 2 |- ( ph -> ps )"]
    plain = olmo_lab.generate(model, tok, prompts, max_new_tokens=100)
    with trace(model, attention=True, routing=True):
        traced = olmo_lab.generate(model, tok, prompts, max_new_tokens=100)
    assert traced == plain


# ---------------------------------------------------------------------------------------------- hook points
def test_hook_points_cover_every_named_site_and_suggest_the_nearest():
    model = build(FLEX)
    names = model.hook_points()
    p = "model.layers.2."
    for leaf in ["hook_resid_pre", "self_attn.hook_q", "self_attn.hook_k", "self_attn.hook_v", "self_attn.hook_pattern",
                 "self_attn.hook_z", "self_attn.hook_out", "post_attention_layernorm.hook_out", "hook_resid_mid",
                 "mlp.hook_out", "post_feedforward_layernorm.hook_out", "hook_resid_post", "mlp.gate.hook_out",
                 "mlp.hook_routing", "mlp.experts.3.hook_out"]:
        assert p + leaf in names
    assert len(names) == 3 * (12 + 2 + 4) and model.hook_points("hook_z") == [f"model.layers.{i}.self_attn.hook_z"
                                                                              for i in range(3)]
    with pytest.raises(HookError, match="did you mean 'model.layers.1.self_attn.hook_z'"):
        model.hooks.add("model.layers.1.self_attn.hook_zz", lambda v, c: None)
    with trace(model, attention=False, routing=False, hooks=[p + "self_attn.hook_z", p + "self_attn.hook_k",
                                                             p + "mlp.gate.hook_out"]) as tr:
        model(ids(12, B=2))
    assert tr[p + "self_attn.hook_z"].shape == (2, 12, 4, 8) and tr[p + "self_attn.hook_k"].shape == (2, 2, 12, 8)
    assert tr[p + "mlp.gate.hook_out"].shape == (2, 12, 4) and idle(model)


def test_patching_every_site_with_the_runs_own_values_changes_nothing():
    for spec in (DENSE, FLEX):
        model = build(spec)
        x = ids(14)
        points = [n for n in model.hook_points() if not n.endswith(("hook_routing", "hook_pattern"))
                  and ".experts." not in n]
        with trace(model, attention=False, routing=False, hooks=points) as tr:
            plain = model(x).logits
        same = run_with(model, x, {n: Replace(tr[n]) for n in points}).logits
        assert torch.equal(same, plain) and idle(model)


# ---------------------------------------------------------------------------------------------- interventions
def test_zero_on_an_expert_output_is_drop_and_forcing_the_routers_choice_changes_nothing():
    model = build(FLEX)
    x = ids(16)
    plain = model(x).logits
    zeroed = run_with(model, x, {"model.layers.1.mlp.experts.2.hook_out": Zero()}).logits
    with olmo_lab.experts_off(model, "code", layers=[1], mode="drop"):
        assert torch.equal(zeroed, model(x).logits)
    with trace(model, attention=False) as tr:
        model(x)
    chosen = tr.routing[0].topk_indices
    for pos in (0, 7, 15):
        forced = run_with(model, x, {"model.layers.0.mlp.hook_routing":
                                     ForceRouting(chosen[pos].flip(0).tolist(), positions=[pos])}).logits
        assert torch.equal(forced, plain)
    other = [e for e in range(4) if e not in chosen[7].tolist()]
    moved = run_with(model, x, {"model.layers.0.mlp.hook_routing": ForceRouting(other, positions=[7])}).logits
    assert torch.equal(moved[:, :7], plain[:, :7]) and not torch.equal(moved[:, 7:], plain[:, 7:])  # causal


def test_forced_routing_is_what_the_layer_uses():
    model = build(FLEX)
    x = ids(10)
    with intervene(model, {"model.layers.1.mlp.hook_routing": ForceRouting(["news"], weights=[1.0], positions=[-1])}), \
            trace(model, attention=False) as tr:
        model(x)
    r = tr.routing[1]
    assert r.topk_indices[-1].tolist()[0] == 3 and r.topk_weights[-1].tolist() == [1.0, 0.0]
    assert r.topk_indices.shape == (10, 2) and idle(model)


def test_steering_with_zero_changes_nothing_and_a_direction_changes_generation():
    model = build(DENSE)
    prompt = ids(6)[0].tolist()
    plain = olmo_lab.generate(model, None, prompt, max_new_tokens=20, eos_token_id=[])
    zero = torch.zeros(32)
    with intervene(model, {f"model.layers.{i}.hook_resid_post": Add(zero) for i in range(4)}):
        assert olmo_lab.generate(model, None, prompt, max_new_tokens=20, eos_token_id=[]) == plain
    direction = mean_activation(model, ids(20, B=4, seed=5), "model.layers.1.hook_resid_post") * 8
    steps = []
    with intervene(model, {"model.layers.1.hook_resid_post": Add(direction, positions=[-1]),
                           "model.layers.3.hook_resid_post": lambda v, ctx: steps.append(ctx.positions)}):
        steered = olmo_lab.generate(model, None, prompt, max_new_tokens=20, eos_token_id=[])
    assert steered != plain and len(steps) == 20 and list(steps[1]) == [6]  # every generated token


def test_ablations_scale_and_bias_act_only_where_asked():
    model = build(FLEX)
    x = ids(12)
    z = "model.layers.0.self_attn.hook_z"
    with trace(model, attention=False, routing=False, hooks=[z]) as tr:
        plain = model(x).logits
    seen = {}
    edits = [(z, MeanAblate(torch.ones(8), heads=[1], positions=[3, 4])), (z, lambda v, ctx: seen.setdefault("z", v))]
    run_with(model, x, edits)
    mask = torch.zeros(1, 12, 4, 8, dtype=torch.bool)
    mask[:, 3:5, 1] = True
    assert torch.equal(seen["z"][mask], torch.ones(16)) and torch.equal(seen["z"][~mask], tr[z][~mask])
    assert torch.equal(run_with(model, x, {z: Scale(1.0)}).logits, plain)
    half = run_with(model, x, {z: Scale(0.5, heads=[2])}).logits
    assert not torch.equal(half, plain)
    with intervene(model, {"model.layers.2.mlp.gate.hook_out": BiasRouter({"math": 100.0})}), \
            trace(model, attention=False) as rt:
        model(x)
    assert bool((rt.routing[2].topk_indices[:, 0] == 1).all()) and idle(model)
    with intervene(model, {"model.layers.2.mlp.gate.hook_out": BiasRouter({"news": 100.0, "public": -100.0})}), \
            trace(model, attention=False) as rt:  # keys in any order, each to its own expert
        model(x)
    assert bool((rt.routing[2].topk_indices[:, 0] == 3).all()) and 0 not in rt.routing[2].topk_indices


def test_an_intervention_makes_an_outside_cache_stale_and_generate_recomputes():
    model = build(DENSE)
    x = ids(8)
    cache = model.new_cache()
    model(x, cache=cache)
    with intervene(model, {"model.layers.0.hook_resid_post": Scale(2.0)}):
        with pytest.raises(StaleCacheError, match="interventions"):
            model(ids(1), cache=cache)
        inner = model.new_cache()
        model(x, cache=inner)
    assert cache.length == 8
    with pytest.raises(StaleCacheError):
        model(ids(1), cache=inner)  # built under the intervention, used without it
    model(ids(1), cache=cache)  # the original key is back


# ---------------------------------------------------------------------------------------------- bad input
def _state(model):
    return ({k: v.clone() for k, v in model.state_dict().items()}, model.experts.snapshot()
            if model.config.is_moe else None, model.cache_key)


def _same(model, before):
    weights, toggles, key = before
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert (model.experts.snapshot() if model.config.is_moe else None) == toggles and model.cache_key == key
    assert idle(model)


@pytest.mark.parametrize("edits,error,match", [
    ({"model.layers.0.self_attn.hook_zz": Zero()}, HookError, "did you mean"),
    ({"model.layers.0.hook_resid_pre": Replace(torch.zeros(3))}, HookError, "expected torch.float32"),
    ({"model.layers.0.hook_resid_pre": Replace(torch.zeros(1, 12, 32, dtype=torch.float64))}, HookError, "float64"),
    ({"model.layers.0.hook_resid_pre": Add(torch.zeros(7))}, HookError, "does not broadcast"),
    ({"model.layers.0.self_attn.hook_z": Zero(heads=[4])}, HookError, "heads \\[4\\] are out of range"),
    ({"model.layers.0.self_attn.hook_k": Zero(heads=[2])}, HookError, "2 heads"),
    ({"model.layers.0.hook_resid_pre": Zero(heads=[0])}, HookError, "no head axis"),
    ({"model.layers.0.hook_resid_pre": Zero(positions=[12])}, HookError, "out of range for an input of 12"),
    ({"model.layers.0.mlp.hook_routing": ForceRouting(["sports"])}, ExpertError, "unknown expert"),
    ({"model.layers.0.mlp.hook_routing": ForceRouting([0, 1, 2, 3, 4])}, ExpertError, "out of range"),
    ({"model.layers.0.mlp.hook_routing": ForceRouting(["math", "math"])}, ExpertError, "twice"),
    ({"model.layers.1.mlp.hook_routing": ForceRouting(["math"])}, ExpertError, "opted out"),
    ({"model.layers.0.mlp.hook_routing": Zero()}, HookError, "ForceRouting"),
    ({"model.layers.0.mlp.hook_routing": lambda r, ctx: Routing(r.logits, r.probs, r.topk_indices + 9,
                                                                r.topk_weights)}, HookError, "expert indices"),
    ({"model.layers.0.hook_resid_pre": lambda v, ctx: v[:, :3]}, HookError, "shape"),
    ({"model.layers.0.hook_resid_pre": 3}, HookError, "Intervention or a function"),
])
def test_bad_edits_raise_and_leave_the_model_as_it_was(edits, error, match):
    model = build(FLEX)
    model.experts.disable("math", layers=[1])
    x = ids(12)
    cache = model.new_cache()
    model(x[:, :4], cache=cache)
    before, plain = _state(model), model(x).logits
    with pytest.raises(error, match=match):
        run_with(model, x, edits)
    _same(model, before)
    assert cache.length == 4 and torch.equal(model(x).logits, plain)
    model(x[:, 4:5], cache=cache)  # the cache is still usable


def test_edits_check_their_own_arguments():
    for make, match in [(lambda: Zero(positions=["a"]), "list of ints"), (lambda: Zero(heads=[]), "non-empty"),
                        (lambda: Scale("2"), "number"), (lambda: Add([1.0]), "floating-point tensor"),
                        (lambda: Replace(3), "tensor or a function")]:
        with pytest.raises(HookError, match=match):
            make()


def test_a_metric_that_is_not_a_scalar_is_refused():
    model = build(DENSE)
    before = _state(model)
    with pytest.raises(InputError, match="scalar"):
        patch(model, ids(6), ids(6, seed=2), lambda logits: logits[0, -1], progress=False)
    with pytest.raises(InputError, match="same length"):
        patch(model, ids(6), ids(7), lambda logits: logits[0, -1, 0], progress=False)
    _same(model, before)


# ---------------------------------------------------------------------------------------------- patching
def _metric(logits):
    return logits[0, -1, 5] - logits[0, -1, 9]


@pytest.mark.parametrize("site", ["resid_pre", "heads", "experts"])
def test_batched_sweep_equals_one_site_at_a_time(site):
    model = build(FLEX)
    clean, corrupt = ids(10), ids(10, seed=3)
    batched = patch(model, clean, corrupt, _metric, site=site, progress=False)
    single = patch(model, clean, corrupt, _metric, site=site, batch=1, progress=False)
    assert batched.scores.shape == (3, {"resid_pre": 10, "heads": 4, "experts": 4}[site])
    # Rows are independent; only the matrix kernels' rounding may depend on how many rows they get.
    assert (batched.scores - single.scores).abs().max() <= 1e-5
    dense = build(DENSE)
    if site != "experts":
        d_batched = patch(dense, clean, corrupt, _metric, site=site, progress=False).scores
        assert (d_batched - patch(dense, clean, corrupt, _metric, site=site, batch=1, progress=False).scores
                ).abs().max() <= 1e-5


@pytest.mark.parametrize("site", ["resid_pre", "heads", "experts"])
def test_metric_positions_compute_less_and_give_the_same_grid(site):
    model = build(FLEX)
    clean, corrupt = ids(10), ids(10, seed=3)
    full = patch(model, clean, corrupt, _metric, site=site, progress=False).scores
    for positions in ([-1], [9], [4, -1]):
        part = patch(model, clean, corrupt, _metric, site=site, progress=False, metric_positions=positions).scores
        assert (part - full).abs().max() <= 1e-5  # fewer rows through the vocabulary projection
    seen = []  # the positions each vocabulary projection gets
    original = model.lm_head.forward
    model.lm_head.forward = lambda x: (seen.append(x.shape[1]), original(x))[1]
    try:
        patch(model, clean, corrupt, _metric, site=site, progress=False, metric_positions=[-1])
    finally:
        del model.lm_head.forward
    assert seen[:2] == [10, 10] and set(seen[2:]) == {1}  # the clean and corrupted runs, then last positions only
    assert idle(model)


def test_a_metric_reading_positions_it_did_not_declare_is_refused():
    model = build(DENSE)
    before = _state(model)
    two = lambda logits: logits[0, -1, 5] - logits[0, 3, 9]  # noqa: E731 - reads position 3 too
    with pytest.raises(InputError, match="metric_positions"):
        patch(model, ids(8), ids(8, seed=2), two, progress=False, metric_positions=[-1])
    for bad in ([8], [-9], [], "last", [[1]]):
        with pytest.raises(InputError, match="metric_positions"):
            patch(model, ids(8), ids(8, seed=2), _metric, progress=False, metric_positions=bad)
    _same(model, before)
    grid = patch(model, ids(8), ids(8, seed=2), two, progress=False, metric_positions=[3, -1])
    assert torch.isfinite(grid.scores).all()


def test_patching_the_first_layer_everywhere_gives_the_clean_run_and_the_sweep_agrees_with_a_full_replace():
    model = build(DENSE)
    clean, corrupt = ids(10), ids(10, seed=3)
    name = "model.layers.0.hook_resid_pre"
    points = model.hook_points("hook_resid_pre")
    with trace(model, attention=False, routing=False, hooks=points) as tr:
        clean_logits = model(clean).logits
    assert torch.equal(run_with(model, corrupt, {name: Replace(tr[name])}).logits, clean_logits)
    grid = patch(model, clean, corrupt, _metric, batch=1, progress=False)
    for layer, pos in [(0, 0), (1, 4), (3, 9), (2, 7), (3, 0)]:  # from the layer and position on == all of it
        p = f"model.layers.{layer}.hook_resid_pre"
        full = run_with(model, corrupt, {p: Replace(tr[p], positions=[pos])}).logits
        assert abs(grid.scores[layer, pos] - _metric(full)) <= 1e-5
        if pos == 0:  # nothing before it: the same computation, bit for bit
            assert grid.scores[layer, pos] == _metric(full)
    one = clean.clone()
    one[0, 3] = (clean[0, 3] + 1) % 128  # corrupt one token: in layer 0 only its own position matters
    others = [0, 1, 2, 4, 5, 6, 7, 8, 9]
    g = patch(model, clean, one, _metric, progress=False).normalised()  # clean into corrupted: restores
    assert abs(g[0, 3] - 1) < 1e-5 and g[0, others].abs().max() < 1e-5 and g[:, :3].abs().max() < 1e-5
    g = patch(model, clean, one, _metric, direction="noise", progress=False).normalised()  # corrupted into clean
    assert abs(g[0, 3]) < 1e-5 and (g[0, others] - 1).abs().max() < 1e-5 and (g[:, :3] - 1).abs().max() < 1e-5
    assert "restores" in grid.summary()


def test_residual_sweep_equals_plain_forward_hooks_on_transformers(tmp_path):
    path = make_checkpoint(olmo3_config(sliding_window=4), tmp_path / "o3")
    ours, hf = olmo_lab.load_model(path), load_hf(path, attn="sdpa")
    clean, corrupt = ids(9), ids(9, seed=4)
    grid = patch(ours, clean, corrupt, _metric, progress=False)
    stored = {}
    handles = [layer.register_forward_pre_hook(lambda m, args, kw, i=i: stored.__setitem__(i, kw.get(
        "hidden_states", args[0] if args else None).clone()), with_kwargs=True) for i, layer in enumerate(hf.model.layers)]
    with torch.no_grad():
        hf(clean)
    for h in handles:
        h.remove()
    ref = torch.zeros_like(grid.scores)
    for layer in range(4):
        for pos in range(9):
            def swap(m, args, kw, layer=layer, pos=pos):
                x = (kw.get("hidden_states") if "hidden_states" in kw else args[0]).clone()
                x[:, pos] = stored[layer][:, pos]
                if "hidden_states" in kw:
                    return args, {**kw, "hidden_states": x}
                return (x, *args[1:]), kw
            h = hf.model.layers[layer].register_forward_pre_hook(swap, with_kwargs=True)
            with torch.no_grad():
                ref[layer, pos] = _metric(hf(corrupt).logits)
            h.remove()
    assert (grid.scores - ref).abs().max() <= 1e-5


def test_attribution_patching_gradients_agree_with_finite_differences():
    model = build(DENSE, dtype=torch.float64)
    clean, corrupt = ids(8), ids(8, seed=6)
    attr = attribution_patch(model, clean, corrupt, _metric)
    assert attr.scores.shape == (4, 8) and attr.method == "attribution patching"
    name = "model.layers.2.hook_resid_pre"
    with trace(model, attention=False, routing=False, hooks=[name]) as a, torch.no_grad():
        model(clean)
    with trace(model, attention=False, routing=False, hooks=[name]) as b, torch.no_grad():
        base = _metric(model(corrupt).logits)
    delta = (a[name] - b[name])[:, 5:6]  # the clean-minus-corrupt step at position 5
    eps = 1e-3  # central differences on float64 weights; the RoPE tables stay fp32, which bounds the step

    def nudged(sign):
        step = torch.nn.functional.pad(delta * eps * sign, (0, 0, 5, 8 - 6))
        return _metric(run_with(model, corrupt, {name: lambda v, ctx: v + step}).logits)
    finite = float((nudged(1) - nudged(-1)).detach() / (2 * eps))
    assert abs(finite - float(attr.scores[2, 5] - attr.corrupt)) <= 1e-3 * max(1.0, abs(finite))
    act = patch(model, clean, corrupt, _metric, progress=False)
    corr = torch.corrcoef(torch.stack([attr.scores.flatten(), act.scores.flatten()]))[0, 1]
    assert corr > 0.5 and all(p.requires_grad for p in model.parameters()) and idle(model)
