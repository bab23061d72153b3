"""Loading and saving Hugging Face-format checkpoints: config.json + safetensors (single or sharded).

`load_model` reads a local directory or a hub repo id, builds the model on the meta device and fills
it tensor by tensor straight from the (memory-mapped) safetensors files, cast to the requested dtype,
so no second full copy of the weights is ever made. FlexOlmo experts load from either layout (per
expert, as released, or transformers 5's fused `gate_up_proj`/`down_proj`), and `experts=[...]`
reads only the chosen experts' tensors. Pickle files (.bin/.pt/.pkl) are never loaded and nothing in
a checkpoint is executed. Every problem raises a specific `olmo_lab.errors` exception naming the
tensor or file, and a failed load leaves nothing half-built behind.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from dataclasses import dataclass

import torch
from safetensors.torch import save_file
from torch.overrides import TorchFunctionMode
from tqdm.auto import tqdm

from . import hub, revisions
from ..modeling.config import RELEASED_7X7B_EXPERTS, OlmoConfig
from ..errors import (CheckpointError, InputError, ConfigError, CorruptCheckpointError, ExpertError,
                     MissingTensorError, PlacementError, QuantizationError, ShapeMismatchError, UnexpectedTensorError,
                     UnsafeCheckpointError, brief)
from ..modeling.experts import resolve_experts
from .json_file import read_json
from ..modeling.model import OlmoModel
from ..modeling.quantized import QuantizedLinear, Quantizer
from .safetensors_file import SafetensorsFile

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
CHECKPOINT_FILES = ["config.json", "generation_config.json", "*.safetensors", INDEX_FILE, "tokenizer.json",
                    "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"]
IGNORED_KEYS = re.compile(r".*rotary_emb\.inv_freq$")  # non-persistent buffers some converters wrote
DTYPES = {"float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
          "float16": torch.float16, "half": torch.float16}
PROGRESS_BYTES = 256 * 2**20  # show a loading bar for checkpoints larger than this


# ---------------------------------------------------------------------------------------- locating
def resolve_checkpoint(path_or_repo_id: str | os.PathLike, revision: str | None = None,
                       patterns: list[str] | None = None) -> str:
    """A local directory for a path or a hub repo id (downloading only the files needed).

    Honours HF_HUB_OFFLINE: offline, only the local hub cache is used. Anything that keeps the repo
    from being resolved raises HubError naming the repo.
    """
    path = os.fspath(path_or_repo_id) if isinstance(path_or_repo_id, (str, os.PathLike)) else None
    if not isinstance(path, str) or "\0" in path:
        raise CheckpointError(f"checkpoint: expected a directory or a hub repo id (a str or path), got "
                              f"{brief(path_or_repo_id)}")
    if os.path.isdir(path):
        return path if revision is None else revisions.local_revision(path, revision)  # its revisions/<name>/
    if os.path.exists(path) or not hub.looks_like_repo_id(path) or "/" not in path:
        raise CheckpointError(f"checkpoint: {brief(path)} is not a directory (and not a hub repo id like "
                              f"'allenai/Olmo-3-1025-7B')")
    return str(hub.snapshot(path, revision, patterns or CHECKPOINT_FILES, "checkpoint"))


def default_expert_names(repo_id: str, num_experts: int) -> list[str] | None:
    """Documented names for the released allenai FlexOlmo checkpoints, from the repo id.

    `allenai/Flex-<domain>-2x7B-1T` -> ["public", <domain>]; `allenai/FlexOlmo-7x7B-1T[-RT]` -> the
    model card's order: public, math, news, academic, code, creative, reddit.
    """
    name = repo_id.rstrip("/").split("/")[-1]
    m = re.fullmatch(r"Flex-([a-z0-9]+)-2x7B-1T.*", name)
    if m and num_experts == 2:
        return ["public", m.group(1)]
    if name.startswith("FlexOlmo-7x7B") and num_experts == 7:
        return list(RELEASED_7X7B_EXPERTS)
    return None


def _weight_files(directory: str, blobs: str | None = None) -> tuple[dict[str, str], list[str]]:
    """{tensor name: absolute shard path} and the list of shard files, from the index or the single file.

    Weight files must lie in `directory` itself, or be links into `blobs`, the blob store of the hub
    cache `directory` is a snapshot of (huggingface_hub links every snapshot file there).
    """
    index_path = os.path.join(directory, INDEX_FILE)
    allowed = {os.path.realpath(directory)} | ({os.path.realpath(blobs)} if blobs else set())
    if os.path.isfile(index_path):
        index = read_json(index_path, INDEX_FILE, CorruptCheckpointError)  # a tensor listed twice is refused here
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            raise CorruptCheckpointError(f"{INDEX_FILE}: malformed index (no 'weight_map' object)")
        if not all(isinstance(shard, str) for shard in weight_map.values()):
            raise CorruptCheckpointError(f"{INDEX_FILE}: malformed index (weight_map values must be shard file names)")
        paths = {}
        for shard in sorted(set(weight_map.values())):
            if "\0" in shard or os.path.isabs(shard) or os.path.basename(shard) != shard \
                    or shard in ("", ".", ".."):
                raise UnsafeCheckpointError(f"{INDEX_FILE}: shard {brief(shard)} is not a plain file name inside "
                                            f"the checkpoint directory; refusing to read it")
            full = os.path.join(directory, shard)
            if os.path.dirname(os.path.realpath(full)) not in allowed:
                raise UnsafeCheckpointError(f"{INDEX_FILE}: shard {shard!r} is a link to a file outside the "
                                            f"checkpoint directory; refusing to read it")
            if not shard.endswith(".safetensors"):
                raise UnsafeCheckpointError(f"{INDEX_FILE}: shard {shard!r} is not a .safetensors file; "
                                            f"olmo-lab never loads pickled weights")
            if not os.path.isfile(full):
                raise CorruptCheckpointError(f"{INDEX_FILE}: shard {shard!r} is missing from {directory}")
            paths[shard] = full
        return {name: paths[shard] for name, shard in weight_map.items()}, sorted(paths.values())
    single = os.path.join(directory, SINGLE_FILE)
    if os.path.isfile(single):
        if os.path.dirname(os.path.realpath(single)) not in allowed:
            raise UnsafeCheckpointError(f"{SINGLE_FILE} is a link to a file outside the checkpoint directory")
        f = SafetensorsFile(single)
        f.close()
        return {name: single for name in f.keys()}, [single]
    pickles = sorted(f for f in os.listdir(directory) if f.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise UnsafeCheckpointError(f"refusing to load pickle-based weights {pickles}: they can execute code. "
                                    f"Convert the checkpoint to safetensors first")
    raise MissingTensorError(f"no weights in {directory}: expected {SINGLE_FILE} or {INDEX_FILE}")


def _check_shards(locations: dict[str, str], readers: dict) -> None:
    """Every shard holds exactly the tensors the index lists for it (as a single file holds all of them)."""
    for path, reader in readers.items():
        listed = {name for name, where in locations.items() if where == path}
        absent = sorted(listed - set(reader.keys()))
        if absent:
            raise CorruptCheckpointError(f"{INDEX_FILE}: tensor {absent[0]!r} is not in {os.path.basename(path)}"
                                         + (f" (nor {len(absent) - 1} more it lists there)" if len(absent) > 1 else ""))
        unlisted = sorted(set(reader.keys()) - listed)
        if unlisted:
            raise CorruptCheckpointError(f"{os.path.basename(path)}: holds {len(unlisted)} tensor(s) that "
                                         f"{INDEX_FILE} does not list for it: {_shown(unlisted)}")


def _shown(names: list[str]) -> str:
    return ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")


# ---------------------------------------------------------------------------------------- loading
def load_model(path_or_repo_id, *, dtype: torch.dtype | str | None = None, device: str | torch.device | None = None,
               revision: str | None = None, experts: list | None = None, expert_names: list[str] | None = None,
               progress: bool | None = None, quantize: str | None = None, group_size: int | None = None,
               device_map: str | dict | None = None, max_memory: dict | None = None,
               offload_folder: str | os.PathLike | None = None) -> OlmoModel:
    """Load an OLMo 2 / OLMo 3 / FlexOlmo checkpoint from a directory or a hub repo id.

    dtype: the parameter dtype, torch.float32, torch.bfloat16 or torch.float16 (or its name; default: the
        checkpoint's `dtype` field, else its tensors' dtype); RoPE tables always stay fp32.
    device: "cpu" (the default), "cuda", "cuda:N" or "mps" (or a torch.device); it must exist on this machine.
    device_map, max_memory, offload_folder: spread the model over GPUs, CPU memory and disk instead
        (device_map="auto" or {module: place}; needs accelerate); see olmo_lab.checkpoints.placement.
    revision: a branch, tag or commit of a hub repo, or one of a local checkpoint's `revisions/` (see
        olmo_lab.revisions.list_revisions).
    experts: FlexOlmo only; names or indices of the experts to keep. Only their tensors are read,
        and the result equals loading everything and opting the others out.
    expert_names: names for the checkpoint's experts (default: config `expert_names`, the documented
        names of the released allenai checkpoints, or expert_0, expert_1, ...).
    Every argument is checked before any file is read, and every tensor's header entry (dtype, shape,
    byte range) before any tensor data is read or allocated.
    Non-finite (NaN/Inf) weights are an error (CorruptCheckpointError naming the tensor), also where
    they appear only once cast to `dtype` (1e6 in float16).
    quantize: "int8" or "int4" (needs torchao): weight-only quantization of every linear layer but the
        router, each matrix as it is read; `dtype` then defaults to bfloat16. group_size: int4's group of
        input columns (default 128). See olmo_lab.quantized; `model.quantization` reports what was done.
    """
    if quantize is not None and device_map is not None:
        raise PlacementError("quantize= with device_map= is not supported yet: load quantized on one device, or "
                             "placed in full precision")
    placer = _placer(device, device_map, max_memory, offload_folder)
    target, device = _parse_dtype(dtype), _parse_device("cpu" if device is None else device)
    _check_arguments(revision, experts, expert_names, progress)
    quantizer = Quantizer.parse(quantize, group_size, device, target)
    if quantizer is not None:
        target = quantizer.dtype
    directory = resolve_checkpoint(path_or_repo_id, revision)
    from_hub = not os.path.isdir(os.fspath(path_or_repo_id))
    config = OlmoConfig.from_json(directory)
    total_experts = config.num_experts
    if config.is_moe:
        names = expert_names or (None if config.expert_names != [f"expert_{i}" for i in range(config.num_experts)]
                                 else default_expert_names(os.fspath(path_or_repo_id), config.num_experts))
        if names is not None:
            config = _with(config, expert_names=list(names))
    elif expert_names is not None or experts is not None:
        raise ExpertError(f"this is a dense {config.model_type} checkpoint; it has no experts to name or select")
    keep = None
    if experts is not None:
        keep = resolve_experts(config.expert_names, experts)
        config = _with(config, num_experts=len(keep), num_experts_per_tok=min(config.num_experts_per_tok, len(keep)),
                       expert_names=[config.expert_names[e] for e in keep])
    locations, files = _weight_files(directory, hub.blob_store(directory) if from_hub else None)
    model = model_shell(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    if quantizer is not None:
        quantizer.check(expected, config.tie_word_embeddings)
    readers, state, tensor = {}, {}, None
    try:
        for path in files:
            readers[path] = SafetensorsFile(path)
        _check_shards(locations, readers)
        plan = _plan(config, keep, locations, expected, total_experts)
        _check_headers(plan, readers)  # every entry against the config, before a byte of data is read
        if target is None:
            target = DTYPES.get(config.dtype) or _stored_dtype(readers, plan)
        show = progress if progress is not None else sum(os.path.getsize(p) for p in files) > PROGRESS_BYTES
        if placer is not None:
            placer.plan(model, target, plan)
        for name, source in tqdm(plan.items(), desc="loading weights", unit="tensor", disable=not show):
            tensor = _finite(name, source.read(readers).to(device=device if placer is None else placer.device_for(name),
                                                           dtype=target), readers[source.path].dtype(source.tensor))
            if quantizer is not None and quantizer.quantizes(name, config.tie_word_embeddings):
                tensor = quantizer.quantize(tensor)  # the full-precision matrix is dropped here
            if placer is None or placer.keep(name, tensor):  # else it waits on disk or in CPU memory
                state[name] = tensor
        quantized = {name: state.pop(name) for name in [n for n, t in state.items() if isinstance(t, QuantizedLinear)]}
        model.load_state_dict(state, strict=False, assign=True)
        if config.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        if quantizer is not None:
            model.quantization = quantizer.install(model, quantized)
        if placer is not None:
            placer.dispatch(model)
    except BaseException:
        # The traceback keeps this frame alive (Jupyter keeps the last one): drop the weights read so
        # far and the model shell, so a failed load holds no memory and leaves nothing half-built
        # (nor offloaded weights on disk).
        state.clear()
        if placer is not None:
            placer.discard()
        del model, tensor
        raise
    finally:
        for reader in readers.values():
            reader.close()
    model.config = _with(model.config, dtype=_dtype_name(target))
    model.source = directory
    return model.eval()


def model_shell(config: OlmoConfig) -> OlmoModel:
    """The model on the meta device, parameters uninitialised: shapes only, no memory, no init work."""
    with torch.device("meta"), _SkipInit():
        return OlmoModel(config)


class _SkipInit(TorchFunctionMode):
    """Leaves `torch.nn.init` calls undone while a model shell is built: every weight is loaded next.

    Besides saving the work, this keeps torch's compiler stack out of a cold start: on the meta device
    `normal_` and `uniform_` run Python reference kernels that import `torch._dynamo` (~1.7 s).
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else kwargs["tensor"]
        return func(*args, **(kwargs or {}))


def _with(config: OlmoConfig, **changes) -> OlmoConfig:
    try:
        return config.replace(**changes)
    except ConfigError as e:
        raise ExpertError(str(e)) from None


def _parse_dtype(dtype) -> torch.dtype | None:
    """The requested parameter dtype: float32, bfloat16 or float16; ConfigError (a ValueError) otherwise."""
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    if dtype is None or dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, torch.dtype) and not dtype.is_floating_point:
        raise ConfigError(f"dtype: {dtype} is not a floating-point dtype")
    if isinstance(dtype, torch.dtype):
        raise ConfigError(f"dtype: {dtype} is not supported (use torch.float32, torch.bfloat16 or torch.float16)")
    raise ConfigError(f"dtype: unknown dtype {brief(dtype)} (use torch.float32, torch.bfloat16 or torch.float16)")


def _parse_device(device) -> torch.device:
    """A device that exists on this machine: cpu, cuda[:N] or mps; InputError naming the problem otherwise."""
    if isinstance(device, str):
        try:
            device = torch.device(device)
        except (RuntimeError, ValueError):
            raise InputError(f"device: {brief(device)} is not a device (use 'cpu', 'cuda', 'cuda:1' or "
                             f"'mps')") from None
    if not isinstance(device, torch.device):
        raise InputError(f"device: expected a string such as 'cpu' or 'cuda', or a torch.device, got {brief(device)}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device: {device} was asked for, but CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"device: {device} does not exist; this machine has {torch.cuda.device_count()} "
                             f"CUDA device(s)")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise InputError("device: 'mps' was asked for, but MPS is not available on this machine")
    elif device.type != "cpu":
        raise InputError(f"device: {device.type!r} devices are not supported (use 'cpu', 'cuda' or 'mps')")
    return device


def _placer(device, device_map, max_memory, offload_folder):
    """The placement of a load over several devices and disk (None for one device), its arguments checked."""
    if device_map is None and max_memory is None and offload_folder is None:
        return None
    from .placement import Placer  # placement needs accelerate, an optional dependency
    return Placer.from_arguments(device, device_map, max_memory, offload_folder)


def _check_arguments(revision, experts, expert_names, progress) -> None:
    """The types of load_model's other arguments, before anything is read or downloaded."""
    if revision is not None and not isinstance(revision, str):
        raise InputError(f"revision: expected a branch, tag or commit name (str), got {brief(revision)}")
    if progress is not None and not isinstance(progress, bool):
        raise InputError(f"progress: expected True, False or None, got {brief(progress)}")
    collections = (list, tuple, set, frozenset)
    if experts is not None and (isinstance(experts, bool) or not isinstance(experts, (str, int, *collections))):
        raise ExpertError(f"experts: expected a name, an index or a list of them, got {brief(experts)}")
    if isinstance(experts, collections) and not experts:
        raise ExpertError("experts: the list of experts is empty")
    if expert_names is not None:
        if not isinstance(expert_names, (list, tuple)) or not all(isinstance(n, str) and n for n in expert_names):
            raise ExpertError(f"expert_names: expected a list of non-empty strings, one per expert, got "
                              f"{brief(expert_names)}")
        if not expert_names:
            raise ExpertError("expert_names: the list is empty; give one name per expert")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _stored_dtype(readers, plan) -> torch.dtype:
    """The floating dtype the checkpoint's first weight is stored in."""
    source = next(iter(plan.values()))
    return readers[source.path].dtype(source.tensor)


FUSED = re.compile(r"(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")
ROUTER = re.compile(r"model\.layers\.\d+\.mlp\.gate\.weight")


@dataclass(frozen=True)
class _Source:
    """Where one model tensor comes from: a file's tensor of a known header shape, whole or some rows of it."""

    path: str
    tensor: str
    shape: tuple  # what its header entry must say
    rows: int | list[int] | None = None  # one expert of a fused tensor, or the router rows of the kept experts
    half: int | None = None  # 0 / 1: the gate / up half of a fused gate_up_proj row

    def read(self, readers) -> torch.Tensor:
        f = readers[self.path]
        if self.rows is None:
            t = f.read(self.tensor)
        else:
            t = f.read(self.tensor, [self.rows])[0] if isinstance(self.rows, int) else f.read(self.tensor, self.rows)
        # the gate or up half of a (2I, H) fused row: a copy, as a view would keep both halves alive
        return t if self.half is None else t.chunk(2, dim=0)[self.half].clone()


def _plan(config: OlmoConfig, keep: list[int] | None, locations: dict[str, str], expected: dict,
          total_experts: int) -> dict[str, _Source]:
    """{model tensor name: its _Source}, reading only what is needed.

    Handles the per-expert and fused FlexOlmo layouts and the expert subset (`keep`, in checkpoint
    numbering, of `total_experts`). Raises MissingTensorError / UnexpectedTensorError naming the tensors.
    """
    experts = keep if keep is not None else list(range(config.num_experts))
    plan, used, missing = {}, set(), []
    for name, shape in expected.items():
        m = FUSED.fullmatch(name)
        if m:
            prefix, local, proj = m.group(1), int(m.group(2)), m.group(3)
            source = f"{prefix}.{experts[local]}.{proj}.weight"
            if source in locations:
                plan[name] = _Source(locations[source], source, shape)
                used.add(source)
                continue
            fused = f"{prefix}.{'down_proj' if proj == 'down_proj' else 'gate_up_proj'}"
            if fused in locations:
                half = {"gate_proj": 0, "up_proj": 1}.get(proj)
                rows = shape if half is None else (2 * shape[0], shape[1])  # (H, I) or [gate; up] (2I, H)
                plan[name] = _Source(locations[fused], fused, (total_experts, *rows), experts[local], half)
                used.add(fused)
                continue
            missing.append(source)
        elif ROUTER.fullmatch(name) and name in locations and keep is not None:
            plan[name] = _Source(locations[name], name, (total_experts, shape[1]), experts)
            used.add(name)
        elif name in locations:
            plan[name] = _Source(locations[name], name, shape)
            used.add(name)
        else:
            missing.append(name)
    if missing:
        raise MissingTensorError(f"checkpoint is missing {len(missing)} tensor(s) the model needs: {_shown(missing)}")
    unexpected = [n for n in locations if n not in used and not IGNORED_KEYS.fullmatch(n)
                  and not (config.tie_word_embeddings and n == "lm_head.weight")
                  and not (keep is not None and _is_unkept_expert(n, keep))]
    if unexpected:
        raise UnexpectedTensorError(f"checkpoint has {len(unexpected)} tensor(s) this {config.model_type} model does "
                                    f"not use: {_shown(sorted(unexpected))}")
    return plan


def _is_unkept_expert(name: str, keep: list[int]) -> bool:
    m = FUSED.fullmatch(name)
    return bool(m) and int(m.group(2)) not in keep


def _check_headers(plan: dict[str, _Source], readers) -> None:
    """Each planned tensor's header entry has a floating dtype and the shape the config implies."""
    for source in plan.values():
        f = readers[source.path]
        dtype, shape = f.dtype(source.tensor), tuple(f.shape(source.tensor))
        if not dtype.is_floating_point:
            raise ShapeMismatchError(f"tensor {source.tensor!r} has dtype {dtype}; weights must be floating point")
        if shape != source.shape:
            raise ShapeMismatchError(f"tensor {source.tensor!r} has shape {shape} in the checkpoint, but the config "
                                     f"implies {source.shape}")


def _finite(name: str, tensor: torch.Tensor, stored: torch.dtype) -> torch.Tensor:
    """The tensor, if it is finite in the dtype it was cast to (an fp32 1e6 is Inf in float16)."""
    if tensor.numel():
        low, high = torch.aminmax(tensor)  # NaN and Inf reach min or max; no tensor-sized temporary, unlike isfinite
        if not (math.isfinite(low) and math.isfinite(high)):
            cast = "" if tensor.dtype == stored else f" once cast from {stored} to {tensor.dtype} (beyond its range)"
            raise CorruptCheckpointError(f"tensor {name!r} contains NaN or Inf values{cast}")
    return tensor


# ---------------------------------------------------------------------------------------- saving
def save_model(model: OlmoModel, directory: str | os.PathLike, *, max_shard_size: int | str | None = None,
               tokenizer=None) -> str:
    """Write a Hugging Face-format checkpoint that transformers' `from_pretrained` loads.

    FlexOlmo experts are written per expert (`mlp.experts.{e}.gate_proj.weight`, ...), as released.
    max_shard_size (bytes or "500MB"-style): split into shards with a `model.safetensors.index.json`.
    Files are written under temporary names and renamed only once all are complete, so a failure leaves
    the directory's files as they were.
    """
    if getattr(model, "quantization", None) is not None:
        raise QuantizationError(f"save_model: this model is quantized ({model.quantization.scheme}); olmo-lab saves "
                                f"full-precision checkpoints only. Save the original, and load it with "
                                f"quantize={model.quantization.scheme!r}")
    directory = os.fspath(directory)
    limit = _parse_size(max_shard_size)
    if any(p.is_meta for p in model.parameters()):
        raise InputError("save_model: this model's weights are offloaded (model.placement: on disk, or in CPU memory "
                         "for a GPU), not in its parameters; load it without device_map= to save it")
    os.makedirs(directory, exist_ok=True)
    config = model.config.replace(dtype=_dtype_name(model.dtype))
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    shards = _split(state, limit)
    files = {}
    if len(shards) == 1:
        files[SINGLE_FILE] = shards[0]
    else:
        for i, shard in enumerate(shards):
            files[f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"] = shard
    outputs = {"config.json": config.to_dict(), "generation_config.json": _generation_config(config)}
    if len(shards) > 1:
        weight_map = {name: fname for fname, shard in files.items() for name in shard}
        total = sum(t.numel() * t.element_size() for t in state.values())
        outputs[INDEX_FILE] = {"metadata": {"total_size": total,
                                            "total_parameters": sum(t.numel() for t in state.values())},
                               "weight_map": dict(sorted(weight_map.items()))}
    writers = {fname: lambda p, shard=shard: save_file(shard, p, metadata={"format": "pt"})
               for fname, shard in files.items()}
    writers.update({fname: lambda p, obj=obj: _write_json(p, obj) for fname, obj in outputs.items()})
    _write_all(directory, writers)
    stale = [SINGLE_FILE] if len(shards) > 1 else [INDEX_FILE]
    for fname in stale + [f for f in os.listdir(directory) if re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", f)
                          and f not in files]:
        if os.path.exists(os.path.join(directory, fname)):
            os.remove(os.path.join(directory, fname))
    if tokenizer is not None:
        tokenizer.save(directory)
    return directory


def _generation_config(config: OlmoConfig) -> dict:
    return {"eos_token_id": config.eos_token_id, "pad_token_id": config.pad_token_id,
            "bos_token_id": config.bos_token_id, "do_sample": False}


def _write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def _write_all(directory: str, writers: dict) -> None:
    """Run every `writers[fname](path)` on a temporary file, then rename them all into place.

    Nothing is renamed until every file is complete, so a failure (disk full, Ctrl-C) leaves the
    directory as it was: no half-written file and no new shard next to an old config or index.
    """
    umask = os.umask(0)
    os.umask(umask)
    done = {}
    try:
        for fname, write in writers.items():
            fd, done[fname] = tempfile.mkstemp(prefix=f".{fname}.", dir=directory)
            os.close(fd)
            write(done[fname])
            os.chmod(done[fname], 0o666 & ~umask)  # mkstemp made it private; saved files get the usual permissions
    except BaseException:
        for tmp in done.values():
            os.remove(tmp)
        raise
    for fname, tmp in done.items():
        os.replace(tmp, os.path.join(directory, fname))


def _parse_size(size) -> int | None:
    """max_shard_size in bytes: None, a positive int, or a string like '500MB'."""
    if size is None:
        return None
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)\s*", str(size).upper()) if isinstance(size, str) else None
    value = int(float(m.group(1)) * {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[m.group(2)]) if m else 0
    if value <= 0:
        raise InputError(f"max_shard_size: expected a positive number of bytes or a size like '500MB', got {size!r}")
    return value


def _split(state: dict, limit: int | None) -> list[dict]:
    """Greedy split of the state dict into shards of at most `limit` bytes (a bigger tensor gets its own)."""
    shards, current, size = [], {}, 0
    for name, t in state.items():
        n = t.numel() * t.element_size()
        if limit is not None and current and size + n > limit:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += n
    shards.append(current)
    return shards


def checkpoint_size(directory: str) -> int:
    """Bytes of weights in a checkpoint directory."""
    _, files = _weight_files(directory)
    return sum(os.path.getsize(p) for p in files)


