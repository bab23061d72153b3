"""Exercise 4, the post-norm block: `block(x, attn, mlp, post_attention_layernorm, post_feedforward_layernorm)`.

attn and mlp are callables (B, S, H) -> (B, S, H); the two norms are modules. OLMo 3 and FlexOlmo
put the norms on the *outputs* of attention and MLP, before each residual add; nothing normalises
the block's input. The cases: a random OLMo 3 layer, olmo3-lab's layer 1, and flexolmo-lab's layer 0
(whose feed-forward is the mixture of experts).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch

from ..modeling.attention import build_mask
from ..modeling.model import Block
from ..modeling.rope import RotaryEmbedding
from .grading import Case, Mistake, Verdict, grade
from .rope import yarn_config
from .weights import lab_library_model, lab_weights


@dataclass
class Parts:
    """A library block cut into the four things the student's function receives."""

    block: Block
    cos_sin: tuple
    mask: object

    def __repr__(self):
        return f"block {self.block.layer_idx}"

    def attn(self, x):
        return self.block.self_attn(x, self.cos_sin, self.mask)

    def args(self):
        b = self.block
        return self.attn, b.mlp, b.post_attention_layernorm, b.post_feedforward_layernorm


def parts(block: Block, config, seq: int) -> Parts:
    cos_sin = RotaryEmbedding(config)(torch.arange(seq)[None])[config.layer_types[block.layer_idx]]
    return Parts(block, cos_sin, build_mask(1, seq, 0, config.window(block.layer_idx), None, "cpu"))


def reference(p: Parts, x):
    return p.block(x, p.cos_sin, p.mask)


def post_norm(x, attn, mlp, post_attention_layernorm, post_feedforward_layernorm):
    """The library's block as a function of its parts."""
    h = x + post_attention_layernorm(attn(x))
    return h + post_feedforward_layernorm(mlp(h))


def pre_norm(x, attn, mlp, n1, n2):
    h = x + attn(n1(x))
    return h + mlp(n2(h))


def _norm_after_residual(x, attn, mlp, n1, n2):  # the original Transformer's post-LN
    h = n1(x + attn(x))
    return n2(h + mlp(h))


def _norms_swapped(x, attn, mlp, n1, n2):
    return post_norm(x, attn, mlp, n2, n1)


def _parallel(x, attn, mlp, n1, n2):
    return x + n1(attn(x)) + n2(mlp(x))


def _no_norms(x, attn, mlp, n1, n2):
    h = x + attn(x)
    return h + mlp(h)


def _on_parts(fn):
    return lambda p, x: fn(x, *p.args())


MISTAKES = [
    Mistake("pre_norm", "norms in pre-norm position (x + attn(norm(x))): OLMo normalises the outputs, "
            "h = x + norm(attn(x)), y = h + norm(mlp(h))", _on_parts(pre_norm)),
    Mistake("norm_after_residual", "the norms are applied after the residual adds (the original Transformer's "
            "post-LN); OLMo adds the normalised output to the raw residual stream", _on_parts(_norm_after_residual)),
    Mistake("norms_swapped", "the two norms are swapped: post_attention_layernorm goes on attention's output, "
            "post_feedforward_layernorm on the MLP's", _on_parts(_norms_swapped)),
    Mistake("parallel_block", "the MLP reads the block input x; it reads h = x + norm(attn(x))", _on_parts(_parallel)),
    Mistake("no_norms", "the norms are missing", _on_parts(_no_norms)),
]


@cache
def cases() -> list[Case]:
    g = torch.Generator().manual_seed(4)
    cfg = yarn_config()
    torch.manual_seed(4)
    block = Block(cfg, 0)
    for norm in (block.post_attention_layernorm, block.post_feedforward_layernorm):
        norm.weight.data = 1 + 0.5 * torch.randn_like(norm.weight)
    emb = {name: lab_weights(name)["model.embed_tokens.weight"][torch.arange(5, 4000, 131)[None]].float()
           for name in ("olmo3-lab", "flexolmo-lab")}  # (1, 31, H)
    olmo, flex = lab_library_model("olmo3-lab"), lab_library_model("flexolmo-lab")
    return [
        Case("random OLMo 3 block (sliding layer), 6 tokens", (parts(block, cfg, 6), torch.randn(1, 6, 32, generator=g))),
        Case("olmo3-lab block 1 on 31 token embeddings", (parts(olmo.model.layers[1], olmo.config, 31), emb["olmo3-lab"])),
        Case("flexolmo-lab block 0 (mixture of experts) on 31 token embeddings",
             (parts(flex.model.layers[0], flex.config, 31), emb["flexolmo-lab"])),
    ]


def check_block(block_fn) -> Verdict:
    """Exercise 4: grade `block_fn(x, attn, mlp, post_attention_layernorm, post_feedforward_layernorm) -> y`."""
    return grade("post-norm block", lambda p, x: block_fn(x, *p.args()), reference, cases(), MISTAKES)
