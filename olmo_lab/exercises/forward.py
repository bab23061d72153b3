"""Exercise 5, the whole forward pass: a module `MyOlmo(config)` whose `forward(input_ids)` returns logits.

Its parameters carry the checkpoint names (model.embed_tokens, model.layers.{i}.self_attn.q_proj, ...,
model.norm, lm_head), so the checker loads the shipped olmo3-lab weights into it, and random weights
of a tiny config with YaRN and GQA. When the logits are right it also generates greedily with the
student's model and compares the text with the library's `generate`. When they are wrong and no
known mistake fits, it hooks `model.layers[i]` of both models and reports the first layer and
position whose output differs.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch

from ..modeling.generate import generate
from ..recipe.lab import lab_model, samples
from ..modeling.model import OlmoModel
from ..checkpoints.tokenizer import load_tokenizer
from .attention import Layer, attend
from .block import post_norm, pre_norm
from .grading import Case, Mistake, Verdict, grade, same
from .rope import tables, yarn_config
from .weights import lab_library_model, load_named


@dataclass
class Setup:
    """A library model whose weights the student's model receives."""

    name: str
    model: OlmoModel

    def __repr__(self):
        return self.name


def run_model(model: OlmoModel, ids, *, block=post_norm, yarn_layers: str = "full", final_norm: bool = True,
              **attention_switches):
    """The logits of `model` recomputed from its parts, with switches for the known mistakes (defaults: correct)."""
    config = model.config
    x = model.model.embed_tokens(ids)  # (B, S, H)
    cos_sin = tables(config, torch.arange(ids.shape[1])[None], yarn_layers=yarn_layers)
    for i, b in enumerate(model.model.layers):
        layer = Layer(config, i, b.self_attn.state_dict(), *cos_sin[config.layer_types[i]])
        x = block(x, lambda h: attend(layer, h, **attention_switches), b.mlp,
                  b.post_attention_layernorm, b.post_feedforward_layernorm)
    return model.lm_head(model.model.norm(x) if final_norm else x)


MISTAKES = [
    Mistake("pre_norm", "norms in pre-norm position: OLMo's blocks are h = x + norm(attn(x)), y = h + norm(mlp(h))",
            lambda s, ids: run_model(s.model, ids, block=pre_norm)),
    Mistake("yarn_on_sliding", "YaRN on the sliding-window layers: they use plain RoPE; YaRN is for full-attention "
            "layers only", lambda s, ids: run_model(s.model, ids, yarn_layers="all")),
    Mistake("yarn_nowhere", "no YaRN on the full-attention layers, although the config asks for it",
            lambda s, ids: run_model(s.model, ids, yarn_layers="none")),
    Mistake("window_w_minus_1", "sliding window off by one: W-1 keys per query instead of W (itself included)",
            lambda s, ids: run_model(s.model, ids, window_shift=-1)),
    Mistake("window_w_plus_1", "sliding window off by one: W+1 keys per query instead of W (itself included)",
            lambda s, ids: run_model(s.model, ids, window_shift=1)),
    Mistake("window_on_full_layers", "the sliding window is applied on the full-attention layers too",
            lambda s, ids: run_model(s.model, ids, window_on_full=True)),
    Mistake("qk_norm_per_head", "QK-norm per head instead of over the full projected q and k vectors",
            lambda s, ids: run_model(s.model, ids, qk_norm="per_head")),
    Mistake("kv_heads_tiled", "grouped KV heads in the wrong order: query head h uses kv head h // groups",
            lambda s, ids: run_model(s.model, ids, kv_heads="tile")),
    Mistake("no_final_norm", "the final norm (model.norm) is missing before the LM head",
            lambda s, ids: run_model(s.model, ids, final_norm=False)),
]


def random_model() -> OlmoModel:
    torch.manual_seed(5)
    model = OlmoModel(yarn_config())
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.data = 1 + 0.5 * torch.randn_like(p)
    return model.eval()


def lab_text_ids(n: int) -> torch.Tensor:
    """(1, n) token ids of olmo3-lab's tokenizer over the shipped public-domain samples."""
    tok = load_tokenizer(lab_model("olmo3-lab"))
    text = "\n".join(samples()["public"]["texts"])
    return torch.tensor([tok.encode(text)[:n]])


@cache
def cases() -> list[Case]:
    g = torch.Generator().manual_seed(5)
    return [
        Case("a random tiny OLMo 3 (GQA 4/2, window 4, YaRN on layer 3), batch 2 x 12 tokens",
             (Setup("random tiny OLMo 3", random_model()), torch.randint(0, 64, (2, 12), generator=g))),
        Case("olmo3-lab on 150 tokens of text (window 128)",
             (Setup("olmo3-lab", lab_library_model("olmo3-lab")), lab_text_ids(150))),
    ]


def build_student(model_cls, setup: Setup):
    return load_named(model_cls(setup.model.config), setup.model.state_dict(), "the library's model").eval()


def first_divergence(student, setup: Setup, ids) -> str:
    """The first stage (embedding, block i, final norm) whose output differs, at which position, by how much."""
    config = setup.model.config
    stages = [("embedding", "model.embed_tokens")] + [
        (f"block {i} ({config.layer_types[i]})", f"model.layers.{i}") for i in range(config.num_hidden_layers)] + [
        ("final norm", "model.norm")]
    outputs = {}

    def record(model, key):
        handles = []
        for stage, path in stages:
            module = model.get_submodule(path)
            handles.append(module.register_forward_hook(
                lambda m, a, out, stage=stage: outputs.setdefault((key, stage), out)))
        return handles

    handles = record(student, "yours") + record(setup.model, "library")
    try:
        with torch.no_grad():
            student(ids), setup.model(ids)
    finally:
        for h in handles:
            h.remove()
    for stage, _ in stages:
        yours, lib = outputs.get(("yours", stage)), outputs.get(("library", stage))
        if not isinstance(yours, torch.Tensor):
            return f"{stage} of your model did not run (or returned no tensor)"
        if yours.shape != lib.shape or not same(yours, lib):
            if yours.shape != lib.shape:
                return f"{stage} output has shape {tuple(yours.shape)}, expected {tuple(lib.shape)}"
            diff = (yours.float() - lib.float()).abs().amax(dim=(0, 2))  # (S,) per position
            bad = (diff > 1e-5 * lib.abs().max()).nonzero()
            pos = int(bad[0]) if len(bad) else int(diff.argmax())
            return (f"{stage} output is the first to differ, from position {pos} of {ids.shape[1]} "
                    f"(max |difference| {diff.max().item():.3g})")
    return "every stage agrees; the LM head differs"


def check_model(model_cls, prompt: str = "The letters of the", max_new_tokens: int = 12) -> Verdict:
    """Exercise 5: grade `model_cls(config)`, whose forward(input_ids (B, S)) returns logits (B, S, V)."""
    def student_run(setup, ids):
        return build_student(model_cls, setup)(ids)
    verdict = grade("whole model", student_run, lambda s, ids: s.model(ids).logits, cases(), MISTAKES)
    if verdict.status == "diverges":
        for case in cases():
            setup, ids = case.args
            with torch.no_grad():
                if not same(student_run(setup, ids), setup.model(ids).logits):
                    verdict.message = f"on {case.name}: " + first_divergence(
                        build_student(model_cls, setup), setup, ids)
                    break
    if not verdict.correct:
        return verdict
    setup = cases()[1].args[0]
    tok = load_tokenizer(lab_model("olmo3-lab"))
    student = build_student(model_cls, setup)
    ids = torch.tensor([tok.encode(prompt)])
    with torch.no_grad():
        for _ in range(max_new_tokens):  # greedy, recomputing the whole sequence each step (no cache yet)
            ids = torch.cat([ids, student(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    yours = tok.decode(ids[0, -max_new_tokens:].tolist())
    library = generate(setup.model, tok, prompt, max_new_tokens=max_new_tokens)
    if yours != library:
        return Verdict("whole model", "diverges", f"the logits agree, but greedy generation differs: yours "
                       f"{yours!r}, library {library!r}")
    verdict.message += f"\n  greedy generation with your model agrees with the library's: {prompt!r} -> {yours!r}"
    return verdict
