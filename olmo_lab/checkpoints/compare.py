"""Layer-by-layer comparison with transformers: where, if anywhere, do the two implementations part?

    report = olmo_lab.compare_with_transformers(model, input_ids)
    print(report)            # one line per stage: max |difference| after embeddings, each block, norm, logits
    report.max_logit_diff

transformers is imported lazily here and nowhere else in the library: it is the oracle, not a dependency.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Stage:
    name: str
    max_diff: float
    ours_shape: tuple
    theirs_shape: tuple

    @property
    def ok_shape(self) -> bool:
        return self.ours_shape == self.theirs_shape


@dataclass
class ComparisonReport:
    stages: list[Stage] = field(default_factory=list)
    router_logit_diffs: list[float] = field(default_factory=list)  # per MoE layer
    topk_agreement: list[float] = field(default_factory=list)  # fraction of tokens with the same top-k set

    @property
    def max_logit_diff(self) -> float:
        return self.stages[-1].max_diff

    def first_divergence(self, tol: float = 1e-5) -> str | None:
        """Name of the first stage whose difference exceeds tol (None if all agree)."""
        return next((s.name for s in self.stages if not s.ok_shape or s.max_diff > tol), None)

    def __str__(self) -> str:
        lines = [f"{'stage':<14} {'max |diff|':>12}"]
        for s in self.stages:
            lines.append(f"{s.name:<14} {s.max_diff:>12.3e}" + ("" if s.ok_shape else
                                                                  f"  SHAPE {s.ours_shape} vs {s.theirs_shape}"))
        for i, (d, a) in enumerate(zip(self.router_logit_diffs, self.topk_agreement)):
            lines.append(f"router {i:<7} {d:>12.3e}  top-k agreement {a:.1%}")
        return "\n".join(lines)


def load_reference(model, attn_implementation: str | None = None):
    """The transformers model for the checkpoint `model` was loaded from, in the same dtype."""
    from transformers import AutoModelForCausalLM

    source = getattr(model, "source", None)
    if source is None:
        raise ValueError("the model has no checkpoint directory; save it with save_model and load it, "
                         "or pass hf_model explicitly")
    impl = attn_implementation or model.model.layers[0].self_attn.backend
    return AutoModelForCausalLM.from_pretrained(source, dtype=model.dtype, attn_implementation=impl).eval()


@torch.inference_mode()
def compare_with_transformers(model, input_ids: torch.Tensor, hf_model=None,
                              attention_mask: torch.Tensor | None = None) -> ComparisonReport:
    """Run both models on the same input and report the max |difference| after every stage."""
    hf_model = hf_model or load_reference(model)
    ours, theirs = {}, {}

    def keep(store, name):
        def hook(_module, _inputs, output):
            store[name] = (output[0] if isinstance(output, tuple) else output).detach().float()
        return hook

    handles = [model.model.embed_tokens.register_forward_hook(keep(ours, "embeddings")),
               hf_model.model.embed_tokens.register_forward_hook(keep(theirs, "embeddings")),
               model.model.norm.register_forward_hook(keep(ours, "final norm")),
               hf_model.model.norm.register_forward_hook(keep(theirs, "final norm"))]
    for i, (a, b) in enumerate(zip(model.model.layers, hf_model.model.layers)):
        handles += [a.register_forward_hook(keep(ours, f"block {i}")), b.register_forward_hook(keep(theirs, f"block {i}"))]
    routings = []
    if model.config.is_moe:
        handles += [model.hooks.add(name, lambda routing, _ctx: routings.append(routing))
                    for name in model.hook_points("mlp.hook_routing")]
    try:
        kwargs = {"attention_mask": attention_mask}
        our_logits = model(input_ids, **kwargs).logits.float()
        if model.config.is_moe:
            out = hf_model(input_ids, output_router_logits=True, **kwargs)
        else:
            out = hf_model(input_ids, **kwargs)
    finally:
        for h in handles:
            h.remove()
    ours["logits"], theirs["logits"] = our_logits, out.logits.float()
    valid = None if attention_mask is None else attention_mask.bool()
    report = ComparisonReport()
    for name in ["embeddings"] + [f"block {i}" for i in range(len(model.model.layers))] + ["final norm", "logits"]:
        a, b = ours[name], theirs[name]
        diff = float("inf") if a.shape != b.shape else _max_diff(a, b, valid)
        report.stages.append(Stage(name, diff, tuple(a.shape), tuple(b.shape)))
    if model.config.is_moe:
        rows = None if valid is None else valid.reshape(-1)
        for routing, hf_logits in zip(routings, out.router_logits):
            a, b = routing.logits.float(), hf_logits.float()
            if rows is not None:
                a, b = a[rows], b[rows]
            report.router_logit_diffs.append((a - b).abs().max().item())
            k = routing.topk_indices.shape[1]
            theirs_top = torch.topk(torch.softmax(hf_logits.float(), -1), k, dim=-1).indices
            ours_top = routing.topk_indices if rows is None else routing.topk_indices[rows]
            theirs_top = theirs_top if rows is None else theirs_top[rows]
            same = (ours_top.sort(-1).values == theirs_top.sort(-1).values).all(-1)
            report.topk_agreement.append(same.float().mean().item())
    return report


def _max_diff(a: torch.Tensor, b: torch.Tensor, valid: torch.Tensor | None) -> float:
    d = (a - b).abs()
    if valid is not None and d.dim() == 3:
        d = d[valid]  # left padding: positions that are padding hold garbage in both
    return d.max().item() if d.numel() else 0.0
