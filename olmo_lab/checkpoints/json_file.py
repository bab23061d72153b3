"""The one JSON reader for checkpoint files: config, index, tokenizer and generation configs, safetensors headers.

Checkpoint JSON is untrusted input, and Python's `json` trusts it too far: a 5,000-digit integer
escapes as ValueError (the int-string limit), nesting 100,000 levels deep as RecursionError, a key
written twice silently keeps the last value. This reader enforces stated limits and raises the
caller's `olmo_lab` error naming the file for every problem:
- at most `MAX_BYTES` bytes (a safetensors header has its own limit), UTF-8;
- integers of at most `MAX_INT_DIGITS` digits (any 64-bit value fits), nesting at most `MAX_DEPTH` deep;
- no key twice in one object (a tensor named twice in a header or an index), no NaN/Infinity literals.
"""

from __future__ import annotations

import json
import os

MAX_BYTES = 64 * 2**20
MAX_INT_DIGITS = 40
MAX_DEPTH = 64


class _Refused(ValueError):
    """Raised by the parser hooks; turned into the caller's error with the file's name."""


def _int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise _Refused(f"an integer with {len(text.lstrip('-'))} digits (at most {MAX_INT_DIGITS} are allowed)")
    return int(text)


def _constant(name: str):
    raise _Refused(f"{name} is not a JSON number")


def _object(pairs: list) -> dict:
    out = {}
    for key, value in pairs:
        if key in out:
            raise _Refused(f"the key {key!r} appears twice in one object")
        out[key] = value
    return out


def _depth(value) -> int:
    """Nesting depth of parsed JSON, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def parse_json(data: bytes | str, where: str, error: type[Exception]):
    """The value of JSON text `data`; `error(f"{where}: not valid JSON (...)")` for anything refused."""
    try:
        text = data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else data
        value = json.loads(text, parse_int=_int, parse_constant=_constant, object_pairs_hook=_object)
    except UnicodeDecodeError as e:
        raise error(f"{where}: not valid JSON (not UTF-8: {e.reason} at byte {e.start})") from None
    except RecursionError:
        raise error(f"{where}: not valid JSON (nested more than {MAX_DEPTH} levels deep)") from None
    except (_Refused, json.JSONDecodeError) as e:
        raise error(f"{where}: not valid JSON ({e})") from None
    if _depth(value) > MAX_DEPTH:
        raise error(f"{where}: not valid JSON (nested more than {MAX_DEPTH} levels deep)")
    return value


def read_json(path: str | os.PathLike, where: str, error: type[Exception], max_bytes: int = MAX_BYTES):
    """The value of the JSON file at `path`, read only if it is at most `max_bytes` long."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > max_bytes:
                raise error(f"{where}: {size} bytes is larger than the {max_bytes} bytes a JSON file may have")
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise error(f"{where}: cannot read {os.fspath(path)!r} ({e.strerror or e})") from None
    if len(data) > max_bytes:
        raise error(f"{where}: larger than the {max_bytes} bytes a JSON file may have")
    return parse_json(data, where, error)
