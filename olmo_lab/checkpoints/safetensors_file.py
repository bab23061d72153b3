"""A small reader for the safetensors format that reads tensors with plain file reads.

The format is an 8-byte little-endian header length, a JSON header
`{name: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {...}}`,
then the raw bytes. Reading with `readinto` instead of a memory map means the resident memory of a
load is the tensors themselves, not the tensors plus the mapped file pages, and reading only some rows
of a tensor (one expert of a fused weight, some router rows) touches only those bytes.
The header is checked in full before anything is read, as the format specifies: valid JSON within
the shared limits (no tensor named twice), known dtypes, shapes whose element count fits in int64,
offsets that match dtype and shape, and byte ranges that neither overlap nor leave holes and cover the
data exactly to the end of the file. A truncated or corrupted file is reported as
`CorruptCheckpointError` naming the file and the problem. Nothing here can execute code.
"""

from __future__ import annotations

import math
import os

import torch

from ..errors import CorruptCheckpointError, brief
from .json_file import parse_json

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
MAX_HEADER = 100 * 2**20  # the reference implementation's limit
MAX_ELEMENTS = 2**63 - 1  # torch's tensor sizes are int64


class SafetensorsFile:
    """Header-checked random access to the tensors of one .safetensors file."""

    def __init__(self, path: str):
        self.path, self.name = path, os.path.basename(path)
        self.file = open(path, "rb")
        try:
            self.entries, self.data_start = self._read_header(os.fstat(self.file.fileno()).st_size)
        except BaseException:
            self.file.close()
            raise

    def _bad(self, why: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"{self.name}: {why}")

    def _read_header(self, size: int):
        prefix = self.file.read(8)
        if len(prefix) < 8:
            raise self._bad(f"file is truncated ({size} bytes): not a safetensors file")
        n = int.from_bytes(prefix, "little")
        if n > MAX_HEADER or 8 + n > size:
            raise self._bad(f"corrupted header: it claims {n} bytes but the file has {size}")
        header = parse_json(self.file.read(n), f"{self.name}: corrupted header", CorruptCheckpointError)
        if not isinstance(header, dict):
            raise self._bad("corrupted header: not a JSON object")
        header.pop("__metadata__", None)
        data_size, entries, ranges = size - 8 - n, {}, []
        for name, e in header.items():
            try:
                dtype, shape, (begin, end) = DTYPES[e["dtype"]], e["shape"], e["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise self._bad(f"corrupted header entry for tensor {name!r}: {brief(e)}") from None
            if not (isinstance(shape, list) and all(_is_size(d) for d in shape)):
                raise self._bad(f"tensor {name!r}: shape {brief(shape)} is not a list of non-negative integers")
            if math.prod(max(d, 1) for d in shape) > MAX_ELEMENTS:
                raise self._bad(f"tensor {name!r}: shape {shape} has more elements than a tensor can hold")
            expected = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
            if not (_is_size(begin) and _is_size(end) and begin <= end) or end - begin != expected:
                raise self._bad(f"tensor {name!r}: offsets {brief([begin, end])} do not fit dtype {e['dtype']} "
                                f"and shape {shape}")
            if end > data_size:
                raise self._bad(f"file is truncated: tensor {name!r} ends at byte {end} of the data, which has "
                                f"only {data_size} bytes")
            entries[name] = (dtype, shape, begin)
            ranges.append((begin, end, name))
        covered = 0  # the tensors' byte ranges, in order, must tile the data exactly
        for begin, end, name in sorted(ranges):
            if begin < covered:
                raise self._bad(f"tensor {name!r}: its bytes {[begin, end]} overlap another tensor's (each tensor "
                                f"must have bytes of its own)")
            if begin > covered:
                raise self._bad(f"corrupted header: bytes {covered}..{begin} of the data belong to no tensor")
            covered = end
        if covered != data_size:
            raise self._bad(f"corrupted header: the tensors end at byte {covered} of the data, but the file has "
                            f"{data_size - covered} bytes more")
        return entries, 8 + n

    def keys(self):
        return self.entries.keys()

    def shape(self, name: str) -> list[int]:
        return self.entries[name][1]

    def dtype(self, name: str) -> torch.dtype:
        return self.entries[name][0]

    def read(self, name: str, rows: list[int] | None = None) -> torch.Tensor:
        """The tensor, or only some of its rows (first-dimension indices), read from disk."""
        dtype, shape, begin = self.entries[name]
        if rows is None:
            return self._read_bytes(begin, shape, dtype)
        if not shape:
            raise self._bad(f"tensor {name!r} is a scalar; it has no rows to read")
        row_shape = shape[1:]
        row_bytes = math.prod(row_shape) * torch.empty(0, dtype=dtype).element_size()
        for r in rows:
            if not 0 <= r < shape[0]:
                raise self._bad(f"tensor {name!r} has {shape[0]} rows; row {r} is not there")
        return torch.stack([self._read_bytes(begin + r * row_bytes, row_shape, dtype) for r in rows])

    def _read_bytes(self, offset: int, shape: list[int], dtype: torch.dtype) -> torch.Tensor:
        out = torch.empty(shape, dtype=dtype)
        buffer = out.view(-1).view(torch.uint8).numpy() if out.numel() else memoryview(b"")
        self.file.seek(self.data_start + offset)
        if self.file.readinto(buffer) != len(buffer):
            raise self._bad("file is truncated while reading tensor data")
        return out

    def close(self) -> None:
        self.file.close()


def _is_size(value) -> bool:
    """A non-negative int (not a bool, float or string): a valid dimension or byte offset."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
