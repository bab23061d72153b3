"""Placing a model over GPUs, CPU memory and disk while it loads, with accelerate's device maps and hooks.

    model = load_model("allenai/FlexOlmo-7x7B-1T", dtype=torch.bfloat16, device_map="auto",
                       max_memory={0: "22GiB", "cpu": "24GiB"}, offload_folder="offload")

A device map sends modules to places: whole decoder blocks (`model.layers.N`), `model.embed_tokens`,
`model.norm`, `lm_head`, `model.layers` or `model` (everything under them), or "" (the whole model), each to
a GPU (an index or "cuda:N"), "mps", "cpu" or "disk". "auto" asks accelerate's `infer_auto_device_map`
(with `get_balanced_memory` over several GPUs): GPUs first, then CPU memory, then disk, never splitting a
block (`no_split_module_classes`), within `max_memory` ({device: bytes or "20GiB"}; default: what is free).

Each tensor is read, cast and checked once, then put in its place: on its device; in CPU memory for a
module that runs on a GPU (copied over for each of its forwards); or, for "disk", written to a private
folder inside `offload_folder` in accelerate's offload format (`offload_weight`: one `.dat` file per
tensor and an index) and dropped. The whole model is never in memory at once. `dispatch_model` then
attaches accelerate's hooks: each block gets its inputs on its own device and, when offloaded, loads its
weights for its forward only (`preload_module_classes`: the whole block at once) and drops them after;
the logits come back on the device of the input ids (`model.device`, the main device). Hook points,
traces (recorded on CPU), expert toggles, interventions, the KV cache (each layer's keys on its layer's
device) and `generate` work as on one device. A failed load removes what it wrote; the private offload
folder is removed when the model is freed (by the garbage collector: accelerate's hooks, which wrap
each module's forward, make reference cycles).
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import shutil
import tempfile
import weakref
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..errors import InputError, PlacementError, brief
from .checkpoint import _parse_device

UNIT = "Block"  # the decoder block class: it never spans two devices (its residual stream stays on one)
INSIDE_BLOCK = re.compile(r"model\.layers\.\d+\..+")
PLACES = "a GPU index or 'cuda:N', 'mps', 'cpu' or 'disk'"


@dataclass(frozen=True)
class Placement:
    """Where a placed model's weights live: `model.placement`."""

    device_map: dict  # module name -> 0, 1, ... (GPUs), "mps", "cpu" or "disk", as accelerate's hf_device_map
    main_device: torch.device  # where inputs go and where CPU- and disk-offloaded modules run
    offload_folder: str | None  # this model's private folder of disk-offloaded weights, removed with the model
    bytes: dict  # bytes of weights per place ("cuda:0", "cpu", "disk", ...)


def accelerate():
    """The accelerate package, or a PlacementError saying how to install it (the library runs without it)."""
    try:
        import accelerate as module
    except ImportError:
        raise PlacementError("device_map= places a model with accelerate, which is not installed: "
                             "pip install 'olmo-lab[placement]' (accelerate==1.16.0)") from None
    return module


def parse_place(place, what: str):
    """A device-map value or max_memory key in accelerate's form: a GPU index, "mps", "cpu" or "disk"."""
    if place == "disk":
        return "disk"
    if isinstance(place, int) and not isinstance(place, bool):
        if place < 0:
            raise PlacementError(f"{what}: GPU index {place} is negative")
        place = f"cuda:{place}"
    if not isinstance(place, (str, torch.device)):
        raise PlacementError(f"{what}: expected {PLACES}, got {brief(place)}")
    try:
        device = _parse_device(place)
    except InputError as e:  # it names the device: say where it came from
        raise PlacementError(f"{what}: {str(e).removeprefix('device: ')}") from None
    return (device.index or 0) if device.type == "cuda" else device.type


def place_name(place) -> str:
    return f"cuda:{place}" if isinstance(place, int) else place


def torch_device(place) -> torch.device:
    """The device a place keeps tensors in memory on: its GPU, "mps", else the CPU (for "cpu" and "disk")."""
    return torch.device("cuda", place) if isinstance(place, int) else torch.device("mps" if place == "mps" else "cpu")


class Placer:
    """One load's placement: checks the arguments, decides each tensor's place, and dispatches the model."""

    def __init__(self, device_map, max_memory, offload_folder):
        self.requested, self.max_memory, self.offload_folder = device_map, max_memory, offload_folder
        self.map: dict = {}  # module -> place
        self.places: dict[str, object] = {}  # tensor name -> place
        self.main = "cpu"  # the main device, in accelerate's form
        self.folder, self.created = None, None  # the private offload folder, and a parent this load made
        self.index: dict = {}  # disk-offloaded tensors: name -> dtype and shape (accelerate's offload index)
        self.cpu_state: dict = {}  # tensors kept in CPU memory for modules that run on a GPU
        self.bytes: dict[str, int] = {}
        self.tied = False

    # ------------------------------------------------------------------ before anything is read
    @classmethod
    def from_arguments(cls, device, device_map, max_memory, offload_folder) -> "Placer | None":
        """A Placer for load_model's placement arguments (None without device_map), all of them checked."""
        if device_map is None:
            for name, value in (("max_memory", max_memory), ("offload_folder", offload_folder)):
                if value is not None:
                    raise PlacementError(f"{name}: only applies with device_map= (e.g. device_map='auto')")
            return None
        if device is not None:
            raise PlacementError(f"device={brief(device)} and device_map= both say where the model goes; give one "
                                 f"(device_map={{'': {brief(str(device))}}} puts it all on one device)")
        if isinstance(device_map, dict):
            if not device_map:
                raise PlacementError("device_map: the map is empty; give each module a place, or use 'auto'")
            bad = [k for k in device_map if not isinstance(k, str)]
            if bad:
                raise PlacementError(f"device_map: keys are module names (str), got {brief(bad[0])}")
            device_map = {k: parse_place(v, f"device_map[{k!r}]") for k, v in device_map.items()}
        elif device_map != "auto":
            raise PlacementError(f"device_map: expected 'auto' or {{module name: place}}, got {brief(device_map)}")
        accelerate()
        if max_memory is not None:
            max_memory = cls._parse_memory(max_memory)
        if offload_folder is not None and not (isinstance(offload_folder, (str, os.PathLike))
                                               and os.fspath(offload_folder) and "\0" not in os.fspath(offload_folder)):
            raise PlacementError(f"offload_folder: expected a directory path, got {brief(offload_folder)}")
        return cls(device_map, max_memory, None if offload_folder is None else os.fspath(offload_folder))

    @staticmethod
    def _parse_memory(max_memory) -> dict:
        """{place: bytes}: sizes as ints or strings such as "20GiB" / "500MB", every place an existing one."""
        if not isinstance(max_memory, dict) or not max_memory:
            raise PlacementError(f"max_memory: expected {{place: bytes or '20GiB'}}, got {brief(max_memory)}")
        from accelerate.utils import convert_file_size_to_int
        parsed = {}
        for key, size in max_memory.items():
            place = parse_place(key, f"max_memory key {brief(key)}")
            try:
                n = convert_file_size_to_int(size) if isinstance(size, str) else size
            except ValueError:
                n = None
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise PlacementError(f"max_memory[{key!r}]: expected a number of bytes or a size like '20GiB', "
                                     f"got {brief(size)}")
            parsed[place] = n
        return parsed

    # ------------------------------------------------------------------ once the model shell exists
    def plan(self, model, dtype: torch.dtype, names) -> None:
        """Decide the place of every module and of each tensor in `names`; make the offload folder if needed."""
        self.tied = model.config.tie_word_embeddings
        model.to(dtype)  # still all on meta, so free: offloaded weights come back in the parameters' dtype
        self.map = self._infer(model, dtype) if self.requested == "auto" else self._check_map(model)
        for name in names:
            self.places[name] = self.place_of(name)
        places = list(dict.fromkeys(self.map.values()))
        if self.tied and self.place_of("lm_head.weight") != self.place_of("model.embed_tokens.weight"):
            raise PlacementError("device_map: lm_head shares its weight with model.embed_tokens "
                                 "(tie_word_embeddings); give both the same place")
        self.main = next((p for p in places if p not in ("cpu", "disk")), "cpu")
        if "disk" in places:
            self._make_folder([m for m, p in self.map.items() if p == "disk"])

    def _infer(self, model, dtype) -> dict:
        """accelerate's automatic map within max_memory: GPUs (balanced), then CPU memory, then disk."""
        from accelerate.utils import get_balanced_memory, get_max_memory, infer_auto_device_map
        memory = get_max_memory(dict(self.max_memory) if self.max_memory else None)
        if sum(isinstance(p, int) for p in memory) > 1:
            memory = get_balanced_memory(model, memory, no_split_module_classes=[UNIT], dtype=dtype)
        device_map = dict(infer_auto_device_map(model, max_memory=memory, no_split_module_classes=[UNIT], dtype=dtype))
        if set(device_map.values()) == {"disk"} and self.max_memory is not None:
            units = [model.model.embed_tokens, *model.model.layers, model.lm_head]
            smallest, largest = min(_bytes(m, dtype) for m in units), max(_bytes(m, dtype) for m in units)
            raise PlacementError(f"max_memory: {self._shown_memory()} has room for none of the model's modules in "
                                 f"{_dtype_name(dtype)}: the smallest takes {smallest:,} bytes, on top of the "
                                 f"{largest:,} bytes kept free to load the largest offloaded one back for its forward; "
                                 f"give more, or device_map={{'': 'disk'}} to keep every weight on disk")
        return device_map

    def _shown_memory(self) -> str:
        return "{" + ", ".join(f"{place_name(p)!r}: {n:,}" for p, n in self.max_memory.items()) + "}"

    def _check_map(self, model) -> dict:
        """An explicit map: existing modules, whole blocks, no module inside another, every weight covered."""
        modules = dict(model.named_modules())
        for key in self.requested:
            if key not in modules:
                near = difflib.get_close_matches(key, [m for m in modules if not INSIDE_BLOCK.fullmatch(m)], n=1)
                hint = f"; did you mean {near[0]!r}?" if near else " (names are like 'model.layers.3', 'lm_head')"
                raise PlacementError(f"device_map: the model has no module {key!r}{hint}")
            if INSIDE_BLOCK.fullmatch(key):
                block = ".".join(key.split(".")[:3])
                raise PlacementError(f"device_map: {key!r} is part of the decoder block {block!r}, which runs on one "
                                     f"device; place the whole block")
        for key in self.requested:
            outer = [k for k in self.requested if k != key and (k == "" or key.startswith(k + "."))]
            if outer:
                raise PlacementError(f"device_map: {key!r} lies inside {outer[0]!r}, which is placed too; "
                                     f"name each module once")
        uncovered = [n for n in model.state_dict() if self._key_of(n, self.requested) is None]
        if uncovered:
            modules_left = list(dict.fromkeys(n.rsplit(".", 1)[0] for n in uncovered))
            raise PlacementError(f"device_map: no place for {len(modules_left)} module(s): "
                                 f"{', '.join(modules_left[:6])}{' ...' if len(modules_left) > 6 else ''}")
        return dict(self.requested)

    @staticmethod
    def _key_of(name: str, device_map: dict) -> str | None:
        """The device-map key that covers tensor or module `name` (the longest one), if any."""
        keys = [k for k in device_map if k == "" or name == k or name.startswith(k + ".")]
        return max(keys, key=len) if keys else None

    def place_of(self, name: str):
        return self.map[self._key_of(name, self.map)]

    def _make_folder(self, disk_modules: list[str]) -> None:
        if self.offload_folder is None:
            raise PlacementError(f"device_map puts {len(disk_modules)} module(s) on disk ({', '.join(disk_modules[:4])}"
                                 f"{' ...' if len(disk_modules) > 4 else ''}): give offload_folder= for their weights"
                                 + (", or more max_memory" if self.requested == "auto" else ""))
        parent = os.path.abspath(self.offload_folder)
        try:
            top = parent  # the highest folder this load creates, removed again if the load fails
            while not os.path.exists(os.path.dirname(top)) and os.path.dirname(top) != top:
                top = os.path.dirname(top)
            self.created = None if os.path.exists(parent) else top
            os.makedirs(parent, exist_ok=True)
            self.folder = tempfile.mkdtemp(prefix="olmo-lab-offload-", dir=parent)
        except OSError as e:
            self.discard()
            raise PlacementError(f"offload_folder: cannot write offloaded weights to {self.offload_folder!r}: "
                                 f"{e.strerror or e}") from None

    # ------------------------------------------------------------------ while tensors are read
    def device_for(self, name: str) -> torch.device:
        """Where tensor `name` is read to: its GPU, or CPU memory (for CPU and disk places)."""
        return torch_device(self.places[name])

    def keep(self, name: str, tensor: torch.Tensor) -> bool:
        """Put a read tensor in its place; True if it goes into the model itself (resident on its device)."""
        place = self.places[name]
        where = place_name(place)
        self.bytes[where] = self.bytes.get(where, 0) + tensor.numel() * tensor.element_size()
        aliases = [name] + (["lm_head.weight"] if self.tied and name == "model.embed_tokens.weight" else [])
        if place == "disk":
            from accelerate.utils import offload_weight
            try:
                for alias in aliases:
                    offload_weight(tensor, alias, self.folder, self.index)
            except OSError as e:
                raise PlacementError(f"offload_folder: writing {name!r} to {self.folder!r} failed: "
                                     f"{e.strerror or e}") from None
            return False
        if place == "cpu" and self.main not in ("cpu", "mps"):  # runs on the main GPU, weights wait in CPU memory
            for alias in aliases:
                self.cpu_state[alias] = tensor
            return False
        return True

    # ------------------------------------------------------------------ after every tensor is read
    def dispatch(self, model) -> None:
        """Attach accelerate's hooks (inputs to each block's device, offloaded weights in for each forward)."""
        from accelerate import dispatch_model
        with _quiet("accelerate.big_modeling"):  # it warns that offloaded parameters are on meta: that is the plan
            dispatch_model(model, self.map, main_device=self.main,
                           state_dict=self.cpu_state or None, offload_dir=self.folder,
                           offload_index=self.index or None, preload_module_classes=[UNIT])
        # Autograd would save each block's weights for a backward pass, so a plain forward would end with
        # every offloaded weight back in memory: weights of a placed model are frozen (activations can still
        # take gradients, as attribution patching needs).
        model.requires_grad_(False)
        if self.folder is not None:
            weakref.finalize(model, _remove, self.folder, None)
        model.placement = Placement(dict(self.map), torch_device(self.main), self.folder, dict(self.bytes))

    def discard(self) -> None:
        """Forget everything read so far and remove what this load wrote to disk (after a failure)."""
        self.cpu_state.clear()
        self.index.clear()
        _remove(self.folder, self.created)
        self.folder = self.created = None


def parameter(model, name: str) -> torch.Tensor:
    """A parameter's values, also where a placed model offloads them (its own tensor is then on meta).

    For code that reads weights directly instead of calling the module (e.g. direct logit attribution):
    the offloaded copy is found through the accelerate hook of the module that loads it for its forward
    (the parameter's own module, or its decoder block), and comes on that module's execution device.
    """
    p = model.get_parameter(name)
    if not p.is_meta:
        return p
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):  # the innermost module whose hook loads this weight
        hook = getattr(model.get_submodule(".".join(parts[:i])), "_hf_hook", None)
        if getattr(hook, "offload", False):
            return hook.weights_map[".".join(parts[i:])].to(hook.execution_device)
    raise PlacementError(f"{name}: the parameter has no values (it is on the meta device) and no offloaded copy")


def _remove(folder: str | None, created: str | None) -> None:
    """Delete a private offload folder, and the folders a load created above it."""
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)
    if created is not None:
        shutil.rmtree(created, ignore_errors=True)


@contextmanager
def _quiet(logger: str):
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _bytes(module, dtype: torch.dtype) -> int:
    return sum(p.numel() for p in module.parameters()) * torch.empty(0, dtype=dtype).element_size()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
