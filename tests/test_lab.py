"""The lab models: a miniature of the FlexOlmo build pipeline, the training loop, and the shipped checkpoints.

The miniature runs the same library functions as `python -m lab.rebuild` on tiny built-in text and a
tiny model (and one test runs `lab.rebuild.build` itself, end to end, on the shipped text samples), so
the recipe's guarantees are checked in seconds: upcycle -> independent expert training -> merge (shared
weights identical, public expert unchanged) -> opt-out equals a merge without the expert; router rows
from domain embeddings; a resumed training run equals an uninterrupted one.
"""

import dataclasses
import json
import os
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

import olmo_lab
from olmo_lab.config import OlmoConfig
from olmo_lab.errors import CheckpointError
from olmo_lab.flexolmo import (HashedNgramEmbedder, ResidualStats, gaussian_router_rows, merge, residual_stats,
                               router_rows, set_router_rows, shared_state, train_expert, tune_router, upcycle)
from olmo_lab.heads import best_head, induction_scores, previous_token_scores, repeated_random_tokens
from olmo_lab.lab import LAB_MODELS, LAB_MODELS_DIR, lab_model
from olmo_lab.model import OlmoModel
from olmo_lab.train import (TokenStream, TrainConfig, bits_per_byte, init_weights, token_byte_lengths, train,
                            train_bpe_tokenizer)

from oracle import load_hf, max_diff

TEXTS = {
    "public": ["The old house stood at the end of the lane, and the children walked past it every morning on "
               "their way to school. Nobody had lived there for years. ", "She opened the letter slowly and read "
               "it twice before she put it down on the kitchen table and looked out of the window. "],
    "code": ["def add(a, b):\n    return a + b\n\n\nclass Stack:\n    def __init__(self):\n        self.items = []\n"
             "\n    def push(self, x):\n        self.items.append(x)\n", "for i in range(10):\n    if i % 2 == 0:\n"
             "        print(i)\n    else:\n        continue\n"],
    "math": ["|- ( ( ph -> ps ) -> ( ( ps -> ch ) -> ( ph -> ch ) ) ) syllogism $p |- ( A e. RR -> ( A + 0 ) = A ) ",
             "|- ( x = y -> ( ph <-> ps ) ) $p |- ( ( A e. CC /\\ B e. CC ) -> ( A x. B ) = ( B x. A ) ) "],
}
CLOSED = ["code", "math"]


def tiny_dense(vocab: int) -> OlmoModel:
    config = OlmoConfig(model_type="olmo3", vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=32, sliding_window=16,
                        layer_types=["sliding_attention", "full_attention"])
    model = OlmoModel(config)
    init_weights(model, seed=0)
    return model


@pytest.fixture(scope="module")
def pipeline():
    """Tokenizer, streams, a briefly trained public model and two independently trained owners."""
    torch.manual_seed(0)
    tok = train_bpe_tokenizer([t * 3 for texts in TEXTS.values() for t in texts], vocab_size=300)
    streams = {d: TokenStream.from_texts(tok, texts * 4) for d, texts in TEXTS.items()}
    public = tiny_dense(len(tok))
    train(public, streams["public"], TrainConfig(steps=4, lr=3e-3, warmup=1, batch_size=4, seq_len=16, progress=False))
    embedder = HashedNgramEmbedder(32, seed=0)
    embeddings = torch.stack([embedder.domain(TEXTS[d]) for d in ["public", *CLOSED]])  # (3, H)
    stats = residual_stats(public, streams["public"].windows(16, 4)[:, :-1])
    norms, means = stats.norm, stats.mean
    owners, rows = {}, {}
    for name in CLOSED:  # as lab.rebuild's first round does: Gaussian rows from the owner's own mean, kept fixed
        own = residual_stats(public, streams[name].windows(16, 4)[:, :-1])
        rows[name] = gaussian_router_rows(stats, [own.mean], closed_bias=-2.0)  # (L, 2, H)
        owner = upcycle(public, name, rows[name], train_router=False)
        train_expert(owner, streams[name], TrainConfig(steps=3, lr=1e-2, warmup=1, weight_decay=0.0, batch_size=4,
                                                       seq_len=16, progress=False))
        owners[name] = owner
    return dict(tok=tok, streams=streams, public=public, owners=owners, rows=rows, embeddings=embeddings,
                norms=norms, means=means, stats=stats)


def test_tokenizer_has_dolma2_style_specials_and_round_trips(pipeline, tmp_path):
    tok = pipeline["tok"]
    assert (tok.eos_token, tok.pad_token) == ("<|endoftext|>", "<|pad|>")
    assert (tok.eos_token_id, tok.pad_token_id) == (len(tok) - 2, len(tok) - 1)
    text = "def f(x):\n    return x  # ünïcode\n"
    assert tok.decode(tok.encode(text)) == text
    tok.save(tmp_path)
    assert olmo_lab.load_tokenizer(tmp_path).encode(text) == tok.encode(text)
    lengths = token_byte_lengths(tok)
    assert int(lengths[tok.encode(text)].sum()) == len(text.encode("utf-8"))


def test_router_rows_come_from_domain_embeddings(pipeline):
    emb = pipeline["embeddings"]
    assert torch.equal(emb, torch.stack([HashedNgramEmbedder(32, seed=0).domain(TEXTS[d]) for d in TEXTS]))  # fixed
    assert not torch.allclose(emb[1], emb[2])  # code and math differ
    norms, means = pipeline["norms"], pipeline["means"]
    fresh = upcycle(pipeline["public"], "code", router_rows(emb[[0, 1]], norms))
    for i, block in enumerate(fresh.model.layers):
        torch.testing.assert_close(block.mlp.gate.weight, emb[[0, 1]] / norms[i], rtol=0, atol=0)
        assert block.mlp.top_k == 2 and block.mlp.num_experts == 2
    # The public margin raises the public row's logit on the mean residual by exactly `margin`.
    rows = router_rows(emb[[0, 1]], norms, means, public_margin=2.0)
    plain = router_rows(emb[[0, 1]], norms)
    torch.testing.assert_close(((rows - plain)[:, 0] * means).sum(-1), torch.full((2,), 2.0))
    assert torch.equal(rows[:, 1], plain[:, 1])


def test_residual_stats_are_the_feed_forward_inputs_moments(pipeline):
    public, ids = pipeline["public"], pipeline["streams"]["public"].windows(16, 5)[:, :-1]
    stats = residual_stats(public, ids, batch_size=2)  # batches of 2 windows: the sums must add up
    inputs = {}  # the feed-forward inputs, caught independently of olmo_lab.trace
    handles = [block.mlp.register_forward_pre_hook(lambda m, args, i=i: inputs.__setitem__(i, args[0]))
               for i, block in enumerate(public.model.layers)]
    with torch.no_grad():
        public(ids)
    for handle in handles:
        handle.remove()
    for layer in range(public.config.num_hidden_layers):
        h = inputs[layer].reshape(-1, public.config.hidden_size).double()  # (N*S, H)
        torch.testing.assert_close(stats.mean[layer], h.mean(0).float(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(stats.covariance[layer], torch.cov(h.T, correction=0).float(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(stats.norm[layer], h.norm(dim=-1).mean().float(), rtol=1e-5, atol=1e-5)


def gaussian_stats(L=2, H=8, seed=0):
    """Public ResidualStats with a large common mean component, like a real residual stream."""
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(L, H, generator=g) + 4.0
    a = torch.randn(L, H, H, generator=g) / H ** 0.5
    cov = a @ a.transpose(1, 2) + 0.1 * torch.eye(H)
    return ResidualStats(mean.norm(dim=-1), mean, cov), g


def test_gaussian_router_rows_are_the_bayes_classifier():
    stats, g = gaussian_stats()
    mus = [stats.mean + torch.randn(stats.mean.shape, generator=g) for _ in range(3)]
    rows = gaussian_router_rows(stats, mus, shrinkage=0.0)  # (L, 4, H)
    assert rows.shape == (2, 4, 8)
    # On any h with h . m / |m|^2 = 1 the logits are exactly the linear discriminants of Bayes' rule.
    allm = torch.stack([stats.mean, *mus], dim=1)  # (L, E, H)
    for layer in range(2):
        m = stats.mean[layer]
        h = torch.randn(50, 8, generator=g)
        h = h - (h @ m)[:, None] * m / (m @ m) + m  # so that h . m / |m|^2 = 1
        inv = torch.linalg.inv(stats.covariance[layer].double())
        mu = allm[layer].double()
        expected = h.double() @ inv @ mu.T - 0.5 * ((mu @ inv) * mu).sum(-1)
        torch.testing.assert_close((h @ rows[layer].T).double(), expected, rtol=1e-4, atol=1e-4)
    # The negative bias lowers every closed logit by exactly that much on such h; the public one stays.
    biased = gaussian_router_rows(stats, mus, shrinkage=0.0, closed_bias=-2.0)
    shift = h @ (biased[1] - rows[1]).T  # (50, E), last layer's h
    torch.testing.assert_close(shift, torch.tensor([0.0, -2.0, -2.0, -2.0]).expand(50, 4), rtol=0, atol=1e-4)
    # Each row needs only its own domain: owners computing theirs alone get the merged rows.
    for i, mu in enumerate(mus, start=1):
        alone = gaussian_router_rows(stats, [mu], shrinkage=0.0)
        torch.testing.assert_close(alone[:, 0], rows[:, 0], rtol=0, atol=0)
        torch.testing.assert_close(alone[:, 1], rows[:, i], rtol=1e-6, atol=1e-6)


def test_gaussian_router_rows_route_samples_to_their_domain():
    stats, g = gaussian_stats(L=1, H=16, seed=1)
    mus = [stats.mean + 1.5 * torch.randn(stats.mean.shape, generator=g) for _ in range(3)]
    rows = gaussian_router_rows(stats, mus)[0]  # (4, H), default shrinkage
    chol = torch.linalg.cholesky(stats.covariance[0])
    correct = []
    for e, mu in enumerate([stats.mean, *mus]):
        h = mu[0] + torch.randn(2000, 16, generator=g) @ chol.T  # samples of domain e
        correct.append((torch.softmax(h @ rows.T, -1).argmax(-1) == e).float().mean())
    assert min(correct) > 0.9, correct


def test_public_negatives_need_a_trainable_router(pipeline):
    owner = upcycle(pipeline["public"], "code", pipeline["rows"]["code"], train_router=False)
    with pytest.raises(ValueError, match="router is frozen"):
        train_expert(owner, pipeline["streams"]["code"], TrainConfig(steps=1, weight_decay=0.0, progress=False),
                     public_negatives=pipeline["streams"]["public"])


def test_a_trained_router_row_moves_but_the_public_row_does_not(pipeline):
    """The paper's variant: r_i trains with the expert (here also on public negatives); r_pub stays frozen."""
    emb, norms, means = pipeline["embeddings"], pipeline["norms"], pipeline["means"]
    rows = router_rows(emb[[0, 1]], norms, means, public_margin=2.0)
    owner = upcycle(pipeline["public"], "code", rows)
    train_expert(owner, pipeline["streams"]["code"], TrainConfig(steps=3, lr=1e-2, warmup=1, weight_decay=0.0,
                                                                 batch_size=4, seq_len=16, progress=False),
                 public_negatives=pipeline["streams"]["public"], negative_batch_size=2)
    for i, block in enumerate(owner.model.layers):
        assert torch.equal(block.mlp.gate.weight[0], rows[i, 0])  # r_pub frozen
        assert not torch.equal(block.mlp.gate.weight[1], rows[i, 1])  # r_i trained
    shared = shared_state(pipeline["public"])
    assert all(torch.equal(v, shared[k]) for k, v in shared_state(owner).items())  # negatives touch no shared weight


def test_upcycled_model_starts_equal_to_the_public_model(pipeline):
    public, ids = pipeline["public"], pipeline["streams"]["code"].windows(16, 2)[:, :-1]
    owner = upcycle(public, "code", pipeline["rows"]["code"])
    assert max_diff(owner(ids).logits, public(ids).logits) < 1e-5  # both experts are the public FFN


def test_owner_training_leaves_everything_public_unchanged(pipeline):
    public = pipeline["public"]
    anchor = public.state_dict()
    for name, owner in pipeline["owners"].items():
        sd = owner.state_dict()
        for k, v in shared_state(owner).items():
            assert torch.equal(v, anchor[k]), k
        for i in range(public.config.num_hidden_layers):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                assert torch.equal(sd[f"model.layers.{i}.mlp.experts.0.{proj}.weight"],
                                   anchor[f"model.layers.{i}.mlp.{proj}.weight"])
                assert not torch.equal(sd[f"model.layers.{i}.mlp.experts.1.{proj}.weight"],
                                       anchor[f"model.layers.{i}.mlp.{proj}.weight"])  # the expert did train
            assert torch.equal(sd[f"model.layers.{i}.mlp.gate.weight"], pipeline["rows"][name][i])  # router fixed


def test_rows_re_measured_on_the_owners_own_model(pipeline):
    """lab.rebuild's later rounds: the owner's mean is measured on its own 2-expert model (its trained expert
    changes the layers above the first), the rows rebuilt from it are written into the router, the public row
    stays the anchor's, so the owner still merges; a wrong shape is refused and changes nothing."""
    public, stats, streams = pipeline["public"], pipeline["stats"], pipeline["streams"]
    owner = upcycle(public, "code", pipeline["rows"]["code"], train_router=False)
    owner.load_state_dict(pipeline["owners"]["code"].state_dict())
    windows = streams["code"].windows(16, 4)[:, :-1]
    with torch.no_grad():
        on_public, on_own = residual_stats(public, windows), residual_stats(owner, windows)
    assert torch.equal(on_own.mean[0], on_public.mean[0])  # the first layer's input comes before any expert
    assert not torch.allclose(on_own.mean[1], on_public.mean[1])  # above it the trained expert has acted
    rows = gaussian_router_rows(stats, [on_own.mean], closed_bias=-2.0)  # (L, 2, H)
    set_router_rows(owner, rows)
    for i, block in enumerate(owner.model.layers):
        assert torch.equal(block.mlp.gate.weight, rows[i])
        assert torch.equal(block.mlp.gate.weight[0], pipeline["rows"]["code"][i, 0])  # r_pub unchanged
    merge(public, [owner, pipeline["owners"]["math"]], CLOSED)  # still coordinated with the other owner
    with pytest.raises(ValueError, match=r"shape \(2, 3, 32\).*\(2, 2, 32\)"):
        set_router_rows(owner, torch.zeros(2, 3, 32))
    assert torch.equal(owner.model.layers[0].mlp.gate.weight, rows[0])


def test_merge_stacks_experts_and_checks_coordination(pipeline):
    public, owners = pipeline["public"], pipeline["owners"]
    merged = merge(public, [owners[n] for n in CLOSED], CLOSED)
    assert merged.config.expert_names == ["public", *CLOSED]
    assert merged.config.num_experts_per_tok == 3
    sd = merged.state_dict()
    for k, v in shared_state(public).items():
        assert torch.equal(sd[k], v)
    for j, name in enumerate(CLOSED, start=1):
        osd = owners[name].state_dict()
        assert torch.equal(sd["model.layers.1.mlp.experts.%d.up_proj.weight" % j], osd["model.layers.1.mlp.experts.1.up_proj.weight"])
        assert torch.equal(sd["model.layers.0.mlp.gate.weight"][j], osd["model.layers.0.mlp.gate.weight"][1])
    assert torch.equal(sd["model.layers.0.mlp.experts.0.down_proj.weight"], public.state_dict()["model.layers.0.mlp.down_proj.weight"])

    tampered = upcycle(public, "math", pipeline["rows"]["math"])
    with torch.no_grad():
        tampered.model.layers[0].self_attn.q_proj.weight.add_(1e-3)
    with pytest.raises(ValueError, match="shared weight"):
        merge(public, [owners["code"], tampered], CLOSED)


@pytest.mark.parametrize("top_k", [3, 2])
@pytest.mark.parametrize("j", CLOSED)
def test_opt_out_equals_a_merge_without_the_expert(pipeline, j, top_k):
    public, owners = pipeline["public"], pipeline["owners"]
    merged = merge(public, [owners[n] for n in CLOSED], CLOSED, top_k=top_k)
    rest = [n for n in CLOSED if n != j]
    without = merge(public, [owners[n] for n in rest], rest, top_k=min(top_k, len(rest) + 1))
    ids = torch.cat([pipeline["streams"][d].windows(16, 2)[:, :-1] for d in TEXTS])
    with torch.no_grad(), olmo_lab.experts_off(merged, [j]):
        diff = max_diff(merged(ids).logits, without(ids).logits)
    assert diff == 0  # exact, as FlexOlmo promises


def test_router_tuning_trains_only_router_rows(pipeline):
    public, owners = pipeline["public"], pipeline["owners"]
    merged = merge(public, [owners[n] for n in CLOSED], CLOSED)
    before = {k: v.clone() for k, v in merged.state_dict().items()}
    tune_router(merged, pipeline["streams"]["code"], TrainConfig(steps=2, lr=1e-2, warmup=1, weight_decay=0.0,
                                                                 batch_size=2, seq_len=16, progress=False))
    for k, v in merged.state_dict().items():
        assert torch.equal(v, before[k]) != (".mlp.gate." in k), k
    assert all(p.requires_grad for p in merged.parameters())  # flags restored


def test_train_expert_refuses_weight_decay(pipeline):
    owner = upcycle(pipeline["public"], "code", pipeline["rows"]["code"])
    with pytest.raises(ValueError, match="weight_decay"):
        train_expert(owner, pipeline["streams"]["code"], TrainConfig(steps=1, weight_decay=0.1, progress=False))


def test_resumed_training_equals_an_uninterrupted_run(pipeline, tmp_path):
    stream, vocab = pipeline["streams"]["public"], len(pipeline["tok"])
    config = TrainConfig(steps=6, lr=3e-3, warmup=2, batch_size=4, seq_len=16, checkpoint_every=3, progress=False,
                         eval_every=3)
    straight = tiny_dense(vocab)
    full = train(straight, stream, config, eval_data=stream)

    class Interrupt(Exception):
        pass

    def stop_at_4(model, step):
        if step == 4:
            raise Interrupt
        batch = stream.batch(step, config.batch_size, config.seq_len, config.seed)
        loss = olmo_lab.train.lm_loss(model, batch)
        loss.backward()
        return loss.item()

    with pytest.raises(Interrupt):
        train(tiny_dense(vocab), stream, config, eval_data=stream, checkpoint_dir=tmp_path, step_fn=stop_at_4)
    resumed_model = OlmoModel(straight.config)  # arbitrary weights: the checkpoint overrides them
    resumed = train(resumed_model, stream, config, eval_data=stream, checkpoint_dir=tmp_path)
    for (k, a), b in zip(straight.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(a, b), k
    assert resumed.train_loss == full.train_loss and resumed.eval_loss == full.eval_loss
    raw = (tmp_path / olmo_lab.train.STATE_FILE).read_bytes()  # safetensors: an 8-byte length, then a JSON header
    assert raw[8:9] == b"{" and not raw.startswith(b"PK") and not raw.startswith(b"\x80")  # no zip, no pickle


def test_training_stops_once_the_recent_loss_is_below_the_threshold(pipeline, tmp_path):
    stream, vocab = pipeline["streams"]["public"], len(pipeline["tok"])
    base = dict(lr=3e-3, warmup=2, min_lr_ratio=1.0, batch_size=4, seq_len=16, progress=False)  # lr constant after warm-up
    full = train(tiny_dense(vocab), stream, TrainConfig(steps=60, **base))
    window = olmo_lab.train.STOP_WINDOW
    threshold = sum(full.train_loss[25 - window:25]) / window + 1e-6  # reached at step 25 at the latest
    means = [sum(full.train_loss[d - window:d]) / window for d in range(window, 61)]
    expected = window + next(i for i, m in enumerate(means) if m < threshold)  # the first step whose mean is below
    stopped_model = tiny_dense(vocab)
    stopped = train(stopped_model, stream, TrainConfig(steps=60, stop_below=threshold, **base), eval_data=stream,
                    checkpoint_dir=tmp_path)
    assert stopped.steps == expected < 60 and stopped.train_loss == full.train_loss[:expected]
    assert [s for s, _ in stopped.eval_loss] == [expected]  # evaluated where it stopped
    same = tiny_dense(vocab)  # a run configured to end there has the same weights (constant lr)
    train(same, stream, TrainConfig(steps=expected, **base))
    assert all(torch.equal(a, b) for a, b in zip(same.state_dict().values(), stopped_model.state_dict().values()))
    again = tiny_dense(vocab)  # resuming a run that stopped loads it and trains no further
    resumed = train(again, stream, TrainConfig(steps=60, stop_below=threshold, **base), checkpoint_dir=tmp_path)
    assert resumed.train_loss == stopped.train_loss
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), stopped_model.state_dict().values()))


def test_training_stops_when_the_probe_says_so(pipeline, tmp_path):
    stream, vocab = pipeline["streams"]["public"], len(pipeline["tok"])
    config = TrainConfig(steps=30, lr=3e-3, warmup=2, min_lr_ratio=1.0, batch_size=4, seq_len=16, progress=False)
    full = train(tiny_dense(vocab), stream, config)
    seen = []

    def probe(model, step):  # sees the model after each step; "found" at step 7
        seen.append((step, model.training))
        return step == 7

    stopped_model = tiny_dense(vocab)
    stopped = train(stopped_model, stream, config, eval_data=stream, checkpoint_dir=tmp_path, stop_when=probe)
    assert seen == [(s, True) for s in range(1, 8)]
    assert stopped.steps == 7 and stopped.train_loss == full.train_loss[:7]
    assert [s for s, _ in stopped.eval_loss] == [7]  # evaluated where it stopped
    again = tiny_dense(vocab)  # resuming a run that stopped loads it and trains no further
    resumed = train(again, stream, config, checkpoint_dir=tmp_path, stop_when=lambda model, step: False)
    assert resumed.train_loss == stopped.train_loss
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), stopped_model.state_dict().values()))


def test_resume_refuses_a_checkpoint_of_another_run(pipeline, tmp_path):
    stream = pipeline["streams"]["public"]
    config = TrainConfig(steps=2, lr=3e-3, warmup=1, batch_size=2, seq_len=16, progress=False)
    train(tiny_dense(len(pipeline["tok"])), stream, config, checkpoint_dir=tmp_path)
    other = tiny_dense(len(pipeline["tok"]))
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match=r"different training run \(lr: 0.003 there, 0.001 now\)"):
        train(other, stream, TrainConfig(steps=2, lr=1e-3, warmup=1, batch_size=2, seq_len=16, progress=False),
              checkpoint_dir=tmp_path)
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())  # the model is left as it was
    # Bookkeeping settings may change between a run and its resume (which then has nothing left to do).
    resumed = train(other, stream, TrainConfig(steps=2, lr=3e-3, warmup=1, batch_size=2, seq_len=16, progress=False,
                                               eval_every=1), checkpoint_dir=tmp_path)
    assert len(resumed.train_loss) == 2  # the history came from the file
    # A different set of trainable parameters is another run too, and an old pickle is never loaded.
    for p in other.model.embed_tokens.parameters():
        p.requires_grad = False
    with pytest.raises(ValueError, match="set of trainable parameters differs"):
        train(other, stream, config, checkpoint_dir=tmp_path)
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "train_state.pt").write_bytes(b"\x80\x04pickle")
    with pytest.raises(ValueError, match="never loaded"):
        train(tiny_dense(len(pipeline["tok"])), stream, config, checkpoint_dir=tmp_path / "old")


def test_a_state_from_before_a_setting_existed_resumes_when_the_setting_is_at_its_default():
    config = asdict(TrainConfig(steps=2))
    older = {k: v for k, v in config.items() if k != "stop_below"}  # written before stop_below existed
    olmo_lab.train._check_same_run("state", {"config": older, "trainable": ["w"]}, config, ["w"])
    with pytest.raises(ValueError, match=r"stop_below: 0.0 there, 1.5 now"):
        olmo_lab.train._check_same_run("state", {"config": older, "trainable": ["w"]},
                                       asdict(TrainConfig(steps=2, stop_below=1.5)), ["w"])


def test_schedule_warms_up_then_decays():
    c = TrainConfig(steps=100, lr=1.0, warmup=10, min_lr_ratio=0.1)
    assert c.lr_at(0) == pytest.approx(0.1) and c.lr_at(9) == pytest.approx(1.0)
    assert c.lr_at(10) == pytest.approx(1.0) and c.lr_at(99) == pytest.approx(0.1, abs=1e-3)
    assert all(c.lr_at(s) >= c.lr_at(s + 1) for s in range(10, 99))


def test_head_scores_find_planted_heads(monkeypatch):
    """Attention maps with a planted previous-token head (layer 1, head 2) and induction head (layer 0,
    head 3) among uniform causal heads: each score finds its head with score 1."""
    L, nh, length = 2, 4, 6
    S = 2 * length
    causal = torch.tril(torch.ones(S, S))
    uniform = causal / causal.sum(-1, keepdim=True)  # (S, S)
    maps = [uniform.expand(1, nh, S, S).clone() for _ in range(L)]
    prev = torch.diag(torch.ones(S - 1), -1)
    prev[0, 0] = 1.0
    maps[1][0, 2] = prev
    ind = uniform.clone()
    for i in range(length):  # the 2nd copy of token i looks at the token after its 1st copy
        ind[length + i] = 0.0
        ind[length + i, i + 1] = 1.0
    maps[0][0, 3] = ind
    monkeypatch.setattr(olmo_lab.heads, "attention_maps", lambda model, ids: maps)
    ids = torch.zeros(1, S, dtype=torch.long)
    scores = previous_token_scores(None, ids)
    assert best_head(scores) == (1, 2, 1.0)
    expected_uniform = float(torch.tensor([1 / (i + 1) for i in range(1, S)]).mean())  # position i spreads over i + 1
    assert float(scores[0, 0]) == pytest.approx(expected_uniform)
    induction = induction_scores(None, ids)
    assert best_head(induction) == (0, 3, 1.0)
    assert float(induction[1, 2]) == 0.0  # a previous-token head is no induction head


# ------------------------------------------------------------------------------------ shipped checkpoints
@pytest.mark.parametrize("name", LAB_MODELS)
def test_shipped_checkpoint_loads_here_and_in_transformers(name):
    path = lab_model(name)
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
              "generation_config.json", "README.md"):
        assert os.path.isfile(os.path.join(path, f)), f
    model = olmo_lab.load_model(path, dtype=torch.float32)
    tok = olmo_lab.load_tokenizer(path)
    tok.check_model_vocab(model.config.vocab_size)
    samples = json.loads((LAB_MODELS_DIR / "samples.json").read_text(encoding="utf-8"))
    text = " ".join(s["texts"][0] for s in samples.values())
    ids = torch.tensor([tok.encode(text)[:model.config.max_position_embeddings]])
    import transformers
    hf_tok = transformers.AutoTokenizer.from_pretrained(path)
    assert hf_tok(text)["input_ids"] == tok.encode(text)
    hf = load_hf(path, dtype=torch.float32, attn="sdpa")
    with torch.no_grad():
        assert max_diff(model(ids).logits, hf(ids).logits) <= 1e-4
    if model.config.is_moe:
        assert model.config.expert_names == ["public", "code", "math", "dictionary", "bible"]
        assert json.load(open(os.path.join(path, "config.json")))["expert_names"] == model.config.expert_names
    else:
        assert {"sliding_attention", "full_attention"} <= set(model.config.layer_types)
        assert model.config.sliding_window < model.config.max_position_embeddings


def test_olmo3_lab_has_a_previous_token_head_and_an_induction_head():
    """The structure the teaching checkpoint is trained for, found by score as notebook 02 does."""
    path = lab_model("olmo3-lab")
    model, tok = olmo_lab.load_model(path, dtype=torch.float32), olmo_lab.load_tokenizer(path)
    public = olmo_lab.lab.samples()["public"]["texts"]
    *_, prev = best_head(previous_token_scores(model, torch.tensor([tok.encode(public[0])[:48]])))
    seen = torch.tensor(sorted({i for s in public for i in tok.encode(s)}))
    repeated = seen[repeated_random_tokens(len(seen), length=24, batch=4, seed=0)]  # (4, 48): [r, r]
    *_, ind = best_head(induction_scores(model, repeated))
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(model(repeated).logits[:, :-1].flatten(0, 1),
                                                 repeated[:, 1:].flatten(), reduction="none").view(4, -1)
    # mean attention on the previous token >= 0.5 (uniform causal attention over 48 tokens: about 0.07), and on
    # the token after the earlier copy >= 0.5
    assert prev >= 0.5 and ind >= 0.5, (prev, ind)
    assert loss[:, 24:].mean() < loss[:, :23].mean() - 2.0  # the second copy is predicted in context


def test_flexolmo_lab_public_expert_is_olmo3_lab():
    dense = olmo_lab.load_model(lab_model("olmo3-lab"), dtype=torch.float32)
    flex = olmo_lab.load_model(lab_model("flexolmo-lab"), dtype=torch.float32)
    d, f = dense.state_dict(), flex.state_dict()
    for k, v in shared_state(flex).items():
        assert torch.equal(v, d[k]), k
    assert torch.equal(f["model.layers.0.mlp.experts.0.gate_proj.weight"], d["model.layers.0.mlp.gate_proj.weight"])


def test_shipped_size_is_at_most_40_mb():
    total = sum(f.stat().st_size for f in LAB_MODELS_DIR.rglob("*") if f.is_file())
    assert total <= 40 * 10**6, total


def test_unknown_lab_model_raises():
    with pytest.raises(CheckpointError, match="olmo3-lab, flexolmo-lab"):
        lab_model("nope")


@pytest.mark.parametrize("command", [[sys.executable, "-m", "lab.rebuild"], [sys.executable, "notebooks/build.py"]])
def test_rebuilds_of_shipped_outputs_refuse_unpinned_numerics(command):
    """The lab rebuild and the notebook build run only under the Makefile's pinned CPU numerics, the ones
    CI checks the stored outputs with; started directly, they stop before doing anything."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "OMP_NUM_THREADS")}
    run = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "make " in run.stderr, run.stderr


def test_data_split_keeps_owners_held_out_and_public_shares_apart(monkeypatch):
    """lab.build_data: each domain's held-out, owner's training and unused documents are disjoint and cover
    every document; the public mix is its own split plus the first PUBLIC_SHARE_CHARS of each closed domain's
    unused documents, never one an owner trains or is evaluated on."""
    from lab import build_data

    monkeypatch.setattr(build_data, "HELDOUT_CHARS", 5000)
    monkeypatch.setattr(build_data, "MAX_TRAIN_CHARS", 20000)
    monkeypatch.setattr(build_data, "PUBLIC_SHARE_CHARS", 3000)
    docs = {d: [f"{d} document {i} " + "x" * (200 + 37 * i) for i in range(60)] for d in build_data.DOMAINS}
    train, heldout, unused = build_data.split(docs["code"], seed=3, max_train=20000)
    assert sorted(train + heldout + unused) == sorted(docs["code"]) and len(unused) > 10
    assert sum(map(len, heldout[:-1])) < 5000 <= sum(map(len, heldout))
    assert sum(map(len, train[:-1])) < 20000 <= sum(map(len, train))
    assert build_data.split(docs["code"], seed=3, max_train=20000) == (train, heldout, unused)  # deterministic

    splits = build_data.split_domains({d: (texts, [{"package": d}]) for d, texts in docs.items()})
    assert list(splits) == build_data.DOMAINS
    own_public = build_data.split(docs["public"], build_data.SEED, None)
    public_train, public_heldout, sources = splits["public"]
    assert public_heldout == own_public[1] and public_train[:len(own_public[0])] == own_public[0]
    shared = public_train[len(own_public[0]):]
    for i, d in enumerate(build_data.DOMAINS[1:], start=1):
        share = [t for t in shared if t.startswith(f"{d} ")]
        assert sum(map(len, share[:-1])) < 3000 <= sum(map(len, share)), d
        train, heldout, _ = splits[d]
        assert (train, heldout) == build_data.split(docs[d], build_data.SEED + i, 20000)[:2]
        assert not set(share) & set(train + heldout), d  # the owner never trains or evaluates on the share
        assert any(s.get("part", "").startswith(f"{len(share)} {d} documents") for s in sources), sources


def test_wordnet_documents_keep_each_sense_once_with_its_part_of_speech(tmp_path):
    """lab.build_data.wordnet_docs: a synset's gloss, which dictd repeats under each of its words, is kept at its
    first headword only (else held-out glosses copy training ones); a kept sense keeps its part of speech even
    when the sense that named it was dropped; entries are joined into runs of about `chars` characters."""
    import gzip

    from lab import build_data

    dict_file = tmp_path / "usr/share/dictd/wn.dict.dz"
    dict_file.parent.mkdir(parents=True)
    dict_file.write_bytes(gzip.compress((
        "00-database-info\n     This file was converted from the original database\n"
        "acclaim\n    n 1: enthusiastic approval; \"the book met with modest\n         acclaim\" [syn: {acclaim},\n"
        "         {plaudit}]\n    v 1: praise vociferously [syn: {acclaim}, {hail}]\n"
        "dunk\n    n 1: a basketball shot\n    v 1: praise vociferously [syn: {acclaim}, {hail}]\n"
        "    2: make a dunk shot, in basketball\n"
        "plaudit\n    n 1: enthusiastic approval; \"the book met with modest\n         acclaim\" [syn: {acclaim},\n"
        "         {plaudit}]\n"
        "zebra\n    n 1: any of several fleet black-and-white striped African equines\n").encode()))
    docs = build_data.wordnet_docs(tmp_path, chars=1)  # every entry ends a run
    assert docs == ['acclaim\nn 1: enthusiastic approval; "the book met with modest acclaim" [syn: {acclaim}, {plaudit}]'
                    '\nv 1: praise vociferously [syn: {acclaim}, {hail}]',
                    "dunk\nn 1: a basketball shot\nv 2: make a dunk shot, in basketball",
                    "zebra\nn 1: any of several fleet black-and-white striped African equines"]
    assert build_data.wordnet_docs(tmp_path, chars=150) == ["\n".join(docs[:2])]  # the last, short run is dropped


def test_the_rebuild_pipeline_end_to_end_in_miniature(tmp_path, monkeypatch):
    """`lab.rebuild.build`, the whole of `make lab-models` after the data, on the shipped text samples with a
    tiny model: both checkpoints, the model cards, RESULTS.md and results.json are written, the targets are
    judged, opt-out is exact, the probe can end a stage, and a rerun resumes from the cached states to the
    same numbers."""
    from lab import rebuild

    samples = olmo_lab.lab.samples()
    docs = {d: {"train": s["texts"] * 12, "heldout": s["texts"][::-1] * 4} for d, s in samples.items()}
    stages = rebuild.PRESETS["smoke"]["public_stages"]
    stages = (*stages[:2], dataclasses.replace(stages[2], until_induction=1e-9), stages[3])  # probe ends it at step 5
    monkeypatch.setattr(rebuild, "HEAD_CHECK_EVERY", 5)
    p = dict(rebuild.PRESETS["smoke"], vocab=320, public_stages=stages, out=tmp_path / "models",
             results=tmp_path / "results", preset="test", threads=1)
    measured = []  # which model each residual_stats call measured: public (dense) or a trained owner
    real_stats = rebuild.residual_stats

    def spy(model, windows, *args, **kwargs):
        if not model.config.is_moe:
            measured.append("public")
        else:  # an owner's expert has trained once it differs from the public FFN it was copied from
            experts = model.model.layers[0].mlp.experts
            measured.append("untrained owner" if torch.equal(experts[0].down_proj.weight, experts[1].down_proj.weight)
                            else "owner")
        return real_stats(model, windows, *args, **kwargs)

    monkeypatch.setattr(rebuild, "residual_stats", spy)
    first = rebuild.build(p, docs, {"domains": {}}, tmp_path / "work", started=0.0)
    rounds = len(p["expert_rounds"])
    # the public statistics, then per owner: round 1 on the public model, later rounds on its own trained model
    assert measured == ["public"] + (["public"] + ["owner"] * (rounds - 1)) * len(rebuild.CLOSED), measured

    out = json.loads((tmp_path / "results" / "results.json").read_text())
    assert out["run"]["stage_steps"] == [40, 10, 5, 10]
    assert len(out["targets"]) == 21  # 4 x (within 5%, 10% better, +15% own, <= 5% others, routing) + exactness
    exact = [t for t in out["targets"] if t["target"].startswith("opt-out exact")]
    assert exact[0]["met"] and max(out["opt_out_max_abs_logit_diff"].values()) == 0
    assert "| merged, top-5 (all) |" in (tmp_path / "results" / "RESULTS.md").read_text()
    for name in ("olmo3-lab", "flexolmo-lab"):
        files = {f.name for f in (tmp_path / "models" / name).iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                "generation_config.json", "README.md"} <= files, files
    flex = olmo_lab.load_model(tmp_path / "models" / "flexolmo-lab")
    dense = olmo_lab.load_model(tmp_path / "models" / "olmo3-lab")
    assert flex.config.expert_names == ["public", *rebuild.CLOSED]
    assert torch.equal(flex.model.layers[1].mlp.experts[0].down_proj.weight, dense.model.layers[1].mlp.down_proj.weight)

    cached = sorted(d.name for d in (tmp_path / "work").iterdir())
    assert len(cached) == 4 + rounds * len(rebuild.CLOSED), cached  # one state per public stage and per expert round
    again = rebuild.build(p, docs, {"domains": {}}, tmp_path / "work", started=0.0)
    assert sorted(d.name for d in (tmp_path / "work").iterdir()) == cached  # every stage came from its cache
    assert again == first
    docs["public"]["train"] = docs["public"]["train"][1:]  # other public data: nothing cached may be reused
    rebuild.build(p, docs, {"domains": {}}, tmp_path / "work", started=0.0)
    assert len(list((tmp_path / "work").iterdir())) == 2 * len(cached)
