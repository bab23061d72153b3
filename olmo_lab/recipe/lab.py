"""The checkpoints olmo-lab ships: small OLMo 3 and FlexOlmo models trained here, on real offline text.

    path = olmo_lab.lab.lab_model("flexolmo-lab")   # a directory for load_model / load_tokenizer
    model = olmo_lab.load_model(path)

- "olmo3-lab": the OLMo 3 architecture (sliding-window and full-attention layers) trained on the
  public mix; it has a previous-token head and an induction head, found by score (its model card).
- "flexolmo-lab": FlexOlmo merged from that public model and four independently trained domain
  experts (code, math, dictionary, bible); no joint training.
Both are rebuilt from scratch by `make lab-models` (see lab/RESULTS.md for the measured numbers).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import CheckpointError

LAB_MODELS = ("olmo3-lab", "flexolmo-lab")
LAB_MODELS_DIR = Path(__file__).resolve().parent.parent / "lab_models"


def lab_model(name: str) -> str:
    """The directory of a shipped lab checkpoint, usable by `load_model` and `load_tokenizer`."""
    if name not in LAB_MODELS:
        raise CheckpointError(f"unknown lab model {name!r}; the shipped lab models are {', '.join(LAB_MODELS)}")
    path = LAB_MODELS_DIR / name
    if not (path / "model.safetensors").is_file():
        raise CheckpointError(f"lab model {name!r} is missing from {path}; rebuild it with `make lab-models`")
    return str(path)


def resolve(name_or_path: str) -> str:
    """A lab model's directory for its name ("olmo3-lab"); anything else (a directory, a repo id) as given."""
    return lab_model(name_or_path) if name_or_path in LAB_MODELS else name_or_path


def samples() -> dict:
    """Short public-domain or permissively licensed evaluation texts per domain, with their licences:
    {domain: {"licence": str, "texts": [str, ...]}}."""
    return json.loads((LAB_MODELS_DIR / "samples.json").read_text(encoding="utf-8"))


def results_markdown() -> str:
    """The results table of the shipped lab models (written by `make lab-models`)."""
    return (LAB_MODELS_DIR / "RESULTS.md").read_text(encoding="utf-8")
