"""The exercise checkers (olmo_lab.exercises): the library's own code and the notebook's solutions pass,
each listed mistake, planted in code written the way a student would write it, is named, an unlisted
mistake gets the place where the outputs diverge, and a blank gets "not done yet"."""

import functools
import math
import os
import re
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from olmo_lab import exercises
from olmo_lab.attention import Attention, build_mask
from olmo_lab.cache import KVCache
from olmo_lab.exercises.cache import library_mask
from olmo_lab.model import Block, OlmoModel
from olmo_lab.moe import MoE
from olmo_lab.norm import RMSNorm
from olmo_lab.rope import RotaryEmbedding, apply_rope

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = os.path.join(ROOT, "notebooks", "exercises", "src")


def named(verdict, key):
    assert verdict.status == "mistake" and verdict.mistake == key, verdict
    return True


def solution(name: str) -> dict:
    """The namespace of an exercise notebook's solution code (its check calls removed)."""
    with open(os.path.join(SOURCES, name + ".py"), encoding="utf-8") as f:
        code = re.sub(r"^exercises\.check_\w+\(.*\)$", "", f.read(), flags=re.M)
    namespace = {}
    exec(compile(code, name, "exec"), namespace)
    return namespace


@functools.cache
def solution_attention():
    """The e1 notebook's Attention class (its __init__ holds the parameters, named as the library's)."""
    return solution("e1_build_olmo3")["Attention"]


@pytest.fixture(scope="module")
def e1():
    return solution("e1_build_olmo3")


# ------------------------------------------------------------------------------------ 1 RMSNorm
def library_rms_norm(x, weight, eps):
    norm = RMSNorm(weight.shape[0], eps).to(weight.dtype)
    norm.weight.data = weight
    return norm(x)


def test_rms_norm_correct_and_blank(e1):
    assert exercises.check_rms_norm(library_rms_norm).correct
    assert exercises.check_rms_norm(e1["rms_norm"]).correct

    def blank(x, weight, eps):
        raise NotImplementedError("your code here")
    assert repr(exercises.check_rms_norm(blank)) == "· RMSNorm: not done yet"


def test_rms_norm_mistakes():
    def no_upcast(x, w, eps):
        return w * x / torch.sqrt((x * x).mean(dim=-1, keepdim=True) + eps)

    def llama(x, w, eps):
        h = x.float()
        return w * (h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)

    def one_plus(x, w, eps):
        h = x.float()
        return ((1.0 + w.float()) * h * torch.rsqrt(h.square().mean(-1, keepdim=True) + eps)).to(x.dtype)

    def eps_outside(x, w, eps):
        h = x.float()
        return (w * h / (h.norm(dim=-1, keepdim=True) / math.sqrt(h.shape[-1]) + eps)).to(x.dtype)

    def l2(x, w, eps):
        h = x.float()
        return (w * h / torch.sqrt(h.pow(2).sum(-1, keepdim=True) + eps)).to(x.dtype)

    def layer_norm(x, w, eps):
        return F.layer_norm(x.float(), x.shape[-1:], w.float(), None, eps).to(x.dtype)

    for fn, key in [(no_upcast, "no_fp32_upcast"), (llama, "llama_order"), (one_plus, "one_plus_weight"),
                    (eps_outside, "eps_outside_sqrt"), (l2, "sum_not_mean"), (layer_norm, "subtracts_mean")]:
        assert named(exercises.check_rms_norm(fn), key)


def test_unknown_mistake_reports_where_it_diverges():
    def half_gain(x, w, eps):
        return library_rms_norm(x, w * 0.5, eps)
    v = exercises.check_rms_norm(half_gain)
    assert v.status == "diverges"
    assert v.message.startswith("on fp32 random input (2, 5, 64): first differs at index [0, 0, 0]: yours ")
    assert "max |difference|" in v.message and "in 100% of the entries" in v.message

    def crashes(x, w, eps):
        return x @ w[:3]
    v = exercises.check_rms_norm(crashes)
    assert v.status == "error" and "your code raised RuntimeError" in v.message

    def forgets_return(x, w, eps):
        library_rms_norm(x, w, eps)
    v = exercises.check_rms_norm(forgets_return)
    assert v.status == "error" and "your code's output: expected tensors, got NoneType" in v.message, v


# ------------------------------------------------------------------------------------ 2 RoPE
def test_apply_rope(e1):
    assert exercises.check_apply_rope(apply_rope).correct
    assert exercises.check_apply_rope(e1["apply_rope"]).correct

    def rope(rotate, tables_cast=False, swap=False):
        def fn(x, cos, sin):
            c, s = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, S, hd)
            if tables_cast:
                c, s = c.to(x.dtype), s.to(x.dtype)
            if swap:
                c, s = s, c
            return (x * c + rotate(x) * s).to(x.dtype)
        return fn

    def halves(x):
        x1, x2 = x.chunk(2, dim=-1)
        return x1, x2
    gptj = lambda x: torch.stack((-x[..., 1::2], x[..., ::2]), -1).reshape(x.shape)  # noqa: E731
    reversed_ = lambda x: torch.cat((halves(x)[1], -halves(x)[0]), -1)  # noqa: E731
    no_minus = lambda x: torch.cat((halves(x)[1], halves(x)[0]), -1)  # noqa: E731
    right = lambda x: torch.cat((-halves(x)[1], halves(x)[0]), -1)  # noqa: E731
    assert exercises.check_apply_rope(rope(right)).correct
    assert named(exercises.check_apply_rope(rope(gptj)), "interleaved_pairs")
    assert named(exercises.check_apply_rope(rope(reversed_)), "rotation_reversed")
    assert named(exercises.check_apply_rope(rope(no_minus)), "rotate_half_no_minus")
    assert named(exercises.check_apply_rope(rope(right, tables_cast=True)), "tables_in_model_dtype")
    assert named(exercises.check_apply_rope(rope(right, swap=True)), "sin_cos_swapped")


def student_tables(yarn_on="full", factor_on=True, interleave=False, truncate=True, reverse=False):
    """rope_tables written from the formulas, with one planted mistake at a time."""
    def fn(config, position_ids):
        hd, out = config.head_dim, {}
        for layer_type in set(config.layer_types):
            rope = config.rope[layer_type]
            yarn = next((r for r in config.rope.values() if r.rope_type == "yarn"), None)
            use = yarn is not None and (yarn_on == "all" or (yarn_on == "full" and rope.rope_type == "yarn"))
            rope = yarn if use else rope
            base = rope.theta ** (torch.arange(hd // 2, dtype=torch.float32) * 2 / hd)
            inv, scale = 1 / base, 1.0
            if use:
                corr = [hd * math.log(rope.original_max_position_embeddings / (b * 2 * math.pi))
                        / (2 * math.log(rope.theta)) for b in (rope.beta_fast, rope.beta_slow)]
                lo, hi = (math.floor(corr[0]), math.ceil(corr[1])) if truncate else corr
                lo, hi = max(lo, 0), min(hi, hd - 1)
                ramp = ((torch.arange(hd // 2).float() - lo) / (hi - lo)).clamp(0, 1)
                if reverse:
                    ramp = 1 - ramp
                inv = ramp / (rope.factor * base) + (1 - ramp) / base
                if factor_on:
                    scale = rope.attention_factor or 1 + 0.1 * math.log(rope.factor)
            angles = position_ids.float().unsqueeze(-1) * inv
            emb = angles.repeat_interleave(2, -1) if interleave else angles.repeat(1, 1, 2)
            out[layer_type] = (scale * emb.cos(), scale * emb.sin())
        return out
    return fn


def test_rope_tables(e1):
    assert exercises.check_rope_tables(lambda c, p: RotaryEmbedding(c)(p)).correct
    assert exercises.check_rope_tables(e1["rope_tables"]).correct
    assert exercises.check_rope_tables(student_tables()).correct
    assert named(exercises.check_rope_tables(student_tables(yarn_on="all")), "yarn_on_sliding")
    assert named(exercises.check_rope_tables(student_tables(yarn_on="none")), "yarn_nowhere")
    assert named(exercises.check_rope_tables(student_tables(factor_on=False)), "no_attention_factor")
    assert named(exercises.check_rope_tables(student_tables(interleave=True)), "interleaved_tables")
    assert named(exercises.check_rope_tables(student_tables(truncate=False)), "ramp_not_truncated")
    assert named(exercises.check_rope_tables(student_tables(reverse=True)), "ramp_reversed")


# ------------------------------------------------------------------------------------ 3 attention
class LibraryAttention(Attention):
    """The library's attention, called as the exercise calls it."""

    def forward(self, x, cos, sin):
        return super().forward(x, (cos, sin), build_mask(x.shape[0], x.shape[1], 0, self.window, None, x.device))


def student_attention(per_head=False, norm_after_rope=False, no_norm=False, keys_seen=0, window_everywhere=False,
                      windowless=False, tiled=False, causal=True, scaled=True):
    """An attention module written with SDPA and a boolean mask, with one planted mistake at a time."""
    class StudentAttention(solution_attention()):  # the notebook's parameters; its own forward
        def __init__(self, config, layer_idx):
            super().__init__(config, layer_idx)
            self.nh, self.nkv, self.hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
            self.window = config.window(layer_idx) or (config.sliding_window if window_everywhere else None)

        def norm(self, t, module, n):  # t (B, S, n*hd)
            if no_norm:
                return t
            if per_head:
                h = t.view(*t.shape[:2], n, self.hd)
                h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + module.eps)
                return h.flatten(2) * module.weight
            return module(t)

        def forward(self, x, cos, sin):
            B, S, _ = x.shape
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
            if not norm_after_rope:
                q, k = self.norm(q, self.q_norm, self.nh), self.norm(k, self.k_norm, self.nkv)
            q, k, v = (t.unflatten(-1, (-1, self.hd)).permute(0, 2, 1, 3) for t in (q, k, v))  # (B, n, S, hd)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            if norm_after_rope:
                q = self.q_norm(q.permute(0, 2, 1, 3).flatten(2)).unflatten(-1, (-1, self.hd)).permute(0, 2, 1, 3)
                k = self.k_norm(k.permute(0, 2, 1, 3).flatten(2)).unflatten(-1, (-1, self.hd)).permute(0, 2, 1, 3)
            groups = self.nh // self.nkv
            k, v = ((t.repeat(1, groups, 1, 1) if tiled else t.repeat_interleave(groups, 1)) for t in (k, v))
            mask = torch.ones(S, S, dtype=torch.bool).tril() if causal else torch.ones(S, S, dtype=torch.bool)
            if self.window and not windowless:
                mask = mask & torch.ones(S, S, dtype=torch.bool).triu(-(self.window - 1 + keys_seen))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=None if scaled else 1.0)
            return self.o_proj(out.transpose(1, 2).flatten(2))
    return StudentAttention


def test_attention(e1):
    assert exercises.check_attention(LibraryAttention).correct
    assert exercises.check_attention(e1["Attention"]).correct
    assert exercises.check_attention(student_attention()).correct
    for kwargs, key in [({"per_head": True}, "qk_norm_per_head"), ({"norm_after_rope": True}, "qk_norm_after_rope"),
                        ({"no_norm": True}, "no_qk_norm"), ({"keys_seen": -1}, "window_w_minus_1"),
                        ({"keys_seen": 1}, "window_w_plus_1"), ({"window_everywhere": True}, "window_on_full_layers"),
                        ({"windowless": True}, "no_window"), ({"tiled": True}, "kv_heads_tiled"),
                        ({"causal": False}, "no_causal_mask"), ({"scaled": False}, "no_scale")]:
        assert named(exercises.check_attention(student_attention(**kwargs)), key)


# ------------------------------------------------------------------------------------ 4 block
def library_block(x, attn, mlp, post_attention_layernorm, post_feedforward_layernorm):
    """Block.forward itself, on the parts it is given."""
    parts = types.SimpleNamespace(self_attn=lambda h, cos_sin, mask, cache: attn(h), mlp=mlp, _hooks=None,
                                  post_attention_layernorm=post_attention_layernorm, layer_idx=0,
                                  post_feedforward_layernorm=post_feedforward_layernorm)
    return Block.forward(parts, x, None, None)


def test_block(e1):
    assert exercises.check_block(library_block).correct
    assert exercises.check_block(e1["block"]).correct
    plants = {
        "pre_norm": lambda x, a, m, n1, n2: (lambda h: h + m(n2(h)))(x + a(n1(x))),
        "norm_after_residual": lambda x, a, m, n1, n2: (lambda h: n2(h + m(h)))(n1(x + a(x))),
        "norms_swapped": lambda x, a, m, n1, n2: (lambda h: h + n1(m(h)))(x + n2(a(x))),
        "parallel_block": lambda x, a, m, n1, n2: x + n1(a(x)) + n2(m(x)),
        "no_norms": lambda x, a, m, n1, n2: (lambda h: h + m(h))(x + a(x)),
    }
    for key, fn in plants.items():
        assert named(exercises.check_block(fn), key)


# ------------------------------------------------------------------------------------ 5 whole model
class LibraryModel(OlmoModel):
    def forward(self, input_ids):
        return super().forward(input_ids).logits


def test_model_library():
    v = exercises.check_model(LibraryModel)
    assert v.correct and "greedy generation with your model agrees with the library's" in v.message
    # (the notebook's MyOlmo passes too: its solution notebook's stored verdict is checked by nbval)


def test_model_mistakes():
    """Planted in the notebook's own solution, one part swapped at a time."""
    def planted(**parts):
        ns = solution("e1_build_olmo3")  # MyOlmo looks its parts up in this namespace when it runs
        ns.update(parts)
        return exercises.check_model(ns["MyOlmo"])

    assert named(planted(block=lambda x, a, m, n1, n2: (lambda h: h + m(n2(h)))(x + a(n1(x)))), "pre_norm")
    assert named(planted(rope_tables=student_tables(yarn_on="all")), "yarn_on_sliding")
    assert named(planted(Attention=student_attention(keys_seen=-1)), "window_w_minus_1")
    assert named(planted(Attention=student_attention(per_head=True)), "qk_norm_per_head")

    class NoFinalNorm(LibraryModel):
        def forward(self, input_ids):
            handle = self.model.norm.register_forward_hook(lambda m, args, out: args[0])  # the norm's input
            try:
                return super().forward(input_ids)
            finally:
                handle.remove()
    assert named(exercises.check_model(NoFinalNorm), "no_final_norm")


def test_model_divergence_names_the_block():
    class WrongEps(LibraryModel):
        def forward(self, input_ids):
            self.model.layers[2].post_feedforward_layernorm.eps = 0.1
            return super().forward(input_ids)
    v = exercises.check_model(WrongEps)
    assert v.status == "diverges" and "block 2 (sliding_attention) output is the first to differ, from position 0" in \
        v.message, v

    class Misnamed(nn.Module):
        def __init__(self, config):
            super().__init__()
            self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
    v = exercises.check_model(Misnamed)
    assert v.status == "error" and "UnexpectedTensorError: your module has parameters the library's model does not: " \
        "embed.weight" in v.message, v


# ------------------------------------------------------------------------------------ 6 KV cache
class LibraryCache(KVCache):
    def __init__(self, windows):
        super().__init__(windows, 0, ())


def student_cache(keep=lambda w: w - 1, oldest=False, unbounded=False, return_kept=False, trim_full=False):
    class StudentCache:
        def __init__(self, windows):
            self.windows, self.store = windows, {}

        def update(self, layer, k, v):
            old = self.store.get(layer)
            if old is not None:
                k, v = torch.cat((old[0], k), 2), torch.cat((old[1], v), 2)
            w = self.windows[layer] or (min(x for x in self.windows if x) if trim_full else None)
            if w is None or unbounded:
                self.store[layer] = (k, v)
            else:
                n = min(keep(w), k.shape[2])
                self.store[layer] = (k[:, :, :n], v[:, :, :n]) if oldest else (k[:, :, k.shape[2] - n:],
                                                                             v[:, :, v.shape[2] - n:])
            return self.store[layer] if return_kept else (k, v)

        def layer_length(self, layer):
            return self.store[layer][0].shape[2] if layer in self.store else 0
    return StudentCache


def test_kv_cache(e1):
    v = exercises.check_kv_cache(LibraryCache)
    assert v.correct and "your sliding layers held at most 127 keys (W-1 = 127)" in v.message
    assert exercises.check_kv_cache(e1["Cache"]).correct
    for kwargs, key in [({"keep": lambda w: w}, "keeps_w"), ({"keep": lambda w: w - 2}, "keeps_w_minus_2"),
                        ({"unbounded": True}, "unbounded"), ({"oldest": True}, "keeps_oldest"),
                        ({"return_kept": True}, "returns_kept"), ({"trim_full": True}, "trims_full_layers")]:
        assert named(exercises.check_kv_cache(student_cache(**kwargs)), key)


def test_cache_mask(e1):
    assert exercises.check_cache_mask(library_mask).correct
    assert exercises.check_cache_mask(e1["cache_mask"]).correct

    def mask(causal=True, offset=True, keys=0):
        def fn(q_len, past, window):
            kept = past if window is None else min(past, window - 1)
            kv_len = kept + q_len
            rows = torch.arange(q_len).unsqueeze(1) + (kept if offset else 0)  # query index among the keys
            cols = torch.arange(kv_len).unsqueeze(0)
            m = cols <= rows if causal else torch.ones(q_len, kv_len, dtype=torch.bool)
            return m & (cols > rows - (window + keys)) if window else m
        return fn
    assert exercises.check_cache_mask(mask()).correct
    assert named(exercises.check_cache_mask(mask(causal=False)), "no_causal_mask_first_call")
    assert named(exercises.check_cache_mask(mask(offset=False)), "positions_not_offset")
    assert named(exercises.check_cache_mask(mask(keys=-1)), "window_w_minus_1")
    assert named(exercises.check_cache_mask(mask(keys=1)), "window_w_plus_1")


# ------------------------------------------------------------------------------------ 7 FlexOlmo routing
def library_route(x, gate_weight, top_k, opted_out=(), dropped=(), norm_topk_prob=False):
    from olmo_lab.exercises.routing import library_moe
    r = library_moe(gate_weight, top_k, opted_out, dropped, norm_topk_prob).route(x)
    return r.topk_weights, r.topk_indices


def student_route(after_topk=False, opt_out_late=False, drop_as_opt_out=False, drop_renorm=False,
                  drop_ignored=False, keep_fp32=False):
    def route(x, gate_weight, top_k, opted_out=(), dropped=(), norm_topk_prob=False):
        if drop_as_opt_out:
            opted_out, dropped = tuple(opted_out) + tuple(dropped), ()
        logits = F.linear(x, gate_weight).float()
        if opted_out and not opt_out_late:
            logits[:, list(opted_out)] = -math.inf
        k = min(top_k, gate_weight.shape[0] - len(set(opted_out)))
        if after_topk:
            top, idx = logits.topk(k, dim=-1)
            w = top.softmax(-1)
        else:
            p = logits.softmax(-1)
            if opt_out_late and opted_out:
                p[:, list(opted_out)] = 0
            w, idx = p.topk(k, dim=-1)
        if norm_topk_prob:
            w = w / w.sum(-1, keepdim=True)
        w = w if keep_fp32 else w.to(x.dtype)
        if dropped and not drop_ignored:
            w = torch.where(torch.isin(idx, torch.tensor(dropped)), torch.zeros_like(w), w)
            if drop_renorm:
                w = w / w.sum(-1, keepdim=True)
        return w, idx
    return route


def test_route(e1):
    e2 = solution("e2_flexolmo_router")
    assert exercises.check_route(library_route).correct
    assert exercises.check_route(e2["route"]).correct
    assert exercises.check_route(student_route()).correct
    for kwargs, key in [({"after_topk": True}, "softmax_after_topk"), ({"opt_out_late": True}, "opt_out_after_softmax"),
                        ({"drop_as_opt_out": True}, "drop_as_opt_out"), ({"drop_renorm": True}, "drop_renormalised"),
                        ({"drop_ignored": True}, "drop_ignored"), ({"keep_fp32": True}, "weights_not_cast")]:
        assert named(exercises.check_route(student_route(**kwargs)), key)


def test_moe():
    e2 = solution("e2_flexolmo_router")

    def library_layer(x, gate_weight, experts, top_k, opted_out=(), dropped=()):
        from olmo_lab.exercises.routing import library_moe
        return library_moe(gate_weight, top_k, opted_out, dropped, experts=experts)(x[None])[0]

    def student_moe(route, inside=False):
        def moe(x, gate_weight, experts, top_k, opted_out=(), dropped=()):
            w, idx = route(x, gate_weight, top_k, opted_out, dropped)
            out = torch.zeros_like(x)
            for t in range(x.shape[0]):
                for s in range(idx.shape[1]):
                    e = experts[int(idx[t, s])]
                    out[t] += e(w[t, s] * x[t:t + 1])[0] if inside else w[t, s] * e(x[t:t + 1])[0]
            return out
        return moe

    assert exercises.check_moe(library_layer).correct
    assert exercises.check_moe(e2["moe"]).correct
    assert named(exercises.check_moe(student_moe(student_route(after_topk=True))), "softmax_after_topk")
    assert named(exercises.check_moe(student_moe(student_route(drop_renorm=True))), "drop_renormalised")
    assert named(exercises.check_moe(student_moe(student_route(opt_out_late=True))), "opt_out_after_softmax")
    assert named(exercises.check_moe(student_moe(student_route(), inside=True)), "weight_inside_expert")


# ------------------------------------------------------------------------------------ notebooks
def test_student_notebooks_are_the_solutions_with_blanks():
    """Each student notebook's code is its solution's with every solution block replaced by a blank."""
    import nbformat
    for name in sorted(f[:-3] for f in os.listdir(SOURCES) if f.endswith(".py")):
        student = nbformat.read(os.path.join(ROOT, "notebooks", "exercises", name + ".ipynb"), 4)
        sol = nbformat.read(os.path.join(ROOT, "notebooks", "exercises", "solutions", name + ".ipynb"), 4)
        assert len(student.cells) == len(sol.cells)
        blanks = 0
        for a, b in zip(student.cells, sol.cells):
            if a.cell_type == "code" and 'raise NotImplementedError("your code here")' in a.source:
                blanks += 1
                assert a.source != b.source
            else:
                assert a.source == b.source
        assert blanks >= 2
        checks = [c for c in student.cells if "exercises.check_" in c.source]
        assert checks and all("not done yet" in str(c.outputs) for c in checks), name
        assert all("✓" in str(c.outputs) for c in sol.cells if "exercises.check_" in c.source), name


# ------------------------------------------------------------------------------------ 8 causal experiment
def test_copy_loss():
    from olmo_lab.exercises.causal import reference_copy_loss
    assert exercises.check_copy_loss(reference_copy_loss).correct

    def loss(first, last_pred):
        def fn(logits, ids):
            n = ids.shape[1] // 2
            preds = logits[:, first(n):last_pred]
            targets = ids[:, first(n) + 1:] if last_pred == -1 else ids[:, first(n):]
            return F.cross_entropy(preds.reshape(-1, preds.shape[-1]), targets.reshape(-1))
        return fn
    assert exercises.check_copy_loss(loss(lambda n: n, -1)).correct
    assert named(exercises.check_copy_loss(loss(lambda n: n, None)), "not_shifted")
    assert named(exercises.check_copy_loss(loss(lambda n: 0, -1)), "whole_sequence")
    assert named(exercises.check_copy_loss(loss(lambda n: n - 1, -1)), "includes_first_copied_token")


def o_proj_input_zeroed(which):
    """An ablation written with a torch hook on o_proj's input (B, S, nh*hd); which(z, layer, head) edits it."""
    def ablate(model, ids, layer, head):
        def hook(module, args):
            z = args[0].clone()
            which(z, head, model.config.head_dim)
            return (z,)
        h = model.model.layers[layer].self_attn.o_proj.register_forward_pre_hook(hook)
        try:
            with torch.no_grad():
                return model(ids).logits
        finally:
            h.remove()
    return ablate


def test_ablation_and_effects():
    def head(z, h, hd):
        z[..., h * hd:(h + 1) * hd] = 0

    def layer(z, h, hd):
        z.zero_()

    def position(z, h, hd):
        z[:, h] = 0
    assert exercises.check_ablation(o_proj_input_zeroed(head)).correct
    assert named(exercises.check_ablation(o_proj_input_zeroed(layer)), "whole_layer")
    assert named(exercises.check_ablation(o_proj_input_zeroed(position)), "positions_not_heads")

    def leaves_hook(model, ids, layer, h):
        model.model.layers[layer].self_attn.o_proj.register_forward_pre_hook(lambda m, a: (a[0] * 0,))
        return model(ids).logits
    from olmo_lab.exercises.weights import lab_library_model
    model = lab_library_model("olmo3-lab")
    hooks = {i: dict(b.self_attn.o_proj._forward_pre_hooks) for i, b in enumerate(model.model.layers)}
    try:
        v = exercises.check_ablation(leaves_hook)
        assert v.status == "error" and "left the model changed" in v.message
    finally:  # the shared lab model back as it was, for the tests after this one
        for i, b in enumerate(model.model.layers):
            b.self_attn.o_proj._forward_pre_hooks.clear()
            b.self_attn.o_proj._forward_pre_hooks.update(hooks[i])

    from olmo_lab.exercises.causal import reference_copy_loss
    ablate = o_proj_input_zeroed(head)

    def effects(model, ids, sign=1):
        clean = reference_copy_loss(model(ids).logits, ids)
        return torch.tensor([[sign * float(reference_copy_loss(ablate(model, ids, i, h), ids) - clean)
                              for h in range(model.config.num_attention_heads)]
                             for i in range(model.config.num_hidden_layers)])
    with torch.no_grad():
        assert exercises.check_head_effects(effects).correct
        assert named(exercises.check_head_effects(lambda m, ids: effects(m, ids, -1)), "sign_flipped")
