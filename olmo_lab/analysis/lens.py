"""Views derived from a trace: direct logit attribution per component and expert, logit lens, expert usage.

Direct logit attribution. The logit of token v is u_v . norm(x_L), where x_L = embeddings + the sum of
every block's attention and feed-forward outputs. Freezing the final norm's scale s = 1/rms(x_L) makes
this linear: logit = sum over components c of s * (g * c) . u_v. Post-norm blocks add norm(ffn(h)),
so an MoE layer's output is split the same way: with its norm scale frozen, expert e contributes
s_ffn * g_ffn * (w_e * y_e). The parts sum exactly (up to rounding) to the logit they explain.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..checkpoints.placement import parameter
from ..modeling.quantized import QuantizedLinear
from .trace import trace


@dataclass
class Attribution:
    """Contributions to one logit: {component name: value}, and the logit itself."""

    token: str
    position: int
    logit: float
    parts: dict[str, float]

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    def experts(self) -> dict[str, float]:
        """Summed over layers: {expert name: contribution}."""
        out = {}
        for name, value in self.parts.items():
            if " expert " in name:
                expert = name.split(" expert ", 1)[1]
                out[expert] = out.get(expert, 0.0) + value
        return out

    def summary(self, top: int = 8) -> str:
        ranked = sorted(self.parts.items(), key=lambda kv: -abs(kv[1]))[:top]
        lines = [f"logit of {self.token!r} at position {self.position}: {self.logit:.4f} "
                 f"(sum of parts {self.total:.4f})"]
        lines += [f"  {name:<28}{value:+.4f}" for name, value in ranked]
        return "\n".join(lines)


def _rms_scale(x: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.float()
    return torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


@torch.inference_mode()
def direct_logit_attribution(model, tr, token_id: int, position: int = -1, batch: int = 0) -> Attribution:
    """Split the logit of `token_id` at `position` into embeddings, attention per layer, and the
    feed-forward per layer (per expert for FlexOlmo). Needs a trace taken with `residual=True`."""
    cfg = model.config
    L = cfg.num_hidden_layers
    final = tr.block(L - 1, "resid_post")[batch, position].float()  # (H,)

    def weight(name):  # fp32 next to the trace, also where a placed model offloads it
        return parameter(model, name).float().to(final.device)

    head = model.lm_head  # a quantized lm_head gives the row its kernel multiplies with
    row = head.weight_row(token_id).float().to(final.device) if isinstance(head, QuantizedLinear) else \
        weight("lm_head.weight")[token_id]
    u = row * weight("model.norm.weight")  # unembedding . final gain
    s = _rms_scale(final, cfg.rms_norm_eps)

    def score(c: torch.Tensor) -> float:
        return float((c.float() * u).sum() * s)

    parts = {"embeddings": score(tr.block(0, "resid_pre")[batch, position])}
    outputs = tr.expert_outputs if cfg.is_moe else {}
    routing = tr.routing if cfg.is_moe else {}
    for layer in range(L):
        parts[f"layer {layer} attention"] = score(tr.block(layer, "attn_out")[batch, position])
        if not cfg.is_moe:
            parts[f"layer {layer} mlp"] = score(tr.block(layer, "ffn_out")[batch, position])
            continue
        z = tr.block(layer, "ffn_raw")[batch, position]
        scale = _rms_scale(z, cfg.rms_norm_eps) * weight(f"model.layers.{layer}.post_feedforward_layernorm.weight")
        S = tr.token_ids.shape[1]
        row = batch * S + (position % S)
        r = routing[layer]
        for slot in range(r.topk_indices.shape[1]):
            e, w = r.topk_indices[row, slot].item(), r.topk_weights[row, slot].float()
            y = outputs[layer][batch, position % S, e]
            if w != 0 and not torch.isnan(y).any():
                parts[f"layer {layer} expert {cfg.expert_names[e]}"] = score(scale * (w * y))
    logits = model.lm_head(model.model.norm(final.to(model.dtype)[None]))[0]
    token = tr.tokenizer.token_strings([token_id])[0] if tr.tokenizer else str(token_id)
    return Attribution(token, position % tr.token_ids.shape[1], float(logits[token_id]), parts)


@torch.inference_mode()
def logit_lens(model, tr, position: int = -1, batch: int = 0, top: int = 5) -> list[list[tuple[str, float]]]:
    """For each layer: the top tokens (text, probability) if the residual stream stopped there."""
    out = []
    for layer in range(model.config.num_hidden_layers):
        x = tr.block(layer, "resid_post")[batch, position]
        probs = model.lm_head(model.model.norm(x[None]))[0].float().softmax(-1)
        p, idx = probs.topk(top)
        names = tr.tokenizer.token_strings(idx.tolist()) if tr.tokenizer else [str(i) for i in idx.tolist()]
        out.append(list(zip(names, p.tolist())))
    return out


def logit_lens_table(lens: list[list[tuple[str, float]]]) -> str:
    return "\n".join(f"layer {i:>2}: " + "  ".join(f"{t!r} {p:.2f}" for t, p in row) for i, row in enumerate(lens))


@torch.inference_mode()
def expert_usage(model, tokenizer, texts_by_group: dict[str, list[str]],
                 top: int | None = None) -> dict[str, torch.Tensor]:
    """{group (e.g. domain): (layers, experts) fraction of its tokens that put each expert among their `top`
    highest-weight experts (default: all top-k; `Routing.usage`)}.

    Texts longer than the model's context are cut to it."""
    out = {}
    for group, texts in texts_by_group.items():
        total, count = None, 0
        for text in texts:
            ids = torch.tensor([tokenizer.encode(text)[:model.config.max_position_embeddings]])
            with trace(model, attention=False, routing=True) as tr:
                model(ids)
            usage = torch.stack([tr.routing[l].usage(top) * ids.shape[1] for l in sorted(tr.routing)])
            total = usage if total is None else total + usage
            count += ids.shape[1]
        out[group] = total / count
    return out


def usage_table(usage: dict[str, torch.Tensor], expert_names: list[str], layer: int | None = None) -> str:
    """Text table of `expert_usage`, averaged over layers unless `layer` is given."""
    w = max(10, 1 + max(map(len, expert_names)))  # a column as wide as the longest expert name, and a space
    lines = [f"{'group':<14}" + "".join(f"{n:>{w}}" for n in expert_names)]
    for group, u in usage.items():
        row = u.mean(0) if layer is None else u[layer]
        lines.append(f"{group:<14}" + "".join(f"{v:{w}.2f}" for v in row.tolist()))
    return "\n".join(lines)
