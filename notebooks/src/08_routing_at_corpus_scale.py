# %% [markdown]
# # 08 · Routing at corpus scale
#
# Notebook 03 looked at routing prompt by prompt. MoE research reads it over whole corpora: OLMoE
# (Muennighoff et al. 2024) counts, per layer and expert, how each domain's tokens and each vocabulary
# item are routed; FlexOlmo's opt-out story is each domain's loss with each expert removed.
# `olmo_lab.corpus` does that as one streaming job: documents from local files (text, JSON Lines,
# Parquet) or a `datasets.Dataset`, chunked to the context, packed into batches, routed with capture on,
# and aggregated as it goes into fixed-size counts (memory does not grow with the corpus). It runs in
# process (this notebook), or on a Ray cluster with one model actor per worker and the same tables.
#
# The model is the shipped `flexolmo-lab` (or `OLMO_LAB_MOE_MODEL`); the corpus is its held-out
# samples, three short snippets per domain that no expert was trained on. That is about a thousand
# tokens: enough to show every table and picture, too little for firm numbers (see the end).

# %%
import json
import os
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import torch

import olmo_lab
from olmo_lab import corpus, corpus_plots

torch.manual_seed(0)
path = os.environ.get("OLMO_LAB_MOE_MODEL") or olmo_lab.lab_model("flexolmo-lab")
model = olmo_lab.load_model(path)
tok = olmo_lab.load_tokenizer(path)
names = model.experts.names
print(f"experts {names}, top-{model.config.num_experts_per_tok}, {model.config.num_hidden_layers} layers, "
      f"context {model.config.max_position_embeddings}")

# %% [markdown]
# ## A corpus on disk
# The held-out samples written as JSON Lines, one document per line with its domain label: the shape a
# real evaluation corpus has (a Parquet file or a `datasets.Dataset` built from local files reads the
# same way). The job writes its shards and final tables (Parquet) under `out_dir`.

# %%
work = Path(tempfile.mkdtemp())
rows = [{"text": text, "domain": domain} for domain, entry in olmo_lab.lab.samples().items()
        for text in entry["texts"]]
(work / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
docs = corpus.Corpus.from_files(work / "heldout.jsonl", domains=list(olmo_lab.lab.samples()))

config = corpus.CorpusConfig(context=128, batch_size=8, shard_batches=1, min_token_count=5)
result = corpus.analyze(model, tok, docs, config, out_dir=work / "run", progress=False)
print(result.summary().splitlines()[0])
print(sorted(p.name for p in (work / "run").iterdir()))

# %% [markdown]
# ## Domain specialization per layer
# OLMoE's domain specialization of expert e for domain D: the share of D's tokens routed to e. With
# top-k = all experts every expert is in every token's top-k, so the top-1 expert (the highest routing
# weight) is the informative count; uniform routing would give 1/5 = 0.20 in every cell.

# %%
fig = corpus_plots.domain_specialization_heatmaps(result, top="1")
plt.show()
print(result.domain_specialization("1").round(2).to_string())

# %%
fig = corpus_plots.domain_specialization_by_layer(result)
plt.show()

# %% [markdown]
# ## Vocabulary specialization and the tokens most specific to each expert
# For each token id, the share of its occurrences whose top-1 expert is each expert; an id's
# specialization is the share of its most frequent expert. OLMoE counts only ids seen at least 10
# times; this small corpus uses 5. The tables hold every id (`result.vocabulary`).

# %%
fig = corpus_plots.vocabulary_specialization_plot(result)
plt.show()
print(result.vocabulary_specialization().round(2).to_string())
print("\nmost specific tokens per expert, layer 2 (top-1 share, occurrences):")
print(result.specific_tokens_table(layer=2, top=6))

# %% [markdown]
# ## Co-activation
# Of the tokens that put the row expert among their top experts, the share that also choose the column
# expert. Every token uses all five experts here, so co-activation is counted among each token's top 2.

# %%
fig = corpus_plots.coactivation_heatmaps(result)
plt.show()
print(result.coactivation_matrix(layer=2).round(2).to_string())

# %% [markdown]
# ## Routing consistency across layers
# Where the tokens of each top-1 expert go at the next layer. FlexOlmo's experts keep their identity
# across layers (the code expert is the code owner's in every layer), so "same expert" is meaningful.

# %%
fig = corpus_plots.routing_consistency_plot(result)
plt.show()
print(result.routing_consistency().round(3).to_string())

# %% [markdown]
# ## Routing weights
# How confident the router is: the distribution of each expert's weight over each domain's tokens.

# %%
fig = corpus_plots.routing_weight_histograms(result, layer=2)
plt.show()

# %% [markdown]
# ## Opt-out: each domain's loss with each expert removed
# Bits per byte of every predicted token (a chunk's first token is context only), with all experts and
# with each expert opted out (`olmo_lab.experts_off`: removed before the softmax, as if never merged).

# %%
fig = corpus_plots.opt_out_loss_heatmap(result)
plt.show()
print(result.loss_table().round(3).to_string())

# %% [markdown]
# ## Interrupted jobs resume from their shards
# Each shard is written atomically as it finishes; running the same job on the same folder again
# reads them back instead of recomputing, and gives the same tables.

# %%
again = corpus.analyze(model, tok, docs, config, out_dir=work / "run", progress=False)
print("resumed shards:", again.report["resumed_shards"], "of", again.report["shards"])
print("same tables:", all(getattr(result, t).equals(getattr(again, t)) for t in corpus.TABLES))

# %% [markdown]
# ## The same job on a Ray cluster
# Not run here (starting a cluster takes longer than this notebook): `engine="ray"` starts a local
# cluster, or joins one with `address=`, and sends the same shards to one model actor per worker; the
# counts equal the in-process ones exactly (`tests/test_corpus_ray.py`). The multi-node GPU recipe is
# in `olmo_lab/analysis/corpus_ray.py` and the README.

# %%
# NBVAL_SKIP
on_ray = corpus.analyze(model, tok, docs, config, engine="ray", workers=2, progress=False)
print("same counts:", on_ray.routing.equals(result.routing))

# %% [markdown]
# ## What this shows, and what it does not
# - **Routing follows the domains from layer 1 on.** In layers 1-3 each closed domain's tokens go
#   mostly to its own expert (the diagonal of the heatmaps), and the public text mostly to the public
#   expert, well above the uniform 0.20. Layer 0 routes on little more than the token itself, and sends
#   40-52% of the closed domains' tokens to the public expert. The same pattern is in
#   `lab/RESULTS.md`, measured on 16,384 held-out tokens per domain, where the own-expert shares in the
#   middle layers are higher (84-95%); on these few short snippets they are lower, and a handful of
#   tokens moves a share by several points.
# - **Routing is stable across layers 1-3** (over 90% of tokens keep their top-1 expert), and changes
#   most between layers 0 and 1, where the domain experts take over from the public one.
# - **Vocabulary specialization is modest**: an id's most frequent expert takes about 60% of its
#   occurrences after layer 0. That is what domain routing predicts: the same id (`' the'`, `','`)
#   appears in several domains and follows its domain, not its spelling; the most specific ids of each
#   expert are its domain's own vocabulary (`import` for code, `:` and brackets for the dictionary's
#   entries). With about a thousand tokens few ids reach 5 occurrences, so these lists are anecdotes.
# - **Opt-out costs most the domain whose expert is removed** (the diagonal of the loss table, +0.25 to
#   +0.62 bits per byte); the other domains move by up to 0.11, mostly for the better (dictionary text
#   is 6% cheaper without the bible expert); removing the public expert costs every domain but the
#   bible. These are losses over about 1,000 predicted tokens of snippets that start mid-document;
#   `lab/RESULTS.md` has the opt-out table measured on the full held-out split.
# - **Co-activation here is among each token's top 2**: with top-k = all, every expert is always active,
#   so co-activation over the top-k would be all ones. The runner-up is rarely the public expert: the
#   public expert's tokens take the dictionary expert second (82% in layer 2), and the dictionary and
#   bible experts are each other's most frequent partners, the two closed domains of English prose.
# What it does not show: anything about the released 7x7B, whose experts were trained at scale on
# overlapping web data and whose routing need not be this clean; the Ray engine's speed (see
# `benchmarks/CORPUS_RESULTS.md`).
