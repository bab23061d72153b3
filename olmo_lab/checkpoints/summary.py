"""What a checkpoint holds, read without loading its weights: config, experts, parameters, bytes, layers.

    print(olmo_lab.summary.describe("flexolmo-lab"))      # `olmo-lab info flexolmo-lab`

Parameter counts come from the model built on the meta device (shapes only); byte counts from the
weight files on disk and from the parameter count at the checkpoint's dtype.
"""

from __future__ import annotations

import json
import os

import torch

from .checkpoint import DTYPES, checkpoint_size, model_shell, resolve_checkpoint
from ..modeling.config import OlmoConfig
from ..recipe.lab import resolve


def describe(path_or_name: str | os.PathLike, revision: str | None = None) -> str:
    """A short text report of a lab model name, a checkpoint directory or a hub repo id."""
    directory = resolve_checkpoint(resolve(os.fspath(path_or_name)), revision)
    config = OlmoConfig.from_json(directory)
    counts = parameter_counts(config)
    total = sum(counts.values())
    dtype = DTYPES.get(config.dtype or "float32", torch.float32)
    lines = [f"{os.fspath(path_or_name)}: {config.model_type} ({directory})",
             f"parameters: {total:,} = " + " + ".join(f"{n:,} {part}" for part, n in counts.items() if n),
             f"bytes: {checkpoint_size(directory):,} of weight files on disk; "
             f"{total * dtype.itemsize:,} in memory as {config.dtype or 'float32'}",
             f"layer types: {layer_runs(config)}"]
    if config.is_moe:
        per_expert = counts["experts"] // config.num_experts
        lines.append(f"experts: {config.num_experts} ({', '.join(config.expert_names)}), top-{config.num_experts_per_tok} "
                     f"routing; {per_expert:,} parameters each")
    lines.append("config:")
    lines += [f"  {key}: {json.dumps(value)}" for key, value in config.to_dict().items()]
    return "\n".join(lines)


def parameter_counts(config: OlmoConfig) -> dict[str, int]:
    """Parameters by part: embeddings, attention, feed-forward or experts (+ router), norms, LM head."""
    parts = {"embeddings": 0, "attention": 0, "feed-forward": 0, "experts": 0, "router": 0, "norms": 0, "lm_head": 0}
    for name, p in model_shell(config).named_parameters():  # tied weights are listed once
        part = ("embeddings" if "embed_tokens" in name else "lm_head" if name.startswith("lm_head")
                else "attention" if ".self_attn." in name and "norm" not in name else "norms" if "norm" in name
                else "router" if ".mlp.gate." in name else "experts" if ".experts." in name else "feed-forward")
        parts[part] += p.numel()
    return parts


def layer_runs(config: OlmoConfig) -> str:
    """The layer types as runs of layers, e.g. '0-2 sliding_attention (window 512), 3 full_attention'."""
    runs, start = [], 0
    types = config.layer_types
    for i in range(1, len(types) + 1):
        if i == len(types) or types[i] != types[start]:
            span = str(start) if i - 1 == start else f"{start}-{i - 1}"
            window = config.window(start)
            runs.append(f"{span} {types[start]}" + (f" (window {window})" if window else ""))
            start = i
    return ", ".join(runs)
