"""Corpus-scale routing analysis, in process: every table against a direct count over the same chunks, run one
at a time without padding; sources, packing, determinism, resumption and bad input."""

import json
import math
import os
from collections import Counter

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

import olmo_lab
from olmo_lab import corpus
from olmo_lab.config import OlmoConfig
from olmo_lab.errors import CorpusError
from olmo_lab.model import OlmoModel
from olmo_lab.trace import trace
from olmo_lab.train import token_byte_lengths, train_bpe_tokenizer

EXPERTS = ["public", "code", "math", "verse"]
TEXTS = {
    "prose": ["The old house stood at the end of the lane, and the children walked past it every morning.",
              "She opened the letter slowly and read it twice before she put it down on the kitchen table. " * 3,
              "Nobody had lived there for years."],
    "code": ["def add(a, b):\n    return a + b\n\n\nclass Stack:\n    def __init__(self):\n        self.items = []\n",
             "for i in range(10):\n    if i % 2 == 0:\n        print(i)\n" * 4],
    "math": ["|- ( ( ph -> ps ) -> ( ( ps -> ch ) -> ( ph -> ch ) ) ) syllogism $p |- ( A e. RR -> ( A + 0 ) = A )",
             "|- ( x = y -> ( ph <-> ps ) ) $p |- ( ( A e. CC /\\ B e. CC ) -> ( A x. B ) = ( B x. A ) )"],
}
CONFIG = corpus.CorpusConfig(context=24, batch_size=3, shard_batches=2, bins=8, min_token_count=2, top_tokens=4)


def tiny_flex(vocab: int, seed: int = 0) -> OlmoModel:
    config = OlmoConfig(model_type="flex_olmo", vocab_size=vocab, hidden_size=32, intermediate_size=32,
                        num_hidden_layers=3, num_attention_heads=4, num_experts=4, num_experts_per_tok=2,
                        max_position_embeddings=64, expert_names=EXPERTS, pad_token_id=vocab - 1)
    model = OlmoModel(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # large random weights: routing decisions far from ties
        for name, p in model.named_parameters():
            p.copy_(torch.rand(p.shape, generator=g) + 0.5 if "norm" in name else torch.randn(p.shape, generator=g) * 0.3)
    return model


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    tok = train_bpe_tokenizer([t for texts in TEXTS.values() for t in texts], vocab_size=300)
    model = tiny_flex(len(tok))
    result = corpus.analyze(model, tok, corpus.Corpus.from_texts(TEXTS), CONFIG, progress=False)
    return tok, model, result


def direct_counts(model, tok, texts, context):
    """Every statistic counted token by token, each chunk run alone (no batching, no padding)."""
    E = model.config.num_experts
    c = {k: Counter() for k in ("top1", "topk", "coact", "trans", "vocab", "hist")}
    nats, n_bytes, tokens = Counter(), Counter(), Counter()
    lengths = token_byte_lengths(tok)
    for domain, docs in texts.items():
        for text in docs:
            ids = tok.encode(text)
            for start in range(0, len(ids), context):
                chunk = torch.tensor([ids[start:start + context]])
                with torch.inference_mode(), trace(model, attention=False, routing=True) as tr:
                    logits = model(chunk).logits
                tokens[domain] += chunk.shape[1]
                for layer, r in tr.routing.items():
                    for row, token in enumerate(chunk[0].tolist()):
                        chosen = r.topk_indices[row].tolist()
                        c["top1"][layer, domain, chosen[0]] += 1
                        c["vocab"][layer, token, chosen[0]] += 1
                        for e in chosen:
                            c["topk"][layer, domain, e] += 1
                            for f in chosen:
                                c["coact"][layer, e, f] += 1
                        for e, p in enumerate(r.probs[row].tolist()):
                            c["hist"][layer, domain, e, min(int(p * CONFIG.bins), CONFIG.bins - 1)] += 1
                        if layer:
                            c["trans"][layer - 1, tr.routing[layer - 1].topk_indices[row, 0].item(), chosen[0]] += 1
                if chunk.shape[1] > 1:
                    targets = chunk[0, 1:]
                    n_bytes[domain] += int(lengths[targets].sum())
                    with torch.inference_mode():
                        for removed in [None] + list(range(E)):
                            if removed is None:
                                out = logits
                            else:
                                with olmo_lab.experts_off(model, [removed]):
                                    out = model(chunk).logits
                            nats[domain, removed] += F.cross_entropy(out[0, :-1].float(), targets, reduction="sum").item()
    return c, nats, n_bytes, tokens


def test_every_table_equals_a_direct_count(setup):
    tok, model, result = setup
    c, nats, n_bytes, tokens = direct_counts(model, tok, TEXTS, CONFIG.context)
    names = model.config.expert_names
    r = result.routing
    for row in r.itertuples():
        e = names.index(row.expert)
        assert row.tokens_top1 == c["top1"][row.layer, row.domain, e]
        assert row.tokens_topk == c["topk"][row.layer, row.domain, e]
        assert row.domain_tokens == tokens[row.domain]
    assert r.tokens_top1.sum() == sum(tokens.values()) * model.config.num_hidden_layers
    for row in result.histograms.itertuples():
        assert row.tokens == c["hist"][row.layer, row.domain, names.index(row.expert), row.bin]
    for row in result.coactivation.itertuples():
        a, b = names.index(row.expert), names.index(row.other)
        assert row.both == c["coact"][row.layer, a, b] and row.expert_tokens == c["coact"][row.layer, a, a]
    for row in result.consistency.itertuples():
        assert row.tokens == c["trans"][row.layer, names.index(row.expert), names.index(row.next_expert)]
    vocab = {(row.layer, row.token_id, names.index(row.expert)): row.tokens for row in result.vocabulary.itertuples()}
    assert vocab == {k: v for k, v in c["vocab"].items() if v}
    for row in result.loss.itertuples():
        removed = None if pd.isna(row.removed) else names.index(row.removed)
        assert row.bytes == n_bytes[row.domain]
        assert row.bits_per_byte == pytest.approx(nats[row.domain, removed] / math.log(2) / n_bytes[row.domain],
                                                  rel=1e-5)
    assert set(result.loss.experts) == {"all experts"} | {f"without {n}" for n in names}


def test_definitions_follow_olmoe(setup):
    tok, model, result = setup
    k, E = model.config.num_experts_per_tok, model.config.num_experts
    spec = result.domain_specialization("k")
    assert spec.sum(axis=1).round(9).eq(k).all()  # every token has k experts: shares sum to k (uniform: k/E each)
    assert result.domain_specialization("1").sum(axis=1).round(9).eq(1).all()
    v = result.vocabulary
    shares = v.groupby(["layer", "token_id"]).share.sum()
    assert shares.round(9).eq(1).all()  # each id's occurrences are split over the experts
    top = v[v.is_top]
    assert (top.groupby(["layer", "token_id"]).size() == 1).all()
    assert (top.set_index(["layer", "token_id"]).share == v.groupby(["layer", "token_id"]).share.max()).all()
    kept = top[top.occurrences >= CONFIG.min_token_count]
    expected = kept.groupby(["layer", "expert"]).share.mean()
    got = result.vocabulary_specialization()
    for (layer, expert), value in expected.items():
        assert got.loc[layer, expert] == pytest.approx(value)
    s = result.specific_tokens
    assert (s.occurrences >= CONFIG.min_token_count).all() and (s.groupby(["layer", "expert"]).size() <= 4).all()
    for (layer, expert), rows in s.groupby(["layer", "expert"]):
        assert list(rows.share) == sorted(rows.share, reverse=True)
        assert set(rows.token_id) <= set(kept[(kept.layer == layer) & (kept.expert == expert)].token_id)
    consistency = result.routing_consistency()
    c = result.consistency
    same = c[c.expert == c.next_expert].groupby("layer").tokens.sum() / c.groupby("layer").tokens.sum()
    assert list(consistency) == pytest.approx(list(same))
    assert result.report["coactivation_top"] == 2 and result.report["top_k"] == k
    assert "domain specialization" in result.summary() and "bits per byte" in result.summary()


def test_long_documents_are_chunked_and_batches_packed(setup, tmp_path):
    tok, model, _ = setup
    doc = TEXTS["code"][1]
    n = len(tok.encode(doc))
    assert n > 2 * CONFIG.context
    config = corpus.CorpusConfig(**{**CONFIG.__dict__, "records": True})
    result = corpus.analyze(model, tok, corpus.Corpus.from_texts({"code": [doc]}), config, out_dir=tmp_path,
                            progress=False)
    assert result.report["chunks"] == math.ceil(n / CONFIG.context) and result.report["tokens"] == n
    records = pd.concat(pd.read_parquet(p) for p in sorted((tmp_path / "records").glob("*.parquet")))
    assert list(records.position) == list(range(n)) and list(records.token_id) == tok.encode(doc)
    first = records.position % CONFIG.context == 0  # a chunk's first token is context only
    assert records.nats[first].isna().all() and records.nats[~first].notna().all()
    assert result.loss.predicted_tokens[result.loss.removed.isna()].sum() == n - result.report["chunks"]
    layer0 = records.top1_layer0.map(lambda e: EXPERTS[e]).value_counts()
    r0 = result.routing[result.routing.layer == 0].set_index("expert").tokens_top1
    assert all(r0[e] == layer0.get(e, 0) for e in EXPERTS)


def test_deterministic_and_independent_of_shard_size(setup):
    tok, model, result = setup
    again = corpus.analyze(model, tok, corpus.Corpus.from_texts(TEXTS), CONFIG, progress=False)
    other = corpus.analyze(model, tok, corpus.Corpus.from_texts(TEXTS),
                           corpus.CorpusConfig(**{**CONFIG.__dict__, "shard_batches": 1}), progress=False)
    for name in corpus.TABLES:
        pd.testing.assert_frame_equal(getattr(result, name), getattr(again, name))
        if name != "loss":  # loss sums are added in another grouping: equal to rounding
            pd.testing.assert_frame_equal(getattr(result, name), getattr(other, name))
    pd.testing.assert_frame_equal(result.loss, other.loss, rtol=1e-12)


def test_files_parquet_jsonl_text_and_datasets_give_the_same_tables(setup, tmp_path):
    tok, model, result = setup
    rows = [{"text": t, "domain": d} for d, texts in TEXTS.items() for t in texts]
    (tmp_path / "all.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "all.parquet")
    for d, texts in TEXTS.items():  # the lab's held-out format: documents between form-feed lines
        (tmp_path / f"{d}.txt").write_text("\n\f\n".join(texts))
    datasets = pytest.importorskip("datasets")
    sources = [corpus.Corpus.from_files(tmp_path / "all.jsonl", domains=list(TEXTS)),
               corpus.Corpus.from_files([tmp_path / "all.parquet"], domains=list(TEXTS)),
               corpus.Corpus.from_files({d: tmp_path / f"{d}.txt" for d in TEXTS}, separator="\f"),
               corpus.Corpus.from_dataset(datasets.Dataset.from_parquet(str(tmp_path / "all.parquet")),
                                          domains=list(TEXTS))]
    for source in sources:
        got = corpus.analyze(model, tok, source, CONFIG, progress=False)
        for name in corpus.TABLES:
            pd.testing.assert_frame_equal(getattr(result, name), getattr(got, name))
    found = corpus.Corpus.from_files(tmp_path / "all.jsonl").domains(lambda *a: None)  # labels found in the rows
    assert found == sorted(TEXTS)


def test_interrupted_job_resumes_from_its_shards(setup, tmp_path):
    tok, model, result = setup
    calls = {"n": 0}

    def stop_after(_module, _args):
        calls["n"] += 1
        if calls["n"] == 23:  # 5 forwards a batch, 2 batches a shard: during the third shard
            raise KeyboardInterrupt

    before = model.experts.snapshot()
    handle = model.register_forward_pre_hook(stop_after)
    try:
        with pytest.raises(KeyboardInterrupt):
            corpus.analyze(model, tok, corpus.Corpus.from_texts(TEXTS), CONFIG, out_dir=tmp_path, progress=False)
    finally:
        handle.remove()
    assert model.experts.snapshot() == before  # toggles restored, no trace left on
    assert not model.hooks.active and all(b.mlp._hooks is None for b in model.model.layers)
    written = sorted(p.name for p in (tmp_path / "shards").iterdir())
    assert written and not (tmp_path / "report.json").exists()  # no result from a half-done job
    (tmp_path / "shards" / "shard-000099.tmp").write_bytes(b"half")  # a shard cut off while being written
    calls["n"] = 0
    handle = model.register_forward_pre_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    try:
        resumed = corpus.analyze(model, tok, corpus.Corpus.from_texts(TEXTS), CONFIG, out_dir=tmp_path,
                                 progress=False)
    finally:
        handle.remove()
    forwards_per_batch = 1 + model.config.num_experts
    assert resumed.report["resumed_shards"] == len(written)
    assert calls["n"] == (resumed.report["batches"] - len(written) * CONFIG.shard_batches) * forwards_per_batch
    assert not list((tmp_path / "shards").glob("*.tmp"))
    for name in corpus.TABLES:
        pd.testing.assert_frame_equal(getattr(result, name), getattr(resumed, name))
    loaded = corpus.CorpusResult.load(tmp_path)
    for name in corpus.TABLES:
        pd.testing.assert_frame_equal(getattr(result, name), getattr(loaded, name), check_dtype=False)
    with pytest.raises(CorpusError, match="another job.*config"):  # other settings, same folder
        corpus.analyze(model, tok, corpus.Corpus.from_texts(TEXTS), corpus.CorpusConfig(context=16),
                       out_dir=tmp_path, progress=False)
    with pytest.raises(CorpusError, match="another job.*corpus"):
        corpus.analyze(model, tok, corpus.Corpus.from_texts({"code": TEXTS["code"]}), CONFIG, out_dir=tmp_path,
                       progress=False)
    fresh = corpus.analyze(model, tok, corpus.Corpus.from_texts({"code": TEXTS["code"]}), CONFIG, out_dir=tmp_path,
                           resume=False, progress=False)
    assert fresh.report["resumed_shards"] == 0 and fresh.report["domains"] == ["code"]


# ------------------------------------------------------------------------------------ bad input
def test_missing_unreadable_and_unsupported_files(tmp_path, monkeypatch):
    with pytest.raises(CorpusError, match="nope.jsonl: no such file"):
        corpus.Corpus.from_files(tmp_path / "nope.jsonl")
    with pytest.raises(CorpusError, match="no such file"):
        corpus.Corpus.from_files({"code": tmp_path})  # a folder
    (tmp_path / "a.csv").write_text("text,domain\n")
    with pytest.raises(CorpusError, match="unsupported file type '.csv'"):
        corpus.Corpus.from_files(tmp_path / "a.csv")
    (tmp_path / "a.txt").write_text("hello")
    with pytest.raises(CorpusError, match="carries no domain label"):
        corpus.Corpus.from_files([tmp_path / "a.txt"])
    monkeypatch.setattr(corpus.os, "access", lambda path, mode: False)  # as a non-root user without read rights
    with pytest.raises(CorpusError, match="a.txt: cannot be read"):
        corpus.Corpus.from_files({"prose": tmp_path / "a.txt"})


def test_malformed_rows_raise_with_file_and_line_or_are_skipped(setup, tmp_path):
    tok, model, _ = setup
    lines = ['{"text": "good code", "domain": "code"}', '{"text": "cut off', '', '[1, 2]',
             '{"text": 3, "domain": "code"}', '{"text": "no label"}', '{"text": "x", "domain": "poetry"}',
             '{"text": "   ", "domain": "math"}', '{"text": "more math", "domain": "math"}']
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(lines) + "\n")
    docs = corpus.Corpus.from_files(path, domains=["code", "math"])
    with pytest.raises(CorpusError, match=r"rows.jsonl:2: not valid JSON"):
        corpus.analyze(model, tok, docs, CONFIG, progress=False)
    skip = corpus.CorpusConfig(**{**CONFIG.__dict__, "on_bad_row": "skip"})
    result = corpus.analyze(model, tok, docs, skip, progress=False)
    where = [w for w, _ in result.report["skipped"]]
    assert where == [f"{path}:{n}" for n in (2, 4, 5, 6, 7)]  # line 3 is blank, line 8 an empty document
    assert "unknown domain label 'poetry'" in result.report["skipped"][-1][1]
    assert result.report["skipped_rows"] == 5 and result.report["empty_documents"] == 1
    assert result.report["documents"] == 2
    assert result.report["tokens"] == len(tok.encode("good code")) + len(tok.encode("more math"))
    bad_utf8 = tmp_path / "bad.txt"
    bad_utf8.write_bytes(b"fine line\n\xff\xfe broken\n")
    with pytest.raises(CorpusError, match=r"bad.txt:2: not valid UTF-8"):
        corpus.analyze(model, tok, corpus.Corpus.from_files({"code": bad_utf8}), CONFIG, progress=False)
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(CorpusError, match="not a readable Parquet file"):
        corpus.analyze(model, tok, corpus.Corpus.from_files({"code": tmp_path / "broken.parquet"}), CONFIG,
                       progress=False)
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "other.parquet")
    with pytest.raises(CorpusError, match="no column 'text'"):
        corpus.analyze(model, tok, corpus.Corpus.from_files({"code": tmp_path / "other.parquet"}), CONFIG,
                       progress=False)


def test_settings_that_cannot_fit(setup, tmp_path):
    tok, model, _ = setup
    docs = corpus.Corpus.from_texts(TEXTS)
    before = model.experts.snapshot()
    for config, message in [(corpus.CorpusConfig(context=65), "context: 65 tokens cannot fit"),
                            (corpus.CorpusConfig(context=1), "context: 1 tokens cannot fit"),
                            (corpus.CorpusConfig(batch_size=0), "batch_size: expected a positive integer"),
                            (corpus.CorpusConfig(shard_batches=True), "shard_batches"),
                            (corpus.CorpusConfig(coactivation_top=3), "coactivation_top: expected 1..2"),
                            (corpus.CorpusConfig(on_bad_row="ignore"), "on_bad_row"),
                            (corpus.CorpusConfig(records=True), "records=True .* pass out_dir")]:
        with pytest.raises(CorpusError, match=message):
            corpus.analyze(model, tok, docs, config, progress=False)
    with pytest.raises(CorpusError, match="engine: expected"):
        corpus.analyze(model, tok, docs, engine="spark")
    with pytest.raises(CorpusError, match="workers: options of the Ray engine"):
        corpus.analyze(model, tok, docs, workers=2)
    with pytest.raises(CorpusError, match="expected an olmo_lab.corpus.Corpus"):
        corpus.analyze(model, tok, TEXTS)
    with pytest.raises(CorpusError, match="expected an OlmoModel"):
        corpus.analyze("some/path", tok, docs)
    dense = OlmoModel(OlmoConfig(model_type="olmo3", vocab_size=300, hidden_size=32, intermediate_size=32,
                                 num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=64))
    with pytest.raises(CorpusError, match="needs a FlexOlmo"):
        corpus.analyze(dense, tok, docs)
    (tmp_path / "x.jsonl").write_text("")
    with pytest.raises(CorpusError, match="distinct domain names"):
        corpus.analyze(model, tok, corpus.Corpus.from_files(tmp_path / "x.jsonl", domains=["a", "a"]), out_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.jsonl"]  # nothing written for a job that cannot start
    assert model.experts.snapshot() == before and not model._forward_pre_hooks
    assert not model.hooks.active and all(b.mlp._hooks is None and b.self_attn._hooks is None for b in model.model.layers)


def test_plots_and_text_summaries(setup):
    from olmo_lab import corpus_plots
    _, model, result = setup
    figures = [corpus_plots.domain_specialization_heatmaps(result), corpus_plots.domain_specialization_heatmaps(result, "k"),
               corpus_plots.domain_specialization_by_layer(result), corpus_plots.vocabulary_specialization_plot(result),
               corpus_plots.coactivation_heatmaps(result), corpus_plots.routing_consistency_plot(result),
               corpus_plots.opt_out_loss_heatmap(result), corpus_plots.routing_weight_histograms(result, 1)]
    assert "uniform: 0.50" in figures[1]._suptitle.get_text()  # top-2 of 4 experts
    stay = result.routing_consistency().iloc[0]
    assert f"{stay:.0%} stay" in figures[5].axes[0].get_title()
    cells = {t.get_text() for t in figures[6].axes[0].texts}
    deltas = result.loss.delta_bits_per_byte.dropna()
    assert {f"{v:+.3f}" for v in deltas[result.loss.removed.notna()]} <= cells
    text = result.specific_tokens_table(0)
    s = result.specific_tokens[result.specific_tokens.layer == 0]
    assert all(f"{row.token!r} {row.share:.0%} ({row.occurrences})" in text for row in s.itertuples() if row.rank < 8)
    assert result.loss_table().shape == (len(TEXTS), 1 + model.config.num_experts)
