"""Plots return figures with the expected axes; widget state machines, callbacks and text summaries."""

import matplotlib
import pytest
import torch

import olmo_lab
from olmo_lab import plots
from olmo_lab.errors import ExpertError, InputError
from olmo_lab.lens import expert_usage
from olmo_lab.trace import trace
from olmo_lab.widgets import (VIEW, AttentionExplorer, AttentionExplorerState, ExpertSwitchboard, PatchingExplorer,
                              PatchingExplorerState, SwitchboardState)
from oracle import char_tokenizer, flex_config, make_checkpoint, olmo3_config

matplotlib.use("Agg")


@pytest.fixture(scope="module")
def flex(tmp_path_factory):
    d = make_checkpoint(flex_config(3, 2, num_hidden_layers=2), tmp_path_factory.mktemp("fx"))
    char_tokenizer(d)
    model = olmo_lab.load_model(d, expert_names=["public", "math", "code"])
    return model, olmo_lab.load_tokenizer(d)


@pytest.fixture(scope="module")
def olmo3(tmp_path_factory):
    d = make_checkpoint(olmo3_config(sliding_window=4), tmp_path_factory.mktemp("o3"))
    char_tokenizer(d)
    return olmo_lab.load_model(d), olmo_lab.load_tokenizer(d)


def test_attention_plots(olmo3):
    model, tok = olmo3
    with trace(model, tokenizer=tok) as tr:
        model(torch.tensor([tok.encode("abcabcab")]))
    fig = plots.plot_attention(tr, layer=0, head=1)
    ax = fig.axes[0]
    assert ax.get_xlabel() == "key" and ax.get_ylabel() == "query"
    assert [t.get_text() for t in ax.get_xticklabels()] == list("abcabcab")
    assert "sliding window 4" in ax.get_title() and ax.get_legend() is not None
    full = plots.plot_attention(tr, layer=3, head=0)
    assert "full attention" in full.axes[0].get_title() and full.axes[0].get_legend() is None
    grid = plots.attention_grid(tr, 0)
    assert len([a for a in grid.axes if a.get_title()]) == 4 and "kv 1" in grid.axes[3].get_title()
    text = plots.attention_summary(tr.attention[0][0, 1], tr.tokens)
    assert len(text.splitlines()) == 6 and "->" in text


def test_routing_plots_and_summaries(flex):
    model, tok = flex
    with trace(model, attention=False, tokenizer=tok) as tr:
        model(torch.tensor([tok.encode("x = 1 + 2")]))
    fig = plots.routing_heatmap(tr.routing, model.experts.names)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["layer 0", "layer 1"]
    assert len(ax.get_yticklabels()) == 9
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["public", "math", "code"]
    summary = plots.routing_summary(tr.routing, model.experts.names)
    counts = [int(x.split()[-1]) for x in summary.splitlines()[0].split(": ")[1].split(", ")]
    assert sum(counts) == 9
    m = plots.coactivation(tr.routing, 3)
    assert m.shape == (3, 3) and m.diagonal().sum() == 2 * 9 * 2  # top-2, 9 tokens, 2 layers
    assert torch.equal(m, m.T)
    assert len(plots.coactivation_matrix(tr.routing, model.experts.names).axes[0].get_xticklabels()) == 3
    usage = expert_usage(model, tok, {"maths": ["1 + 1 = 2"], "prose": ["hello there"]})
    bars = plots.expert_usage_bars(usage, model.experts.names)
    assert [t.get_text() for t in bars.axes[0].get_xticklabels()] == ["maths", "prose"]
    assert len(bars.axes[0].patches) == 6


def test_toggle_plots(flex):
    model, tok = flex
    ids = torch.tensor([tok.encode("abc")])
    before = model(ids).logits[0, -1].softmax(-1)
    with olmo_lab.experts_off(model, ["math"]):
        after = model(ids).logits[0, -1].softmax(-1)
    labels = [str(i) for i in range(128)]
    fig = plots.next_token_comparison(before, after, labels, top=5)
    assert "KL" in fig.axes[0].get_title() and len(fig.axes[0].patches) == 10
    assert plots.kl_divergence(before, before) == 0 and plots.kl_divergence(before, after) > 0
    assert plots.distribution_summary(before, after, labels).startswith("KL = ")
    fig = plots.colored_generation(["def", " f", "(x)"], [2, 2, 0], model.experts.names)
    assert [t.get_text() for t in fig.texts if t.get_text() in ("def", " f", "(x)")] == ["def", " f", "(x)"]
    assert plots.colored_generation_summary(["def", " f", "(x)"], [2, 2, 0], ["public", "math", "code"]) == \
        "[code]def f[public](x)"


def test_switchboard_state_transitions(flex):
    model, tok = flex
    state = SwitchboardState(model, tok, prompt="", max_new_tokens=6)
    assert state.update().message == "Enter a prompt first."
    state.prompt = "ab"
    view = state.update()
    assert not view.message and view.baseline == view.toggled and view.changed == [] and view.kl == 0
    for name in ("public", "math", "code"):
        state.set_expert(name, False)
    assert "At least one expert must stay on" in state.update().message
    state.set_expert("code", True)
    view = state.update()
    direct = olmo_lab.generate(model, tok, tok.encode("ab"), max_new_tokens=6)
    with olmo_lab.experts_off(model, ["public", "math"]):
        expected = olmo_lab.generate(model, tok, tok.encode("ab"), max_new_tokens=6)
    assert view.baseline == direct and view.toggled == expected
    assert view.changed == [i for i in range(6) if direct[i] != expected[i]]
    assert view.kl > 0 and set(view.routing) == {0, 1}
    assert bool((view.routing[0].topk_indices == 2).all())  # only 'code' is on
    assert model.experts.summary() == "public: on\nmath: on\ncode: on"  # the model is left untouched
    text = state.summary()
    assert text.splitlines()[0] == "experts off (opt_out): public, math" and "KL" in text
    with pytest.raises(ExpertError, match="unknown expert name 'physics'"):
        state.set_expert("physics", False)


def test_switchboard_widget_callbacks(flex, capsys):
    model, tok = flex
    board = ExpertSwitchboard(model, tok, prompt="ab", max_new_tokens=5)
    board.button.click()
    first = capsys.readouterr().out
    assert first.startswith("experts off (opt_out): none")
    board.checkboxes["math"].value = False  # a toggle refreshes the view by itself
    out = capsys.readouterr().out
    assert out.startswith("experts off (opt_out): math") and "olmo-lab-summary" in board.text.value
    board.mode.value = "drop"
    assert capsys.readouterr().out.startswith("experts off (drop): math")
    board.prompt.value = "   "
    board.button.click()
    assert capsys.readouterr().out.strip() == "Enter a prompt first."
    board.prompt.value = "ab"
    board.button.click()  # and it keeps working afterwards
    assert capsys.readouterr().out.startswith("experts off (drop): math")


def test_attention_explorer(olmo3, capsys):
    model, tok = olmo3
    state = AttentionExplorerState(model, tok, "hello world")
    state.select(layer=0, head=2, query=10)
    fig, text = state.figure(), state.summary()
    assert "sliding window 4" in fig.axes[0].get_title()
    assert "query 10 'd' sees keys 7..10" in text
    with pytest.raises(InputError, match=r"head: 9 is not an index in range \(0..3\)"):
        state.select(head=9)
    with pytest.raises(InputError, match="non-empty prompt"):
        AttentionExplorerState(model, tok, "")
    ex = AttentionExplorer(model, tok, "hello world")
    ex.layer.value = 3
    assert "layer 3 head 0" in capsys.readouterr().out and "sees keys 0..10" in ex.text.value
    ex.head.value = 1
    assert "layer 3 head 1" in capsys.readouterr().out


def test_attention_explorer_on_a_long_prompt_shows_a_view_that_follows_the_query(olmo3):
    model, tok = olmo3
    prompt = "".join(chr(97 + (i * 7) % 26) for i in range(100))  # 100 tokens, more than VIEW
    state = AttentionExplorerState(model, tok, prompt)
    n = len(state.tokens)
    whole = state.probs()
    for layer, query in [(3, 70), (0, 70), (3, 5), (3, n - 1)]:
        state.select(layer=layer, head=1, query=query)
        (q0, q1), (k0, k1) = state.view()
        assert q1 - q0 == VIEW and q0 <= query < q1 and k1 == q1 and k1 - k0 <= VIEW + VIEW // 2
        assert k0 == (max(0, q0 - 3) if layer == 0 else q0)  # sliding window 4: the band of these queries
        fig = state.figure()
        ax = fig.axes[0]
        shown = torch.tensor(ax.images[0].get_array().data)
        assert torch.equal(shown, state.trace.pattern(layer, heads=1)[0, 0, q0:q1, k0:k1])  # exactly the pattern
        assert len(ax.get_xticklabels()) == k1 - k0 and len(ax.get_yticklabels()) == VIEW
        assert [p.get_y() + 0.5 for p in ax.patches] == [query - q0]  # the chosen query's row, outlined
        assert f"shown: queries {q0}..{q1 - 1}" in state.summary()
        matplotlib.pyplot.close(fig)
    assert whole.shape == (n, n)


def test_patching_explorer(flex, capsys):
    model, tok = flex
    state = PatchingExplorerState(model, tok, "abcdefgh", "abcXefgh", "a", "b")
    assert state.sites == ["resid_pre", "heads", "experts"] and state.layer == 1
    text = state.summary()
    assert text.startswith("resid_pre, layer 1: metric clean") and "3 'd'" in text  # the changed position
    state.select(site="experts", layer=0)
    assert state.summary().startswith("experts, layer 0:") and len(state.figure().axes[0].get_xticklabels()) == 3
    before = (state.site, state.layer)
    for bad in ({"site": "neurons"}, {"layer": 2}, {"layer": 0.5}):
        with pytest.raises(InputError):
            state.select(**bad)
        assert (state.site, state.layer) == before  # a bad selection changes nothing
    with pytest.raises(InputError, match="same, non-zero number of tokens"):
        PatchingExplorerState(model, tok, "abc", "abcd", "a", "b")
    ex = PatchingExplorer(model, tok, "abcdefgh", "abcXefgh", "a", "b")
    ex.site.value = "heads"
    assert capsys.readouterr().out.startswith("heads, layer 1:") and "head 0" in ex.text.value
