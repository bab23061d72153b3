"""olmo-lab: OLMo 3 and FlexOlmo built layer by layer in plain PyTorch, exact against transformers.

    import olmo_lab
    lab = olmo_lab.Lab("flexolmo-lab")                       # a model with its tokenizer, in one call
    print(lab.generate("The integral of x^2 is", max_new_tokens=8))
    model = olmo_lab.load_model("path/or/hub-id")            # OLMo 2, OLMo 3 or FlexOlmo
    tok = olmo_lab.load_tokenizer("path/or/hub-id")
    print(olmo_lab.generate(model, tok, "The capital of France is", max_new_tokens=8))
    with olmo_lab.experts_off(model, ["math"]):               # FlexOlmo opt-out
        ...
"""

from .checkpoint import load_model, save_model
from .config import OlmoConfig, RopeConfig
from .errors import (CheckpointError, ClusterError, ConfigError, CorpusError, CorruptCheckpointError, ExpertError,
                     GenerationError, HookError, HubError, InputError, MissingTensorError, OlmoLabError,
                     ShapeMismatchError, StaleCacheError, TokenizerError, UnexpectedTensorError, UnsafeCheckpointError)
from .compare import compare_with_transformers
from .experts import experts_off
from .generate import generate
from . import interventions, patching  # olmo_lab.interventions.Zero, olmo_lab.patching.patch, ...
from .interventions import intervene
from .lab import lab_model
from .model import OlmoModel
from .session import Lab
from .tokenizer import Tokenizer, load_tokenizer
from .trace import trace  # the function: `with olmo_lab.trace(model) as tr:`

__version__ = "0.1.0"
