"""olmo-lab: OLMo 3 and FlexOlmo built layer by layer in plain PyTorch, exact against transformers.

    import olmo_lab
    lab = olmo_lab.Lab("flexolmo-lab")                       # a model with its tokenizer, in one call
    print(lab.generate("The integral of x^2 is", max_new_tokens=8))
    model = olmo_lab.load_model("path/or/hub-id")            # OLMo 2, OLMo 3 or FlexOlmo
    tok = olmo_lab.load_tokenizer("path/or/hub-id")
    print(olmo_lab.generate(model, tok, "The capital of France is", max_new_tokens=8))
    with olmo_lab.experts_off(model, ["math"]):               # FlexOlmo opt-out
        ...

The files live in folders by role: `modeling/` (the model), `checkpoints/` (Hugging Face checkpoints and
tokenizers), `analysis/` (looking inside and intervening), `recipe/` (training and the lab models). Their
public module names stay flat: `olmo_lab.interventions`, `olmo_lab.heads`, `olmo_lab.flexolmo`, ... are the
modules `olmo_lab.analysis.interventions`, `olmo_lab.analysis.heads`, `olmo_lab.recipe.flexolmo`, ...
"""

import importlib as _importlib
import importlib.abc as _abc
import importlib.util as _util
import sys as _sys

from .checkpoints.checkpoint import load_model, save_model
from .modeling.config import OlmoConfig, RopeConfig
from .errors import (CheckpointError, ClusterError, ConfigError, CorpusError, CorruptCheckpointError, ExpertError,
                     GenerationError, HookError, HubError, InputError, MissingTensorError, OlmoLabError,
                     PlacementError, QuantizationError, ShapeMismatchError, StaleCacheError, TokenizerError,
                     UnexpectedTensorError, UnsafeCheckpointError)
from .checkpoints.compare import compare_with_transformers
from .modeling.experts import experts_off
from .modeling.generate import generate
from .analysis import interventions, patching  # olmo_lab.interventions.Zero, olmo_lab.patching.patch, ...
from .analysis.interventions import intervene
from .recipe.lab import lab_model
from .modeling.model import OlmoModel
from .session import Lab
from .checkpoints.tokenizer import Tokenizer, load_tokenizer
from .analysis.trace import trace  # the function: `with olmo_lab.trace(model) as tr:`

__version__ = "0.1.0"

# The flat public name of every module in a role folder (`olmo_lab.trace` and `olmo_lab.generate` name the
# functions above; their modules keep those flat names for `from olmo_lab.trace import Trace`).
ROLES = {"modeling": ["attention", "cache", "config", "decode_step", "experts", "generate", "mlp", "model", "moe",
                      "norm", "quantized", "rope"],
         "checkpoints": ["chat_template", "checkpoint", "compare", "dolma2", "hub", "json_file", "placement",
                         "revisions", "safetensors_file", "summary", "tokenizer"],
         "analysis": ["corpus", "corpus_plots", "corpus_ray", "heads", "hooks", "interventions", "lens", "patching",
                      "plots", "sweep", "trace", "widgets"],
         "recipe": ["flexolmo", "lab", "train"]}
_FLAT = {f"{__name__}.{m}": f"{__name__}.{role}.{m}" for role, ms in ROLES.items() for m in ms}


class _FlatNames(_abc.MetaPathFinder, _abc.Loader):
    """Imports `olmo_lab.<module>` as the module in its role folder (the same module object, imported lazily)."""

    def find_spec(self, name, path=None, target=None):
        return _util.spec_from_loader(name, self) if name in _FLAT else None

    def create_module(self, spec):
        module = _importlib.import_module(_FLAT[spec.name])
        self._own = {k: getattr(module, k) for k in ("__name__", "__package__", "__spec__", "__loader__")}
        return module

    def exec_module(self, module):
        """Already executed in its folder; give back the names importlib has just set (relative imports use them)."""
        for k, v in self._own.items():
            setattr(module, k, v)


for _flat, _real in _FLAT.items():  # those imported above are registered now, so no import rebinds a name here
    if _real in _sys.modules:
        _sys.modules[_flat] = _sys.modules[_real]
_sys.meta_path.insert(0, _FlatNames())


def __getattr__(name: str):
    """`olmo_lab.heads`, `olmo_lab.lab`, ... as attributes too, imported when first used."""
    if f"{__name__}.{name}" in _FLAT:
        return _importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")  # before any editable-install finder that still knows the old files
