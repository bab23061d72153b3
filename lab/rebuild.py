"""Rebuild the shipped lab checkpoints from scratch: data, tokenizer, public model, experts, merge, evaluation.

    make lab-models                        # about 54 minutes on a 2-core CPU, with pinned CPU numerics
    python -m lab.rebuild --preset smoke   # a few-minute run of the same pipeline into .cache/lab-smoke/

Writes olmo_lab/lab_models/{olmo3-lab,flexolmo-lab}/ (bf16 safetensors + tokenizer + model card),
lab/RESULTS.md and lab/results.json. Intermediate training states live in .cache/lab-build/<preset>/,
so an interrupted rebuild resumes where it stopped. Fixed seeds throughout.

The recipe (see olmo_lab/flexolmo.py and docs): a dense OLMo 3 public model on the public mix; per
closed domain an independent 2-expert model [frozen public FFN, trainable copy] whose router rows make a
Gaussian domain classifier (domain embeddings = mean residual streams, first of the frozen public model,
then, between training rounds, of the owner's own model; see `olmo_lab.flexolmo.gaussian_router_rows`
and `expert_model`), trained on that domain only; a merge of all of them without joint training. All
numbers are measured on the bf16 weights that are shipped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lab import build_data
from olmo_lab import experts_off, load_model, save_model
from olmo_lab.config import OlmoConfig
from olmo_lab.flexolmo import (ResidualStats, gaussian_router_rows, merge, residual_stats, set_router_rows,
                               train_expert, tune_router, upcycle)
from olmo_lab.heads import best_head, induction_scores, previous_token_scores, repeated_random_tokens
from olmo_lab.model import OlmoModel
from olmo_lab.trace import trace
from olmo_lab.train import (TokenStream, TrainConfig, bits_per_byte, init_weights, token_byte_lengths, train,
                            train_bpe_tokenizer)

ROOT = Path(__file__).resolve().parent.parent
CLOSED = ["code", "math", "dictionary", "bible"]
SEED = 0


@dataclass(frozen=True)
class Stage:
    """One stage of the public model's training: warm-up, then cosine decay from lr to final_ratio * lr."""
    name: str
    steps: int  # at most this many
    lr: float
    final_ratio: float = 0.1
    repeat: float = 0.1  # share of the windows that write one span again and again
    spans: tuple[int, int] = (8, 32)  # span lengths (tokens), drawn per window
    random: bool = False  # spans of random frequent tokens instead of the window's own text
    until_induction: float = 0.0  # end the stage once the best induction score reaches this (0: run every step)


PRESETS = {
    # hidden 256, 4 layers (3 sliding + 1 full), vocab 4096: 4.7M params dense, 11M merged; ~32 MB in bf16.
    "full": dict(hidden=256, layers=4, heads=4, ffn=512, vocab=4096, context=256, window=128, public_batch=16,
                 # The induction head forms in a sudden drop of the copy loss whose step depends on the data and on
                 # float rounding (in our builds from inside the copy stage to 650 steps into this one: lab/RESULTS.md),
                 # so the stage runs until the head is found by score; the recovery stage brings the text loss back.
                 public_stages=(Stage("public", 1200, 2e-3, spans=(129, 129)),
                                Stage("public-copy", 400, 1e-3, repeat=0.3, spans=(8, 64), random=True),
                                Stage("public-induction", 1000, 3e-3, final_ratio=1.0, repeat=1.0, random=True,
                                      until_induction=0.3),
                                Stage("public-recover", 600, 2e-3, repeat=0.2, random=True)),
                 expert_rounds=(300, 100, 100), expert_lr=1e-3, expert_batch=32, stats_windows=64, closed_bias=-2.0,
                 router_steps=60, eval_windows=128, out=ROOT / "olmo_lab" / "lab_models",
                 results=ROOT / "lab"),
    "smoke": dict(hidden=64, layers=4, heads=4, ffn=128, vocab=1024, context=64, window=32, public_batch=8,
                  public_stages=(Stage("public", 40, 3e-3, spans=(33, 33)),
                                 Stage("public-copy", 10, 1.5e-3, repeat=0.3, spans=(8, 16), random=True),
                                 Stage("public-induction", 10, 3e-3, final_ratio=1.0, repeat=1.0, spans=(8, 16),
                                       random=True),
                                 Stage("public-recover", 10, 1.5e-3, repeat=0.2, spans=(8, 16), random=True)),
                  expert_rounds=(10, 5), expert_lr=2e-3, expert_batch=8, stats_windows=8, closed_bias=-2.0,
                  router_steps=5, eval_windows=8,
                  out=ROOT / ".cache" / "lab-smoke" / "lab_models", results=ROOT / ".cache" / "lab-smoke"),
}


class WithRepeats(TokenStream):
    """Training windows where a share of the rows is one span written again and again.

    A curriculum aid for the teaching checkpoint: continuing a repeated span needs an induction head
    (a previous-token head plus a head that attends to what followed the earlier copy). Span lengths
    vary per row (from `spans`), so looking back a fixed distance does not work. With `pool`, the
    span is random tokens drawn from `pool` instead of the row's own text, which cannot be predicted
    from memory either -- the synthetic task on which small models learn induction quickly.
    """

    def __init__(self, ids: torch.Tensor, fraction: float, spans: tuple[int, int], pool: torch.Tensor | None = None):
        super().__init__(ids)
        self.fraction, self.spans, self.pool = fraction, spans, pool

    def batch(self, step, batch_size, seq_len, seed=0):
        rows = super().batch(step, batch_size, seq_len, seed)  # (B, S + 1)
        g = torch.Generator().manual_seed(seed * 1_000_003 + step + 1)
        for b in range(round(self.fraction * batch_size)):
            span = int(torch.randint(self.spans[0], self.spans[1] + 1, (), generator=g))
            text = rows[b, :span] if self.pool is None else self.pool[torch.randint(len(self.pool), (span,), generator=g)]
            rows[b] = text.repeat(-(-(seq_len + 1) // span))[:seq_len + 1]
        return rows


def frequent_tokens(stream: TokenStream, vocab: int, n: int = 1000) -> torch.Tensor:
    """The n most frequent ids of a stream (ids a model trained on it has learned embeddings for)."""
    return torch.bincount(stream.ids.long(), minlength=vocab).argsort(descending=True)[:n]


def induction(model: OlmoModel, p: dict, public: TokenStream) -> torch.Tensor:
    """(L, nh) induction scores on 48 random tokens repeated once (fewer if the context is short).

    The tokens are drawn from the 1,000 most frequent tokens of the public mix: ids the public model
    never saw (code or math pieces) have untrained embeddings and would measure nothing.
    """
    pool = frequent_tokens(public, p["vocab"])
    length = min(48, p["context"] // 2)
    ids = pool[repeated_random_tokens(len(pool), length, seed=SEED)]
    return induction_scores(model, ids)


def heads(model: OlmoModel, p: dict, streams: dict) -> tuple[tuple, tuple]:
    """The best previous-token head (on held-out public text) and the best induction head, as (layer, head, score)."""
    ids = streams["public"]["heldout"].windows(p["context"], 16)[:, :-1]
    return best_head(previous_token_scores(model, ids)), best_head(induction(model, p, streams["public"]["train"]))


HEAD_CHECK_EVERY = 50  # steps between the induction probes of a stage with `until_induction`


def bf16_round(model: OlmoModel) -> OlmoModel:
    """The model with every weight rounded to bf16 (what is shipped), kept in fp32 for computing."""
    return model.to(torch.bfloat16).to(torch.float32)


def mean_tail(losses: list[float], n: int = 20) -> float:
    return sum(losses[-n:]) / len(losses[-n:])


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------ stages
def public_model(p: dict, tok, streams: dict, work: Path) -> tuple[OlmoModel, list[int]]:
    """The dense OLMo 3 anchor (3 sliding-window layers + 1 full-attention layer) trained on the public mix,
    and the number of steps each stage took."""
    config = OlmoConfig(model_type="olmo3", vocab_size=p["vocab"], hidden_size=p["hidden"],
                        intermediate_size=p["ffn"], num_hidden_layers=p["layers"], num_attention_heads=p["heads"],
                        max_position_embeddings=p["context"], sliding_window=p["window"],
                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = OlmoModel(config)
    init_weights(model, seed=SEED)
    pool = frequent_tokens(streams["public"]["train"], p["vocab"])
    origin = streams["public"]["train"].ids.numpy().tobytes() + repr(config).encode()  # the ids depend on the tokenizer
    taken = []
    for i, stage in enumerate(p["public_stages"]):
        cfg = TrainConfig(steps=stage.steps, lr=stage.lr, warmup=min(100, stage.steps // 10),
                          min_lr_ratio=stage.final_ratio, batch_size=p["public_batch"], seq_len=p["context"],
                          seed=SEED + i, eval_every=200, checkpoint_every=100, progress=False)

        def found(model, step, stage=stage):
            """The induction probe (the previous-token score is measured on text, which a copy stage unlearns
            for a while: it comes back in the next stage)."""
            if not stage.until_induction or step % HEAD_CHECK_EVERY:
                return False
            score = best_head(induction(model, p, streams["public"]["train"]))[2]
            log(f"{stage.name} step {step}: induction head {score:.3f}")
            return score >= stage.until_induction

        data = WithRepeats(streams["public"]["train"].ids, stage.repeat, stage.spans, pool if stage.random else None)
        # a cached stage must come from this data, tokenizer and model and from these stages: its state
        # continues the ones before it
        key = hashlib.sha256(origin + repr(p["public_stages"][:i + 1]).encode()).hexdigest()[:10]
        result = train(model, data, cfg, eval_data=streams["public"]["heldout"],
                       checkpoint_dir=work / f"{stage.name}-{key}",
                       on_eval=lambda s, l: log(f"{stage.name} step {s}: held-out loss {l:.3f}"), stop_when=found)
        taken.append(result.steps)
        prev, ind = heads(model, p, streams)
        log(f"{stage.name}: {result.steps} steps, final train loss {mean_tail(result.train_loss):.3f}, "
            f"previous-token head {prev[2]:.3f}, induction head {ind[2]:.3f}")
    return bf16_round(model), taken


def expert_model(p: dict, public: OlmoModel, name: str, stats: ResidualStats, streams: dict, work: Path) -> OlmoModel:
    """One data owner's 2-expert model, trained on its own domain only, in rounds (`expert_rounds` steps each).

    The router rows make a Gaussian classifier of the domain from the owner's mean feed-forward input. In the
    first round that mean is measured on the public model. In a merge, though, a layer's input has already
    passed through the experts below it, so before each later round the owner re-measures the mean on its
    own 2-expert model (its expert active in the layers below, as in a merge that routes its tokens to it)
    and the expert trains on with the new rows (a fresh AdamW, warm-up and decay each round). Only the
    owner's data and the public statistics `stats` are used.
    """
    data = streams[name]["train"]
    windows = data.windows(p["window"], p["stats_windows"])[:, :-1]
    owner = None
    for r, steps in enumerate(p["expert_rounds"]):
        with torch.no_grad():
            domain = residual_stats(public if r == 0 else owner, windows)
        rows = gaussian_router_rows(stats, [domain.mean], closed_bias=p["closed_bias"])  # (L, 2, H)
        if r == 0:
            torch.manual_seed(SEED)
            owner = upcycle(public, name, rows, train_router=False)
        else:
            set_router_rows(owner, rows)
        cfg = TrainConfig(steps=steps, lr=p["expert_lr"], warmup=min(30, steps // 5), weight_decay=0.0,
                          batch_size=p["expert_batch"], seq_len=p["window"], seed=SEED + r, checkpoint_every=50,
                          progress=False)
        # a cached state must come from this data and continue from this expert with these rows
        trained = b"".join(w.detach().numpy().tobytes() for w in owner.parameters() if w.requires_grad)
        key = hashlib.sha256(data.ids.numpy().tobytes() + rows.numpy().tobytes() + trained).hexdigest()[:10]
        result = train_expert(owner, data, cfg, checkpoint_dir=work / f"expert-{name}-{r}-{key}")
        log(f"expert {name} round {r}: final train loss {mean_tail(result.train_loss):.3f}")
    return bf16_round(owner)


@torch.no_grad()
def routing_fractions(model: OlmoModel, windows: torch.Tensor) -> list[list[float]]:
    """[layer][expert] share of tokens whose top-1 (highest-weight) expert is that expert."""
    counts = 0
    for i in range(0, len(windows), 16):
        batch = windows[i:i + 16, :-1]
        with trace(model, attention=False, routing=True) as tr:
            model(batch)
        counts = counts + torch.stack([tr.routing[l].usage(top=1) * batch.numel() for l in sorted(tr.routing)])
    return (counts / windows[:, :-1].numel()).tolist()


def evaluate_all(public: OlmoModel, owners: dict, merged: OlmoModel, tuned: OlmoModel, heldout: dict,
                 byte_lengths: torch.Tensor, sparse_k: int) -> dict:
    """Every number of the results table, on held-out windows of every domain."""
    def row(model):
        return {d: bits_per_byte(model, w, byte_lengths) for d, w in heldout.items()}

    rows = {"public dense": row(public)}
    for name, owner in owners.items():
        rows[f"2-expert [{name}] alone"] = row(owner)
    k_all = merged.config.num_experts
    rows[f"merged, top-{k_all} (all)"] = row(merged)
    sparse = merged.config.replace(num_experts_per_tok=sparse_k)
    for block in merged.model.layers:
        block.mlp.top_k = sparse_k
    rows[f"merged, top-{sparse_k}"] = row(merged)
    for block in merged.model.layers:
        block.mlp.top_k = k_all
    for name in owners:
        with experts_off(merged, [name]):
            rows[f"opt-out {name} (top-all)"] = row(merged)
    rows[f"merged + router tuning, top-{k_all}"] = row(tuned)
    routing = {d: routing_fractions(merged, w) for d, w in heldout.items()}
    del sparse

    # Opt-out exactness: opting out j == merging without j (top-k = all and sparse).
    names = list(owners)
    probe = torch.cat([w[:4, :-1] for w in heldout.values()])
    exact = {}
    for j in names:
        rest = [n for n in names if n != j]
        for k in (k_all, sparse_k):
            for block in merged.model.layers:
                block.mlp.top_k = k
            without = merge(public, [owners[n] for n in rest], rest, top_k=min(k, len(rest) + 1))
            with torch.no_grad(), experts_off(merged, [j]):
                diff = (merged(probe).logits - without(probe).logits).abs().max().item()
            exact[f"{j}, top-{k}"] = diff
    for block in merged.model.layers:
        block.mlp.top_k = k_all
    return {"bpb": rows, "routing": routing, "opt_out_max_abs_logit_diff": exact}


def check_targets(res: dict, names: list[str], k_all: int) -> list[tuple[str, bool, str]]:
    """The issue's targets, each with pass/fail and the measured numbers."""
    bpb = res["bpb"]
    merged, public = bpb[f"merged, top-{k_all} (all)"], bpb["public dense"]
    out = []
    for d in names:
        own = bpb[f"2-expert [{d}] alone"][d]
        gap = merged[d] / own - 1
        out.append((f"merged within 5% of the {d} 2-expert model on {d}", gap <= 0.05,
                    f"{merged[d]:.3f} vs {own:.3f} ({gap:+.1%})"))
        gain = 1 - merged[d] / public[d]
        out.append((f"merged >= 10% better than public on {d}", gain >= 0.10,
                    f"{merged[d]:.3f} vs {public[d]:.3f} ({gain:.1%} better)"))
    for j in names:
        opt = bpb[f"opt-out {j} (top-all)"]
        rise = opt[j] / merged[j] - 1
        others = {d: opt[d] / merged[d] - 1 for d in merged if d != j}
        worst = max(others, key=lambda d: abs(others[d]))
        out.append((f"opt-out {j}: {j} loss +15% or more", rise >= 0.15, f"{rise:+.1%}"))
        out.append((f"opt-out {j}: every other domain moves <= 5%", abs(others[worst]) <= 0.05,
                    f"largest: {worst} {others[worst]:+.1%}"))
    worst_diff = max(res["opt_out_max_abs_logit_diff"].values())
    out.append(("opt-out exact (max |logit diff| vs merge without j)", worst_diff <= 1e-6, f"{worst_diff:.2e}"))
    L = len(next(iter(res["routing"].values())))
    middle = range(1, L - 1) if L > 2 else range(L)
    for e, d in enumerate(names, start=1):
        share = min(res["routing"][d][i][e] for i in middle)
        out.append((f"{d}: >= 70% of tokens route to its own expert in the middle layers", share >= 0.70,
                    f"min over layers {list(middle)}: {share:.1%}"))
    return out


# ------------------------------------------------------------------------------------ writing
def results_markdown(res: dict, targets, names: list[str], info: dict) -> str:
    domains = ["public", *names]
    lines = ["# Lab models: results", "",
             "Written by `python -m lab.rebuild` (`make lab-models`); numbers measured on the shipped bf16 weights, "
             "computed in fp32. Held-out loss in **bits per byte** (lower is better), "
             f"{info['eval_tokens']} held-out tokens per domain, windows of {info['window']} tokens.", "",
             "| model | " + " | ".join(domains) + " |", "|---|" + "---|" * len(domains)]
    for model, row in res["bpb"].items():
        lines.append(f"| {model} | " + " | ".join(f"{row[d]:.3f}" for d in domains) + " |")
    lines += ["", "## Targets", "", "| target | met | measured |", "|---|---|---|"]
    lines += [f"| {t} | {'yes' if ok else '**no**'} | {m} |" for t, ok, m in targets]
    lines += ["", "## Routing", "",
              "Share of each domain's held-out tokens whose top-1 expert is each expert, merged model "
              "(top-k = all), as `[" + ", ".join(["public", *names]) + "]` per layer:", "",
              "| domain | " + " | ".join(f"layer {i}" for i in range(len(next(iter(res['routing'].values()))))) + " |",
              "|---|" + "---|" * len(next(iter(res["routing"].values())))]
    for d, layers in res["routing"].items():
        lines.append(f"| {d} | " + " | ".join("[" + ", ".join(f"{x:.2f}" for x in layer) + "]" for layer in layers) + " |")
    lines += ["", "## Opt-out exactness", "",
              "Max |logit difference| between the merged model with expert j opted out and a model merged without j:", ""]
    lines += [f"- {k}: {v:.3g}" for k, v in res["opt_out_max_abs_logit_diff"].items()]
    lines += ["", "## Attention heads of olmo3-lab", "",
              f"- previous-token head: layer {info['prev_head'][0]}, head {info['prev_head'][1]}, "
              f"score {info['prev_head'][2]:.3f} (mean attention to position i-1 on held-out public text)",
              f"- induction head: layer {info['ind_head'][0]}, head {info['ind_head'][1]}, "
              f"score {info['ind_head'][2]:.3f} (mean attention to the token after the earlier copy, "
              "on random token sequences repeated once)", "",
              "## Run", "", f"- preset `{info['preset']}`, seed {SEED}, {info['threads']} threads, "
              f"{info['minutes']:.1f} minutes", ""]
    return "\n".join(lines)


def model_card(kind: str, info: dict, res: dict, names: list[str], manifest: dict) -> str:
    sources = [f"- **{d}**: " + "; ".join(f"{s['package']} ({s['licence']}"
                                      + (f"; {s['part']})" if "part" in s else ")") for s in m["sources"])
               + f" -- {m['train']['chars']:,} training chars, {m['heldout']['chars']:,} held out"
               for d, m in manifest["domains"].items()]
    bpb = res["bpb"]
    domains = ["public", *names]
    table = ["| model | " + " | ".join(domains) + " |", "|---|" + "---|" * len(domains)]
    keep = ["public dense"] if kind == "olmo3" else list(bpb)
    table += [f"| {m} | " + " | ".join(f"{bpb[m][d]:.3f}" for d in domains) + " |" for m in keep]
    if kind == "olmo3":
        head = ["# olmo3-lab", "",
                "A small **OLMo 3** model trained from scratch by olmo-lab on the public mix, for teaching: "
                f"{info['layers']} layers (sliding window {info['window']} tokens on layers "
                f"{info['sliding']}, full attention on {info['full']}), hidden {info['hidden']}, "
                f"{info['heads']} heads, vocab {info['vocab']} (byte-level BPE trained on the lab mix), "
                f"context {info['context']}, {info['dense_params']:,} parameters, stored in bf16.", "",
                "## Attention structure (found by score)", "",
                f"- previous-token head: layer {info['prev_head'][0]}, head {info['prev_head'][1]}, score "
                f"{info['prev_head'][2]:.3f}", f"- induction head: layer {info['ind_head'][0]}, head "
                f"{info['ind_head'][1]}, score {info['ind_head'][2]:.3f}",
                "- functions: `olmo_lab.heads.previous_token_scores`, `olmo_lab.heads.induction_scores`", "",
                "## Training", "", f"AdamW (β 0.9/0.95, wd 0.1), grad-clip 1.0, batches of {info['public_batch']} × "
                f"{info['context']} tokens, seed {SEED}, in stages (each a warm-up, then cosine decay to the final lr). "
                "Some windows are one span written again and again: a span of public text, or random tokens drawn "
                "from the 1,000 most frequent public tokens.", "",
                "| stage | steps | lr | final lr | windows repeating a span | span lengths (tokens) |",
                "|---|---|---|---|---|---|",
                *[f"| {s['name']} | {taken}" + (f" (until the induction score is >= {s['until_induction']:g}, at "
                                                 f"most {s['steps']})" if s["until_induction"] else "")
                  + f" | {s['lr']:g} | {s['lr'] * s['final_ratio']:g} | {s['repeat']:.0%} "
                  f"({'random tokens' if s['random'] else 'text'}) | {s['spans'][0]}-{s['spans'][1]} |"
                  for s, taken in zip(info["public_stages"], info["stage_steps"])],
                "", "Natural-text repeats alone gave no induction head in our budget (score about 0.01 after the "
                "first stage), so the head is trained in by the synthetic copy task: it forms in a sudden drop of "
                "the copy loss (the phase change of Olsson et al., 2022); the last stage "
                "brings the text loss back while still practising copying. When the drop comes depends on the "
                "data and on float rounding (in our builds, from inside the copy stage to 650 steps into the induction "
                "stage), so that stage runs until the "
                "induction head is found by score, and `make lab-models` pins the CPU's float kernels (AVX2 in ATen, MKL "
                "and oneDNN) so that other x86-64 machines round the same way (`lab/RESULTS.md`, \"Time and "
                "reproducibility\")."]
    else:
        head = ["# flexolmo-lab", "",
                "A small **FlexOlmo** model built by olmo-lab with the FlexOlmo recipe: the public expert is "
                "olmo3-lab's feed-forward, and each closed-domain expert was trained independently by its "
                f"'data owner' on its own domain only, then all were merged without joint training. Experts, "
                f"in router order: {', '.join(['public', *names])}; top-k = all ({len(names) + 1}); no router bias "
                f"term (transformers' FlexOlmo has none; the paper's negative bias is folded into the router rows); "
                f"{info['moe_params']:,} parameters, bf16. FlexOlmo has full "
                f"attention only, so it is trained and evaluated at contexts up to {info['window']} tokens "
                "(olmo3-lab's window), where it computes exactly what olmo3-lab's layers compute.", "",
                "## Recipe", "",
                "1. Public anchor = olmo3-lab.",
                "2. Per domain: upcycle to 2 experts [public (frozen), copy]; freeze embeddings, attention, norms, "
                "LM head, the public expert and the router (requires_grad=False); top-2 of 2. Router rows from domain embeddings where the "
                "embedder is the model itself (a document's embedding at layer l = the mean of its "
                "feed-forward inputs; the paper's GritLM-7B is not available offline and its space is unrelated "
                "to this model's hidden states): with the public text's covariance S, row i = S⁻¹μᵢ with the "
                "constant −μᵢ·S⁻¹μᵢ/2 folded along the public mean, so the router is a Gaussian classifier of "
                "the domain and each owner's row needs only its own data "
                f"(`olmo_lab.flexolmo.gaussian_router_rows`), plus the paper's negative bias {info['closed_bias']} on "
                "each closed expert, folded the same way. The rows are not trained: "
                "rows trained against the public row alone learned 'not public' and, merged, one row won "
                "every token (an earlier run).",
                f"3. Train each expert in rounds of {' + '.join(map(str, info['expert_rounds']))} steps of "
                f"{info['expert_batch']} × {info['window']} tokens of its own domain, lr {info['expert_lr']}, no weight "
                "decay. The first round's rows use the domain mean measured on the public model. Before each later "
                "round the owner re-measures it on its own 2-expert model, where its expert has already changed "
                "the layers below (as in a merge that routes its tokens to it), and rebuilds its rows from it.",
                "4. Merge: stack router rows and expert FFNs; shared weights asserted bit-identical.",
                "5. Opt-out (`olmo_lab.experts_off(model, ['math'])`) equals a merge without that expert (checked).",
                "Router tuning is measured in the results but **not** applied to this checkpoint (it would weaken "
                "the strict opt-out guarantee)."]
    return "\n".join(head + ["", "## Data", "", "Real text, all installed offline from package registries "
                             "(sources, licences and sha256 in `lab/data_manifest.json`; the text is not shipped):", ""]
                     + sources + ["", "## Held-out bits per byte", ""] + table
                     + ["", "Full results: `lab/RESULTS.md`. Rebuild: `make lab-models`.", ""])


# ------------------------------------------------------------------------------------ main
def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if args.preset == "full" and "ATEN_CPU_CAPABILITY" not in os.environ:
        parser.error("run the full rebuild with `make lab-models`: it pins the CPU's float kernels, so "
                     "that other machines round the same way")
    torch.set_num_threads(args.threads)
    started = time.time()
    log("building data")
    manifest = build_data.build()
    docs = {d: {part: build_data.read_docs(d, part) for part in ("train", "heldout")} for d in build_data.DOMAINS}
    return build(dict(PRESETS[args.preset], preset=args.preset, threads=args.threads), docs, manifest,
                 ROOT / ".cache" / "lab-build" / args.preset, started)


def build(p: dict, docs: dict, manifest: dict, work: Path, started: float) -> dict:
    """Everything after the data: tokenizer, public model, experts, merge, evaluation, and the files written.

    docs: {domain: {"train" | "heldout": [text]}} for "public" and every closed domain; p: a preset plus its
    name (`preset`) and `threads`; work: where training states are cached."""
    tok = train_bpe_tokenizer([t for d in docs.values() for t in d["train"]], p["vocab"])
    byte_lengths = token_byte_lengths(tok)
    streams = {d: {part: TokenStream.from_texts(tok, texts) for part, texts in parts.items()} for d, parts in docs.items()}
    log("tokenizer: " + ", ".join(f"{d} {len(s['train']):,} tokens" for d, s in streams.items()))

    public, stage_steps = public_model(p, tok, streams, work)
    prev, ind = heads(public, p, streams)
    log(f"previous-token head {prev}, induction head {ind}")

    # Public statistics (anyone can compute them); each owner adds only its own domain's mean.
    stats = residual_stats(public, streams["public"]["train"].windows(p["window"], p["stats_windows"])[:, :-1])
    owners = {name: expert_model(p, public, name, stats, streams, work) for name in CLOSED}
    merged = merge(public, [owners[n] for n in CLOSED], CLOSED)
    merged = bf16_round(merged)

    log("router tuning (evaluation only; not shipped)")
    tuned = merge(public, [owners[n] for n in CLOSED], CLOSED)
    mix = TokenStream(torch.cat([streams[d]["train"].ids[:15_000] for d in ["public", *CLOSED]]))
    tune_router(tuned, mix, TrainConfig(steps=p["router_steps"], lr=2e-3, warmup=5, weight_decay=0.0,
                                        batch_size=16, seq_len=p["window"], seed=SEED, progress=False))

    log("evaluating")
    heldout = {d: streams[d]["heldout"].windows(p["window"], p["eval_windows"]) for d in ["public", *CLOSED]}
    res = evaluate_all(public, owners, merged, tuned, heldout, byte_lengths, sparse_k=2)
    targets = check_targets(res, CLOSED, merged.config.num_experts)
    info = dict(p, minutes=(time.time() - started) / 60,
                public_stages=[asdict(s) for s in p["public_stages"]], stage_steps=stage_steps,
                prev_head=prev, ind_head=ind, eval_tokens=heldout["public"][:, 1:].numel(),
                sliding=[i for i, t in enumerate(public.config.layer_types) if t == "sliding_attention"],
                full=[i for i, t in enumerate(public.config.layer_types) if t == "full_attention"],
                dense_params=public.num_parameters(), moe_params=merged.num_parameters())
    info.pop("out"), info.pop("results")

    out = Path(p["out"])
    for name, model, kind in (("olmo3-lab", public, "olmo3"), ("flexolmo-lab", merged, "flex")):
        target = out / name
        if target.exists():
            shutil.rmtree(target)
        save_model(model.to(torch.bfloat16), target, tokenizer=tok)
        model.to(torch.float32)
        (target / "README.md").write_text(model_card(kind, info, res, CLOSED, manifest), encoding="utf-8")
        load_model(target)  # the shipped files load back
    results_dir = Path(p["results"])
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "RESULTS.md").write_text(results_markdown(res, targets, CLOSED, info), encoding="utf-8")
    if results_dir == ROOT / "lab":  # the package ships a copy, shown by olmo_lab.lab.results_markdown()
        (p["out"] / "RESULTS.md").write_text(results_markdown(res, targets, CLOSED, info), encoding="utf-8")
    (results_dir / "results.json").write_text(json.dumps(
        {**res, "targets": [{"target": t, "met": ok, "measured": m} for t, ok, m in targets],
         "heads": {"previous_token": prev, "induction": ind}, "run": {k: v for k, v in info.items()}},
        indent=2) + "\n", encoding="utf-8")
    log(f"done in {(time.time() - started) / 60:.1f} min; results in {results_dir / 'RESULTS.md'}")
    return res


if __name__ == "__main__":
    main()
