"""A model kept with its tokenizer: the short way in from a notebook cell or the command line.

    lab = olmo_lab.Lab("flexolmo-lab")                  # a lab model name, a directory or a hub repo id
    lab.generate("The integral of x^2 is", max_new_tokens=20)
    with lab.trace() as tr:
        lab.generate("def add(a, b):", max_new_tokens=5)
    lab.experts.disable(["math"])

Every method hands over to the library's own function (`load_model`, `load_tokenizer`, `generate`,
`trace`, `model.experts`) with the kept model and tokenizer; nothing here computes anything itself.
"""

from __future__ import annotations

import os

import torch

from .checkpoints.checkpoint import load_model
from .modeling.generate import generate
from .recipe.lab import resolve
from .checkpoints.tokenizer import load_tokenizer
from .analysis.trace import trace


class Lab:
    """A model and its tokenizer, loaded together from one name, as transformers' pipeline does.

    model: a lab model name ("olmo3-lab", the default, or "flexolmo-lab"), a checkpoint directory or a
        hub repo id. dtype, device, revision and the other keywords go to `load_model`.
    tokenizer: where to read the tokenizer (default: the checkpoint's own files).
    """

    def __init__(self, model: str | os.PathLike = "olmo3-lab", *, dtype: torch.dtype | str | None = None,
                 device: str | torch.device | None = None, revision: str | None = None,
                 tokenizer: str | os.PathLike | None = None, **load_kw):
        self.name = os.fspath(model)
        self.model = load_model(resolve(self.name), dtype=dtype, device=device, revision=revision, **load_kw)
        # The model's resolved directory holds the tokenizer files too (a hub snapshot fetches both).
        self.tokenizer = load_tokenizer(tokenizer if tokenizer is not None else self.model.source)

    def generate(self, prompt, **kw):
        """`olmo_lab.generate(model, tokenizer, prompt, **kw)`: the continuation of the prompt."""
        return generate(self.model, self.tokenizer, prompt, **kw)

    def trace(self, **kw):
        """`olmo_lab.trace(model, tokenizer=tokenizer, **kw)`: a `with` block recording what runs inside."""
        return trace(self.model, tokenizer=self.tokenizer, **kw)

    @property
    def experts(self):
        """The expert switchboard, `model.experts` (FlexOlmo only)."""
        return self.model.experts

    def __repr__(self) -> str:
        c = self.model.config
        return (f"Lab({self.name!r}: {c.model_type}, {self.model.num_parameters() / 1e6:.1f}M parameters, "
                f"{c.dtype}, {self.model.device})")
