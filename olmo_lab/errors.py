"""Every error olmo-lab raises on bad input: one base class, one subclass per kind of problem.

Each message names the offending field, tensor, file or expert, so a person can fix it without
reading a traceback from deep inside torch.
"""


class OlmoLabError(Exception):
    """Base class of every olmo-lab error."""


def brief(value, limit: int = 100) -> str:
    """repr() of a bad value for a message, cut to a readable length (an input may be a megabyte-long string)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 20] + f"... ({len(text)} characters)"


class ConfigError(OlmoLabError, ValueError):
    """A config.json is missing, malformed, or describes an impossible model."""


class CheckpointError(OlmoLabError):
    """A checkpoint directory or weight file cannot be used."""


class MissingTensorError(CheckpointError, KeyError):
    """The checkpoint lacks tensors the model needs."""

    def __str__(self):  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class UnexpectedTensorError(CheckpointError):
    """The checkpoint has tensors the model does not know."""


class ShapeMismatchError(CheckpointError, ValueError):
    """A tensor in the checkpoint has the wrong shape or an unusable dtype."""


class CorruptCheckpointError(CheckpointError):
    """A safetensors file or index is truncated, corrupted or inconsistent."""


class UnsafeCheckpointError(CheckpointError):
    """The checkpoint asks for something olmo-lab refuses to do (pickles, paths outside it)."""


class HubError(CheckpointError):
    """A hub repo id could not be resolved (offline, unreachable, or missing files)."""


class TokenizerError(OlmoLabError, ValueError):
    """A tokenizer is missing, broken, or does not fit the model; or the text input is unusable."""


class GenerationError(OlmoLabError, ValueError):
    """Generation arguments are invalid (token counts, temperature, top-p, ...)."""


class ExpertError(OlmoLabError, ValueError):
    """An expert name or index is unknown, or a toggle would leave no expert enabled."""


class StaleCacheError(OlmoLabError, RuntimeError):
    """A KV cache was built under different expert toggles (or another model) than it is used with."""


class InputError(OlmoLabError, ValueError):
    """Model inputs (token ids, masks, positions) or other arguments have the wrong type, shape or range."""


class PlacementError(InputError):
    """A device map, `max_memory` or offload folder cannot place the model (unknown module or device, no room
    anywhere, a folder that cannot be written), or accelerate, which placement needs, is not installed."""


class HookError(OlmoLabError, ValueError):
    """A hook point name is unknown, or a hook or intervention is invalid (shape, dtype, device, range)."""


class CorpusError(OlmoLabError, ValueError):
    """A corpus analysis cannot run: a missing or unreadable file, a malformed row (with file and line), an
    unknown domain, a context or batch size that cannot fit, or a results folder from another job."""


class ClusterError(CorpusError, RuntimeError):
    """The Ray engine failed: the cluster address is unreachable, or a worker died and retries ran out."""


class QuantizationError(OlmoLabError, ValueError):
    """Quantization cannot be done as asked: an unknown scheme or group size, a device or dtype its kernels do not
    take, torchao missing, or a quantized model asked to do what only a full-precision one can (be saved)."""
