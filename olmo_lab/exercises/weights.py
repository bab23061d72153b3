"""The shipped lab checkpoints, for the checkers and for the students' own modules.

    model = MyOlmo(lab_config("olmo3-lab"))
    load_lab_weights(model, "olmo3-lab")     # the checkpoint's tensors, by their Hugging Face names

The names are the checkpoint keys (`model.layers.0.self_attn.q_proj.weight`, ...), which are also the
library's module names, so a student's model loads them if its modules are named the same way.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import nn

from ..checkpoints.checkpoint import load_model
from ..modeling.config import OlmoConfig
from ..errors import MissingTensorError, ShapeMismatchError, UnexpectedTensorError
from ..recipe.lab import lab_model


@lru_cache(maxsize=None)
def lab_library_model(name: str, dtype: torch.dtype = torch.float32):
    """The library's model of a lab checkpoint (cached: treat it as read-only)."""
    return load_model(lab_model(name), dtype=dtype)


def lab_config(name: str) -> OlmoConfig:
    """The config of a shipped lab checkpoint ("olmo3-lab" or "flexolmo-lab")."""
    return lab_library_model(name).config


def lab_weights(name: str) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors in their stored dtype (bf16), by checkpoint name (read-only)."""
    return dict(lab_library_model(name, torch.bfloat16).state_dict())


def load_named(module: nn.Module, state: dict[str, torch.Tensor], source: str = "the checkpoint") -> nn.Module:
    """Copy `state` into `module` by parameter name, after checking every name and shape fits.

    Raises UnexpectedTensorError / MissingTensorError / ShapeMismatchError naming the first parameters
    that do not fit, so a misnamed module is easy to find.
    """
    ours = module.state_dict()
    missing = [k for k in state if k not in ours]
    unknown = [k for k in ours if k not in state]
    if unknown:
        raise UnexpectedTensorError(f"your module has parameters {source} does not: {', '.join(unknown[:4])}"
                                    + (" ..." if len(unknown) > 4 else "")
                                    + " (name them as the checkpoint does, e.g. model.layers.0.self_attn.q_proj)")
    if missing:
        raise MissingTensorError(f"your module lacks parameters {source} has: {', '.join(missing[:4])}"
                                 + (" ..." if len(missing) > 4 else ""))
    for k, t in state.items():
        if tuple(ours[k].shape) != tuple(t.shape):
            raise ShapeMismatchError(f"{k}: your parameter has shape {tuple(ours[k].shape)}, {source}'s "
                                     f"{tuple(t.shape)}")
    module.load_state_dict(state)
    return module


def load_lab_weights(module: nn.Module, name: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Copy a lab checkpoint's tensors into `module` (every parameter named as in the checkpoint), cast to dtype."""
    state = {k: t.to(dtype) for k, t in lab_library_model(name).state_dict().items()}
    return load_named(module, state, f"the {name} checkpoint").to(dtype)
