"""Weight-only int8 / int4 quantization of the model's linear layers with torchao, applied while loading.

`load_model(..., quantize="int8" | "int4", group_size=128)` quantizes each matrix as soon as it is read, so
the full-precision model never exists: the peak is the quantized model plus one matrix (and torchao's
temporaries for it). The schemes are torchao's weight-only configurations, used as they are:
- int8: `Int8WeightOnlyConfig` (symmetric, one scale per output row; `group_size` does not apply);
- int4: groups of `group_size` input columns, asymmetric, tinygemm's scales and zero points.

Which kernel runs, per device, and why. Measured over the ~150M OLMo 3's matrices, batch-1 matrix-vector
products on 2 CPU threads (passes/s): fp32 17.5, bf16 37.5, torchao's Int8WeightOnlyConfig linear 16.4
(it converts the whole int8 matrix to the activation dtype on every call, so it is slower than bf16),
torch's `torch._weight_int8pack_mm` ~73 (reads the int8 bytes directly), torchao's CPU int4 layout ~110.
- CPU, int8 ("int8pack"): torchao's config computes the int8 values and scales; torch's
  `_weight_int8pack_mm` multiplies with them.
- CPU, int4 ("int4pack"): torchao's CPU layout `PrototypeInt4WeightOnlyConfig` (an Int4OpaqueTensor), whose
  product is torch's `_weight_int4pack_mm_for_cpu`, called directly (torchao's Python dispatch to it costs
  time on every call). It packs output rows in multiples of 16, so other matrices (a vocabulary of 100278)
  are padded with zero rows and the output is cut back.
- CUDA, int8: torchao's Int8Tensor linear (fast under torch.compile). CUDA, int4: `Int4WeightOnlyConfig`
  in the "tile_packed_to_4d" format, which runs torch's own tinygemm kernel (bf16, compute capability
  >= 8.0); torchao's default "plain" format needs a separate CUDA-only kernel package.
The fast CPU kernels are bf16 kernels (fp32 activations run them ~10x slower), so a quantized model's
activations and unquantized weights default to bfloat16; float32 is allowed, for accuracy, not speed.

What is quantized: q/k/v/o of every attention, the dense MLP, every expert of every FlexOlmo layer, and
lm_head (read in full for every decoded token: a third of the ~150M model's bytes). Kept in the model
dtype: the token embeddings (a lookup reads one row per token, so quantizing them saves memory, not
time), norms, a tied lm_head (it is the embedding), and the router: a tiny (E, H) matrix whose logit
differences decide the top-k. On flexolmo-lab (10 held-out samples x 100 tokens) top-1 routing agrees with
bf16 for 99.5% (int8) and 96.4% (int4) of token-layers with the router kept, 99.1% and 92.0% with it
quantized too, which would save 2.5 KiB a layer.
`model.quantization` reports what was quantized and the bytes. A quantized model cannot be saved.
"""

from __future__ import annotations

import ctypes
import importlib
import logging
import re
import sys
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import QuantizationError, brief

SCHEMES = ("int8", "int4")
GROUP_SIZES = {"cpu": (32, 64, 128), "cuda": (32, 64, 128, 256)}  # what each device's int4 kernel packs
DEFAULT_GROUP_SIZE = 128
CPU_INT4_ROWS = 16  # torch's CPU int4 packing takes output rows in multiples of 16
QUANTIZED = re.compile(r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(experts\.\d+\.)?(gate|up|down)_proj)"
                       r"\.weight|lm_head\.weight")


@dataclass
class Quantization:
    """What `load_model(quantize=...)` did: the scheme, the kernel, every quantized matrix and the bytes."""

    scheme: str
    group_size: int | None  # int4's group of input columns; None for int8 (one scale per row)
    kernel: str
    dtype: str  # of the activations and of everything kept unquantized
    modules: list[str] = field(default_factory=list)  # the quantized linear layers, in load order
    kept: list[str] = field(default_factory=list)  # matrices kept in `dtype`: embeddings, routers, tied lm_head
    bytes_before: int = 0  # the quantized matrices in `dtype`
    bytes_after: int = 0  # the same matrices quantized: values, scales and zero points

    def count(self, kind: str) -> int:
        """Quantized layers of one kind: "attention", "mlp" (dense), "experts" or "lm_head"."""
        pattern = {"attention": ".self_attn.", "experts": ".mlp.experts.", "lm_head": "lm_head"}
        if kind == "mlp":
            return sum(".mlp." in m and ".experts." not in m for m in self.modules)
        return sum(pattern[kind] in m for m in self.modules)

    def __str__(self) -> str:
        group = f", groups of {self.group_size}" if self.group_size else ", per output row"
        kinds = ", ".join(f"{kind} {self.count(kind)}" for kind in ("attention", "mlp", "experts", "lm_head"))
        return (f"{self.scheme} weight-only{group} ({self.kernel}): {len(self.modules)} linear layers ({kinds}), "
                f"{self.bytes_before / 2**20:.1f} MiB -> {self.bytes_after / 2**20:.1f} MiB; "
                f"kept in {self.dtype}: {len(self.kept)} matrices ({', '.join(_kinds(self.kept))})")


def _kinds(names: list[str]) -> list[str]:
    kinds = {"embed_tokens": "embeddings", "mlp.gate": "routers", "lm_head": "tied lm_head"}
    return [label for key, label in kinds.items() if any(key in n for n in names)]


class QuantizedLinear(nn.Module):
    """A bias-optional linear layer whose weight is a torchao quantized tensor (out_features, in_features)."""

    def __init__(self, weight: torch.Tensor, out_features: int, kernel: str):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], out_features  # weight may have padding rows
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None  # an attention bias (attention_bias=True), in the activation dtype: set by install()
        self.kernel = kernel
        if kernel == "int8pack":  # torch's kernel takes one scale per row in the activation dtype
            self.register_buffer("row_scale", weight.scale.flatten().to(weight.dtype), persistent=False)

    def product(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) @ W^T -> (..., out) through the chosen kernel, without the bias and without autograd.

        On CPU the torch kernels are called directly with torchao's tensors: torchao's own dispatch to
        the same kernel costs Python time on every call, which decoding small models notices.
        """
        w, x2 = self.weight, x.reshape(-1, self.in_features).contiguous()  # (T, in)
        if self.kernel == "int8pack":
            y = torch._weight_int8pack_mm(x2, w.qdata, self.row_scale)
        elif self.kernel == "int4pack":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, w.qdata, w.block_size[1], w.scale_and_zero)
        else:
            y = F.linear(x2, w)
        y = y[:, :self.out_features] if y.shape[-1] != self.out_features else y  # CPU int4's padding rows
        return y.reshape(*x.shape[:-1], self.out_features)  # (T, out) -> (..., out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:  # attribution patching: gradients reach the input
            y = _QuantizedProduct.apply(x, self)
        else:
            y = self.product(x)
        return y if self.bias is None else y + self.bias

    def dequantized(self) -> torch.Tensor:
        """The weight the kernel multiplies with, (out, in) in the activation dtype: (I @ W^T)^T."""
        eye = torch.eye(self.in_features, dtype=self.weight.dtype, device=self.weight.device)
        return self.product(eye).t().contiguous()

    def weight_row(self, index: int) -> torch.Tensor:
        """Row `index` (in,) of the weight the kernel multiplies with (an unembedding, for logit attribution).

        int8: its values times its scale. int4's packed layouts keep no row apart: the row comes out of
        products with the identity, 256 columns at a time (O(in^2 x out): instant on the lab models, seconds
        on a 7B's lm_head).
        """
        w = self.weight
        if self.kernel in ("int8pack", "torchao int8"):
            return w.qdata[index].to(w.dtype) * w.scale.flatten()[index].to(w.dtype)
        eye = torch.eye(self.in_features, dtype=w.dtype, device=w.device)
        return torch.cat([self.product(block)[:, index] for block in eye.split(256)])

    @property
    def nbytes(self) -> int:
        """Bytes held: quantized values, scales and zero points (and the row scales of the int8 kernel)."""
        inner = [getattr(self.weight, n) for n in (*self.weight.tensor_data_names,
                                                   *getattr(self.weight, "optional_tensor_data_names", ()))]
        inner += list(self.buffers())
        return sum(t.numel() * t.element_size() for t in inner if isinstance(t, torch.Tensor))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.kernel}"


class _QuantizedProduct(torch.autograd.Function):
    """The quantized product with a gradient for its input (the weights are constants)."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return layer.product(x)

    @staticmethod
    def backward(ctx, grad):
        return grad @ ctx.layer.dequantized(), None  # (..., out) @ (out, in)


@dataclass(frozen=True)
class Quantizer:
    """One load's quantization settings, checked before anything is read; quantizes matrices as they arrive."""

    scheme: str
    group_size: int | None
    device: torch.device
    dtype: torch.dtype

    @classmethod
    def parse(cls, scheme, group_size, device: torch.device, dtype: torch.dtype | None) -> "Quantizer | None":
        """The settings for load_model's `quantize=`, `group_size=`: QuantizationError naming any problem."""
        if scheme is None:
            if group_size is not None:
                raise QuantizationError(f"group_size: {brief(group_size)} was given without quantize='int4'")
            return None
        if not isinstance(scheme, str) or scheme not in SCHEMES:
            raise QuantizationError(f"quantize: unknown scheme {brief(scheme)} (use 'int8' or 'int4', or None)")
        if device.type not in GROUP_SIZES:
            raise QuantizationError(f"quantize: {scheme} runs on 'cpu' and 'cuda' devices, not {device.type!r}")
        if scheme == "int8" and group_size is not None:
            raise QuantizationError("group_size: int8 has one scale per output row; group_size applies to int4")
        if scheme == "int4":
            group_size = DEFAULT_GROUP_SIZE if group_size is None else group_size
            sizes = GROUP_SIZES[device.type]
            if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size not in sizes:
                raise QuantizationError(f"group_size: {brief(group_size)} is not one the {device.type} int4 kernel "
                                        f"supports ({', '.join(map(str, sizes))})")
        dtype = torch.bfloat16 if dtype is None else dtype
        if dtype not in (torch.bfloat16, torch.float32):
            raise QuantizationError(f"dtype: quantized models compute in torch.bfloat16 (fast) or torch.float32, "
                                    f"not {dtype}")
        if device.type == "cuda" and scheme == "int4":
            if dtype != torch.bfloat16:
                raise QuantizationError("dtype: int4 on CUDA runs torch's tinygemm kernel, which takes bfloat16 only")
            if torch.cuda.get_device_capability(device)[0] < 8:
                raise QuantizationError(f"quantize: int4 on CUDA needs compute capability >= 8.0; {device} has "
                                        f"{torch.cuda.get_device_capability(device)}")
        _torchao()  # QuantizationError now, before any file is read, if torchao is missing
        return cls(scheme, group_size, device, dtype)

    @property
    def kernel(self) -> str:
        if self.device.type == "cpu":
            return "int8pack" if self.scheme == "int8" else "int4pack"
        return "torchao int8" if self.scheme == "int8" else "torchao int4 tile_packed_to_4d"

    def check(self, shapes: dict[str, tuple], tied: bool) -> None:
        """Every matrix to quantize fits the scheme (int4: whole groups per row), before a byte is read."""
        if self.scheme != "int4":
            return
        for name, shape in shapes.items():
            if self.quantizes(name, tied) and shape[1] % self.group_size:
                raise QuantizationError(f"group_size: {self.group_size} does not divide the {shape[1]} input columns "
                                        f"of {name!r}; choose one of {GROUP_SIZES[self.device.type]} that does")

    def quantizes(self, name: str, tied: bool) -> bool:
        """Whether the model tensor `name` is quantized (see the module docstring for what is kept, and why)."""
        return bool(QUANTIZED.fullmatch(name)) and not (tied and name == "lm_head.weight")

    def quantize(self, weight: torch.Tensor) -> QuantizedLinear:
        """One (out, in) matrix in the activation dtype, quantized with torchao's configuration for this device."""
        ao = _torchao()
        _release_freed_memory()  # the previous matrix's full-precision copy is gone by now
        rows = weight.shape[0]
        if self.kernel == "int4pack" and rows % CPU_INT4_ROWS:
            weight = F.pad(weight, (0, 0, 0, -rows % CPU_INT4_ROWS))  # zero rows, cut from the output again
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
        linear.weight = nn.Parameter(weight, requires_grad=False)
        ao.quantize_(linear, self._config(ao))
        if not isinstance(linear.weight, ao.TorchAOBaseTensor):  # torchao skips what it cannot take, silently
            raise QuantizationError(f"torchao left a {tuple(weight.shape)} matrix unquantized under {self.scheme}")
        return QuantizedLinear(linear.weight.data, rows, self.kernel)

    def _config(self, ao):
        """torchao's weight-only configuration; no global torch.compile settings are changed."""
        if self.scheme == "int8":
            return ao.Int8WeightOnlyConfig(set_inductor_config=False)
        if self.device.type == "cpu":
            return ao.PrototypeInt4WeightOnlyConfig(group_size=self.group_size, set_inductor_config=False)
        return ao.Int4WeightOnlyConfig(group_size=self.group_size, int4_packing_format="tile_packed_to_4d",
                                       set_inductor_config=False)

    def install(self, model: nn.Module, layers: dict[str, QuantizedLinear]) -> Quantization:
        """Put the quantized layers in place of the model's (meta) linear layers; returns the report."""
        report = Quantization(self.scheme, self.group_size, self.kernel, str(self.dtype).removeprefix("torch."))
        for name, layer in layers.items():
            path = name.removesuffix(".weight")
            parent, _, child = path.rpartition(".")
            old = getattr(model.get_submodule(parent), child)
            if old.bias is not None:
                layer.bias = nn.Parameter(old.bias.detach(), requires_grad=False)
            setattr(model.get_submodule(parent), child, layer)
            report.modules.append(path)
            report.bytes_before += layer.in_features * layer.out_features * self.dtype.itemsize
            report.bytes_after += layer.nbytes
        tied = model.config.tie_word_embeddings
        report.kept = ["model.embed_tokens"] + (["lm_head"] if tied else []) + \
            [f"model.layers.{i}.mlp.gate" for i in range(model.config.num_hidden_layers) if model.config.is_moe]
        return report


def check_conversion(model: nn.Module, fn) -> None:
    """Refuse `model.to(...)`, `.float()`, ... that would change a quantized model's dtype or device, before
    anything changes: the packed layouts belong to one device and activation dtype."""
    probe = torch.empty(0, dtype=model.dtype, device=model.device)
    after = fn(probe)
    if isinstance(after, torch.Tensor) and (after.dtype, after.device) != (probe.dtype, probe.device):
        raise QuantizationError(f"this model is quantized ({model.quantization.scheme}) for {probe.dtype} on "
                                f"{probe.device}; to get {after.dtype} on {after.device}, load it again with "
                                f"dtype= and device= (and quantize=)")


def _release_freed_memory() -> None:
    """Give freed heap memory back to the system (glibc's malloc_trim; nothing elsewhere).

    Each full-precision matrix is freed once quantized, but glibc keeps the freed blocks, fragmented by
    the small quantized tensors allocated between them; without this the resident size of a load grows
    by about the full-precision model after all (measured: 171 MB instead of 40 MB for a 105 MB checkpoint).
    """
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _glibc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _glibc() if sys.platform.startswith("linux") else None


def _torchao() -> SimpleNamespace:
    """The torchao names olmo-lab uses, imported only when a model is quantized (torchao is optional)."""
    # A CPU-only torch cannot load torchao's CUDA kernel libraries, and torchao warns about each one; torch
    # warns that torchao registers an Enum the old way. Neither concerns a user: both are silenced here.
    quiet = [logging.getLogger("torch.utils._pytree")]
    if "torchao" not in sys.modules and not torch.cuda.is_available():
        quiet.append(logging.getLogger("torchao"))
    levels = [log.level for log in quiet]
    for log in quiet:
        log.setLevel(logging.ERROR)
    try:
        try:
            torchao = importlib.import_module("torchao")
        except ImportError as e:
            raise QuantizationError(f"quantize= needs torchao, which is not installed ({e}); install it with "
                                    f"pip install 'olmo-lab[quant]' (torchao==0.18.0)") from None
        try:
            quantization = importlib.import_module("torchao.quantization")
            int4 = importlib.import_module("torchao.prototype.quantization.int4")
            return SimpleNamespace(quantize_=quantization.quantize_,
                                   Int8WeightOnlyConfig=quantization.Int8WeightOnlyConfig,
                                   Int4WeightOnlyConfig=quantization.Int4WeightOnlyConfig,
                                   PrototypeInt4WeightOnlyConfig=int4.PrototypeInt4WeightOnlyConfig,
                                   TorchAOBaseTensor=importlib.import_module("torchao.utils").TorchAOBaseTensor)
        except (ImportError, AttributeError) as e:
            raise QuantizationError(f"quantize= needs torchao 0.18 (pip install 'olmo-lab[quant]'); the installed "
                                    f"torchao {getattr(torchao, '__version__', '?')} lacks what it uses ({e})") from None
    finally:
        for log, level in zip(quiet, levels):
            log.setLevel(level)
