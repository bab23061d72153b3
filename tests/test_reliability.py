"""Reliability, second pass (issue 21): every input is checked at its boundary, before any work.

One section per boundary: the JSON readers, safetensors headers and indexes, config values and size
bounds, load_model's arguments, generate/forward arguments, chat templates, toggles and their
snapshots, widget state, the command line. Each bad input raises a specific olmo_lab error naming
the problem, and each test checks that the model, toggles, caches and files are exactly as before.
The safetensors header and config.json are also fuzzed (hypothesis, derandomized so CI is
deterministic): every mutation of a valid file loads or raises an olmo_lab error, quickly, and no
read allocates more than the file holds.
"""

from __future__ import annotations

import json
import os
import resource
import struct
import sys
import time
import warnings
from pathlib import Path

import pytest
import tokenizers
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import olmo_lab
from olmo_lab import checkpoint
from olmo_lab.__main__ import main
from olmo_lab.chat_template import MAX_CHARS, MAX_STEPS, render_chat_template
from olmo_lab.config import MAX_SIZES, RemoteCodeIgnoredWarning
from olmo_lab.errors import (CheckpointError, ConfigError, CorruptCheckpointError, ExpertError, GenerationError,
                             InputError, OlmoLabError, ShapeMismatchError, TokenizerError, UnsafeCheckpointError)
from olmo_lab.json_file import MAX_DEPTH, parse_json
from olmo_lab.safetensors_file import SafetensorsFile
from olmo_lab.tokenizer import load_tokenizer
from olmo_lab.widgets import AttentionExplorerState, ExpertSwitchboard, SwitchboardState
from test_bad_inputs import (DENSE, FLEX, WEIGHT, assert_load_fails, build, copy_checkpoint, edit_index, edit_weights,
                             shards, unchanged, word_tokenizer, write_raw_safetensors)
from test_bad_inputs import dense, dense_dir, flex, flex_dir, sharded, tok  # noqa: F401 -- fixtures

# Fixed and derandomized: the same examples on every run, nothing written to disk.
FUZZ = settings(max_examples=60, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def fails_fast(error, match, call, seconds=1.0):
    """`call()` raises `error` matching `match` in well under a second."""
    start = time.perf_counter()
    with pytest.raises(error, match=match):
        call()
    assert time.perf_counter() - start < seconds


# ---------------------------------------------------------------------------------------- JSON limits
HOSTILE_JSON = {
    "huge integer": ('{"a": ' + "9" * 5000 + "}", "an integer with 5000 digits"),
    "deep nesting": ("[" * 100_000 + "]" * 100_000, f"nested more than {MAX_DEPTH} levels deep"),
    "nesting past the limit": ("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1), "nested more than"),
    "key twice": ('{"a": 1, "a": 2}', "the key 'a' appears twice"),
    "NaN literal": ('{"a": NaN}', "NaN is not a JSON number"),
    "not UTF-8": (b'{"a": "\xff"}', "not UTF-8"),
}


@pytest.mark.parametrize("case", HOSTILE_JSON, ids=list(HOSTILE_JSON))
def test_json_reader_limits(case):
    text, message = HOSTILE_JSON[case]
    fails_fast(ConfigError, f"x.json: not valid JSON \\(.*{message}", lambda: parse_json(text, "x.json", ConfigError))


def test_json_reader_accepts_what_checkpoints_hold():
    assert parse_json('{"a": [1, -2, 3.5e-7, null, true, "é"], "b": {"c": 18446744073709551615}}', "x", ConfigError) \
        == {"a": [1, -2, 3.5e-7, None, True, "é"], "b": {"c": 2**64 - 1}}


@pytest.mark.parametrize("case", ["huge integer", "deep nesting", "key twice"])
def test_every_checkpoint_json_reader_uses_the_limits(dense_dir, sharded, tmp_path, case):
    """config.json, the index, tokenizer_config.json and generation_config.json all refuse the same input."""
    text, message = HOSTILE_JSON[case]
    config = copy_checkpoint(dense_dir, tmp_path / "config")
    (config / "config.json").write_text(text)
    assert_load_fails(config, ConfigError, f"config.json: not valid JSON .*{message}")
    (sharded / checkpoint.INDEX_FILE).write_text(text)
    assert_load_fails(sharded, CorruptCheckpointError, f"{checkpoint.INDEX_FILE}: not valid JSON .*{message}")
    for name in ("tokenizer_config.json", "generation_config.json"):
        directory = word_tokenizer(tmp_path / name, 10)
        (directory / name).write_text(text)
        fails_fast(TokenizerError, f"{name}: not valid JSON .*{message}", lambda: load_tokenizer(directory))


def test_oversized_json_file_is_not_read(dense_dir, tmp_path):
    directory = copy_checkpoint(dense_dir, tmp_path / "c")
    with open(directory / "config.json", "r+b") as f:
        f.truncate(65 * 2**20)  # sparse: 65 MiB that take no disk
    fails_fast(ConfigError, "config.json: 68157440 bytes is larger than the 67108864 bytes",
               lambda: olmo_lab.load_model(directory))


# ---------------------------------------------------------------------------------------- safetensors headers
def raw_checkpoint(directory: Path, header: dict, data: bytes) -> Path:
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(olmo_lab.OlmoConfig(**DENSE).to_dict()))
    write_raw_safetensors(directory / "model.safetensors", header, data)
    return directory


F32x4 = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}
HEADER_CASES = {
    "shared bytes": ({WEIGHT: F32x4, "lm_head.weight": F32x4}, 16, "its bytes \\[0, 16\\] overlap another"),
    "overlapping bytes": ({WEIGHT: F32x4, "b": {**F32x4, "data_offsets": [8, 24]}}, 24, "overlap another tensor"),
    "a hole": ({WEIGHT: {**F32x4, "data_offsets": [8, 24]}}, 24, "bytes 0..8 of the data belong to no tensor"),
    "bytes after the last tensor": ({WEIGHT: F32x4}, 20, "the tensors end at byte 16 of the data, but the file "
                                                         "has 4 bytes more"),
    "element count overflow": ({WEIGHT: {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 0]}}, 0,
                               "has more elements than a tensor can hold"),
    "zero-size dimension overflow": ({WEIGHT: {"dtype": "F32", "shape": [0, 2**64], "data_offsets": [0, 0]}}, 0,
                                     "has more elements than a tensor can hold"),
    "offsets as strings": ({WEIGHT: {**F32x4, "data_offsets": ["0", "16"]}}, 16, "offsets .* do not fit"),
    "huge offsets": ({WEIGHT: {**F32x4, "data_offsets": [2**62, 2**62 + 16]}}, 16, "file is truncated"),
}


@pytest.mark.parametrize("case", HEADER_CASES, ids=list(HEADER_CASES))
def test_inconsistent_byte_ranges(tmp_path, case):
    header, size, message = HEADER_CASES[case]
    assert_load_fails(raw_checkpoint(tmp_path / "c", header, b"\0" * size), CorruptCheckpointError, message)


def test_tensor_named_twice_in_a_header(tmp_path):
    directory = raw_checkpoint(tmp_path / "c", {}, b"")
    entry = json.dumps(F32x4)
    raw = f'{{"{WEIGHT}": {entry}, "{WEIGHT}": {entry}}}'.encode()
    (directory / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 16)
    assert_load_fails(directory, CorruptCheckpointError, f"corrupted header: not valid JSON \\(the key '{WEIGHT}' "
                                                         "appears twice")


def header_with(directory: Path, name: str, entry: dict | None) -> None:
    """Rewrite model.safetensors with `name`'s entry replaced (None: removed), the data re-laid out to match:
    the real bytes for the real tensors, and a sparse stretch of zeros for a replaced one."""
    path = directory / "model.safetensors"
    state = load_file(path)
    header, chunks, offset = {}, [], 0
    for key, t in state.items():
        if key == name:
            continue
        data = t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        header[key] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    extra = 0
    if entry is not None:
        extra = entry.pop("bytes")
        header[name] = {**entry, "data_offsets": [offset, offset + extra]}
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + b"".join(chunks))
        f.truncate(8 + len(raw) + offset + extra)  # sparse: the stretch takes no disk


def test_a_64_gb_tensor_in_a_small_sparse_file_fails_before_allocating(dense_dir, tmp_path):
    directory = copy_checkpoint(dense_dir, tmp_path / "c")
    header_with(directory, WEIGHT, {"dtype": "F32", "shape": [2**17, 2**17], "bytes": 2**36})
    path = directory / "model.safetensors"
    if path.stat().st_blocks * 512 > 2**26:
        pytest.skip("this file system does not store sparse files")
    olmo_lab.load_model(dense_dir)  # warm up: torch's first meta-device build takes seconds, once per process
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fails_fast(ShapeMismatchError, rf"'{WEIGHT}' has shape \(131072, 131072\) in the checkpoint, but the config "
                                   r"implies \(32, 32\)", lambda: olmo_lab.load_model(directory))
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 100 * 1024  # KiB: nothing of 64 GB


def test_header_dtype_checked_before_reading(dense_dir, tmp_path, monkeypatch):
    directory = copy_checkpoint(dense_dir, tmp_path / "c")
    header_with(directory, "lm_head.weight", {"dtype": "I64", "shape": [128, 32], "bytes": 128 * 32 * 8})
    reads = []
    monkeypatch.setattr(SafetensorsFile, "read", lambda self, *a: reads.append(a))
    assert_load_fails(directory, ShapeMismatchError, "'lm_head.weight' has dtype torch.int64; weights must be floating")
    assert reads == []  # not one tensor was read: every header entry is checked first


# ---------------------------------------------------------------------------------------- non-finite after the cast
@pytest.mark.parametrize("stored, value, dtype, message", [
    (torch.float64, 1e300, None, "once cast from torch.float64 to torch.float32"),
    (torch.float32, 1e6, torch.float16, "once cast from torch.float32 to torch.float16"),
    (torch.float32, 3e38, torch.float16, "once cast from torch.float32 to torch.float16"),
], ids=["F64 1e300 in a float32 model", "1e6 as float16", "3e38 as float16"])
def test_values_beyond_the_requested_dtype(dense_dir, tmp_path, stored, value, dtype, message):
    def edit(state):
        state[WEIGHT] = state[WEIGHT].to(stored)
        state[WEIGHT][0, 0] = value
    directory = edit_weights(copy_checkpoint(dense_dir, tmp_path / "c"), edit)
    assert_load_fails(directory, CorruptCheckpointError, f"'{WEIGHT}' contains NaN or Inf values {message}",
                      dtype=dtype)


def test_in_range_values_still_load_as_float16(dense_dir):
    model = olmo_lab.load_model(dense_dir, dtype=torch.float16)
    assert model.dtype == torch.float16 and all(bool(torch.isfinite(p).all()) for p in model.parameters())


# ---------------------------------------------------------------------------------------- index files
def test_index_shard_name_with_a_nul_byte(sharded):
    assert_load_fails(edit_index(sharded, lambda m: m.update({WEIGHT: "model\0.safetensors"})), UnsafeCheckpointError,
                      r"shard 'model\\x00.safetensors' is not a plain file name")


def test_index_listing_a_tensor_twice(sharded):
    path = sharded / checkpoint.INDEX_FILE
    text = path.read_text()
    first = shards(sharded)[0]
    path.write_text(text.replace('"weight_map": {', f'"weight_map": {{"{WEIGHT}": "{first}", ', 1))
    assert_load_fails(sharded, CorruptCheckpointError, f"not valid JSON \\(the key '{WEIGHT}' appears twice")


def test_shard_holding_a_tensor_the_index_does_not_list(sharded):
    """Consistent with a single file holding an extra tensor: refused, naming the shard and the tensor."""
    where = json.loads((sharded / checkpoint.INDEX_FILE).read_text())["weight_map"][WEIGHT]
    edit_index(sharded, lambda m: m.pop(WEIGHT))
    assert_load_fails(sharded, CorruptCheckpointError, f"{where}: holds 1 tensor\\(s\\) that "
                                                       f"{checkpoint.INDEX_FILE} does not list for it: {WEIGHT}")


# ---------------------------------------------------------------------------------------- config values
YARN = {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 8, "rope_theta": 10000.0}
CONFIG_VALUE_CASES = {
    "max_position_embeddings a string": (dict(max_position_embeddings="many", rope_scaling=YARN),
                                         "max_position_embeddings: must be an integer, got 'many'"),
    "max_position_embeddings a float": (dict(max_position_embeddings=32.0), "max_position_embeddings: must be an "
                                                                            "integer, got 32.0"),
    "max_position_embeddings a bool": (dict(max_position_embeddings=True), "must be an integer, got True"),
    "negative original length": (dict(rope_scaling={**YARN, "original_max_position_embeddings": -8}),
                                 r"rope_scaling.original_max_position_embeddings: must be >= 1, got -8"),
    "original length a string": (dict(rope_scaling={**YARN, "original_max_position_embeddings": "8k"}),
                                 "original_max_position_embeddings: must be an integer"),
    "YaRN theta 1": (dict(rope_scaling=YARN, rope_theta=1.0), "rope_theta: must be > 1 for yarn RoPE"),
    "default theta 0": (dict(rope_theta=0.0), "rope_theta: must be > 0 for default RoPE"),
    "YaRN factor below 1": (dict(rope_scaling={**YARN, "factor": 0.5}), "factor: YaRN needs a factor >= 1"),
    "YaRN beta_fast 0": (dict(rope_scaling={**YARN, "beta_fast": 0}), "beta_fast: must be > 0, got 0"),
    "YaRN beta_slow negative": (dict(rope_scaling={**YARN, "beta_slow": -1.0}), "beta_slow: must be > 0"),
    "YaRN truncate a string": (dict(rope_scaling={**YARN, "truncate": "no"}), "truncate: must be true or false"),
    "YaRN attention_factor a string": (dict(rope_scaling={**YARN, "attention_factor": "x"}),
                                       "attention_factor: must be a finite number"),
    "rope_type a list": (dict(rope_scaling={**YARN, "rope_type": ["yarn"]}), r"unknown rope type \['yarn'\]"),
}


@pytest.mark.parametrize("case", CONFIG_VALUE_CASES, ids=list(CONFIG_VALUE_CASES))
def test_config_values_checked_before_use(case):
    changes, message = CONFIG_VALUE_CASES[case]
    d = {**olmo_lab.OlmoConfig(**DENSE).to_dict(), **changes}
    if "rope_scaling" in changes or "rope_theta" in changes:
        d.pop("rope_parameters")
    fails_fast(ConfigError, message, lambda: olmo_lab.OlmoConfig.from_dict(d))


@pytest.mark.parametrize("value", [0, -1])
def test_unstated_max_position_embeddings_is_not_used_by_yarn(value):
    """OLMo-core exports -1: not stated, so YaRN computes with the family default instead of dividing by it."""
    d = {**olmo_lab.OlmoConfig(**DENSE).to_dict(), "max_position_embeddings": value, "rope_scaling": YARN}
    d.pop("rope_parameters")
    config = olmo_lab.OlmoConfig.from_dict(d)
    assert config.max_position_embeddings > 0 and config.rope["full_attention"].factor == 8.0


SIZE_CASES = {
    "a billion layers": dict(num_hidden_layers=10**9),
    "a billion experts": dict(num_experts=10**9),
    "hidden 2**40": dict(hidden_size=2**40),
    "intermediate 2**40": dict(intermediate_size=2**40),
    "head_dim 2**40": dict(head_dim=2**40),
    "heads 2**40": dict(num_attention_heads=2**40, num_key_value_heads=2**40),
    "vocab 2**40": dict(vocab_size=2**40),
    "sliding window 2**40": dict(sliding_window=2**40),
    "context 2**62": dict(max_position_embeddings=2**62),
    "top-k 2**40": dict(num_experts_per_tok=2**40),
}


@pytest.mark.parametrize("case", SIZE_CASES, ids=list(SIZE_CASES))
def test_size_bombs_fail_fast(case):
    changes = SIZE_CASES[case]
    spec = FLEX if "experts" in case or "top-k" in case else DENSE
    d = {**olmo_lab.OlmoConfig(**spec).to_dict(), **changes}
    name = next(iter(changes))
    fails_fast(ConfigError, f"{name}: .* is larger than the {MAX_SIZES[name]} olmo-lab allows",
               lambda: olmo_lab.OlmoConfig.from_dict(d))
    fails_fast(ConfigError, f"{name}: .* is larger than", lambda: olmo_lab.OlmoConfig(**{**spec, **changes}))


def test_layers_times_experts_bounded():
    fails_fast(ConfigError, "num_experts: 4096 experts in each of 4096 layers is more than the 65536",
               lambda: olmo_lab.OlmoConfig(**{**FLEX, "num_hidden_layers": 4096, "num_experts": 4096,
                                              "expert_names": None}))


def test_attention_width_bounded():
    fails_fast(ConfigError, "head_dim: 16384 heads of 16384 is wider than", lambda: olmo_lab.OlmoConfig(
        **{**DENSE, "num_attention_heads": 2**14, "num_key_value_heads": 2**14, "head_dim": 2**14}))


def test_megabyte_string_in_a_config_gives_a_short_message():
    d = {**olmo_lab.OlmoConfig(**DENSE).to_dict(), "hidden_size": "x" * 2**20}
    with pytest.raises(ConfigError) as info:
        olmo_lab.OlmoConfig.from_dict(d)
    assert len(str(info.value)) < 200 and "1048578 characters" in str(info.value)


# ---------------------------------------------------------------------------------------- load_model arguments
LOAD_ARGUMENT_CASES = {
    "float64": (dict(dtype=torch.float64), ConfigError, "dtype: torch.float64 is not supported"),
    "float8": (dict(dtype=torch.float8_e4m3fn), ConfigError, "dtype: torch.float8_e4m3fn is not supported"),
    "dtype a number": (dict(dtype=16), ConfigError, "dtype: unknown dtype 16"),
    "device gpu": (dict(device="gpu"), InputError, "device: 'gpu' is not a device"),
    "device a number": (dict(device=1.5), InputError, "device: expected a string such as 'cpu'"),
    "device meta": (dict(device="meta"), InputError, "device: 'meta' devices are not supported"),
    "missing CUDA device": (dict(device="cuda:7" if torch.cuda.is_available() else "cuda"), InputError,
                            "does not exist" if torch.cuda.is_available() else "CUDA is not available"),
    "revision a number": (dict(revision=3), InputError, "revision: expected a branch, tag or commit name"),
    "progress a string": (dict(progress="yes"), InputError, "progress: expected True, False or None"),
}


@pytest.mark.parametrize("case", LOAD_ARGUMENT_CASES, ids=list(LOAD_ARGUMENT_CASES))
def test_bad_load_arguments(dense_dir, case):
    kw, error, message = LOAD_ARGUMENT_CASES[case]
    assert_load_fails(dense_dir, error, message, **kw)


@pytest.mark.parametrize("kw, message", [
    (dict(expert_names="abc"), "expert_names: expected a list of non-empty strings, one per expert, got 'abc'"),
    (dict(expert_names=[]), "expert_names: the list is empty"),
    (dict(expert_names=["a", 1, "c"]), "expert_names: expected a list of non-empty strings"),
    (dict(experts=1.5), "experts: expected a name, an index or a list of them, got 1.5"),
    (dict(experts=()), "experts: the list of experts is empty"),
    (dict(experts=["Math"]), "unknown expert name 'Math'; did you mean 'math'"),
], ids=["names a string", "names empty", "a name not a string", "experts a float", "experts empty", "wrong case"])
def test_bad_expert_arguments_at_load(flex_dir, kw, message):
    assert_load_fails(flex_dir, ExpertError, message, **kw)


@pytest.mark.parametrize("path", [None, 12, b"/tmp", "a\0b"], ids=["None", "int", "bytes", "NUL"])
def test_bad_checkpoint_path(path):
    fails_fast(CheckpointError, "checkpoint: expected a directory or a hub repo id", lambda: olmo_lab.load_model(path))


@pytest.mark.parametrize("path", [None, 12, b"/tmp", "a\0b"], ids=["None", "int", "bytes", "NUL"])
def test_bad_tokenizer_path(path):
    fails_fast(TokenizerError, "tokenizer: expected a file, a directory or a hub repo id", lambda: load_tokenizer(path))


# ---------------------------------------------------------------------------------------- generate / forward
@pytest.mark.parametrize("prompt, kw, message", [
    ("   ", {}, "prompt '   ' tokenizes to no tokens"),
    (["w1", "  "], {}, "prompt '  ' tokenizes to no tokens"),
    (torch.zeros(0, 3, dtype=torch.long), {}, r"prompt ids: the batch is empty \(batch size 0\)"),
    (torch.zeros(1, 3, dtype=torch.long, device="meta"), {}, "on the meta device"),
    ([3, 2**70], {}, r"token ids must lie in \[0, 128\), got 1180591620717411303424"),
    ([[3, 4], [5, -2**70]], {}, r"token ids must lie in \[0, 128\), got -1180591620717411303424"),
    ("w1", dict(stop=5), "stop: expected a string or a list of strings, got 5"),
    ("w1", dict(stop=["w2", 3]), "stop: expected a string or a list of strings"),
    ("w1", dict(eos_token_id="</s>"), "eos_token_id: expected a token id"),
    ("w1", dict(eos_token_id=[2, 1.5]), "eos_token_id: expected a token id"),
    ("w1", dict(eos_token_id=True), "eos_token_id: expected a token id"),
    ("w1", dict(temperature=float("inf")), "temperature: must be >= 0 \\(0 = greedy\\) and finite, got inf"),
    ("w1", dict(temperature=1.0, seed=2**64), "seed: must lie in \\[0, 2\\*\\*64\\)"),
    ("w1", dict(temperature=1.0, seed=-1), "seed: must lie in"),
], ids=["tokenizes to nothing", "a batch row tokenizes to nothing", "batch of 0", "meta tensor", "id beyond int64",
        "negative id beyond int64", "stop an int", "stop list with an int", "eos a string", "eos list with a float",
        "eos a bool", "infinite temperature", "seed beyond 64 bits", "negative seed"])
def test_bad_generate_arguments(flex, tok, prompt, kw, message):
    with unchanged(flex), pytest.raises(GenerationError, match=message):
        olmo_lab.generate(flex, tok, prompt, **{"max_new_tokens": 2, **kw})


def test_tokenizer_backend_errors_are_tokenizer_errors(tmp_path):
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0}))  # no unknown token: "b" cannot encode
    backend.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(TokenizerError, match="cannot encode the text"):
        load_tokenizer(tmp_path).encode("b")


def test_lone_surrogate_in_a_prompt(flex, tok):
    with unchanged(flex), pytest.raises(TokenizerError, match="lone surrogate '\\\\ud800' at position 3"):
        olmo_lab.generate(flex, tok, "w1 \ud800", max_new_tokens=2)
    with pytest.raises(TokenizerError, match="encode_batch: item 1: the text has a lone surrogate"):
        tok.encode_batch(["w1", "w2\udfff"])


def test_tiny_temperature_samples_the_argmax(flex, tok):
    """logits / 1e-300 overflows to inf and NaN probabilities; sampling must still work: it is greedy."""
    greedy = olmo_lab.generate(flex, tok, [3, 4, 5], max_new_tokens=4)
    assert olmo_lab.generate(flex, tok, [3, 4, 5], max_new_tokens=4, temperature=1e-300, seed=0) == greedy
    huge = olmo_lab.generate(flex, tok, [3, 4, 5], max_new_tokens=4, temperature=1e300, seed=2**64 - 1)
    assert len(huge) == 4 and all(0 <= t < 128 for t in huge)


@pytest.mark.parametrize("ids, kw, message", [
    (torch.zeros(0, 3, dtype=torch.long), {}, r"input_ids: the batch is empty \(batch size 0\)"),
    (torch.zeros(1, 3, dtype=torch.long, device="meta"), {}, "input_ids: is on meta, but the model is on cpu "
                                                            r"\(a meta tensor has no values\)"),
    (torch.tensor([[3, 4]]), dict(attention_mask=torch.ones(1, 2, device="meta")), "attention_mask: is on meta"),
    (torch.tensor([[3, 4]]), dict(logits_to_keep=1.5), "logits_to_keep: expected an integer >= 0"),
    (torch.tensor([[3, 4]]), dict(logits_to_keep=-1), "logits_to_keep: expected an integer >= 0"),
    (torch.tensor([[3, 4]]), dict(logits_to_keep=True), "logits_to_keep: expected an integer >= 0"),
    (torch.tensor([[3, 4]]), dict(cache={"keys": []}), "cache: expected a KVCache from model.new_cache"),
], ids=["batch of 0", "meta ids", "meta mask", "fractional logits_to_keep", "negative logits_to_keep",
        "bool logits_to_keep", "cache a dict"])
def test_bad_forward_arguments(dense, ids, kw, message):
    with unchanged(dense), pytest.raises(InputError, match=message):
        dense(ids, **kw)


def test_cache_built_for_another_batch_size(flex):
    cache = flex.new_cache()
    flex(torch.tensor([[3, 4], [5, 6]]), cache=cache)
    with unchanged(flex, cache), pytest.raises(InputError, match="cache: it holds a batch of 2 sequences, but "
                                                                 "input_ids has 1"):
        flex(torch.tensor([[7]]), cache=cache)
    assert flex(torch.tensor([[7], [8]]), cache=cache).logits.shape == (2, 1, 128)  # and it still works


# ---------------------------------------------------------------------------------------- chat templates
TEMPLATE_CASES = {
    "division by zero": ("{{ 1 // 0 }}", "ZeroDivisionError"),
    "recursion": ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "it recursed too deeply"),
    "a 10 GB string": ("{{ 'a' * 10**10 }}", "it repeats a value of length 1 10000000000 times"),
    "a 10 GB list": ("{{ (10**10 * [1])|length }}", "it repeats a value"),
    "doubling by ~": ("{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}"
                      "{% endfor %}{{ ns.s|length }}", "it joins strings into more than"),
    "doubling by +": ("{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}"
                      "{% endfor %}", "it builds a value of"),
    "a huge range": ("{{ range(10**10)|list|length }}", "with a size beyond"),
    "a huge power": ("{{ 7 ** (10**9) }}", "it raises 7 to the power 1000000000"),
    "a huge center": ("{{ 'a'|center(10**10) }}", "its filter do_center was given a size beyond"),
    "a huge method call": ("{{ 'a'.ljust(10**10) }}", "it calls ljust with a size beyond"),
    "a huge %-width": ("{{ '%999999999d' % 1 }}", "a width or precision of 100 million"),
    "a huge format width": ("{{ '{:>9999999999}'.format(1) }}", "a width or precision of 100 million"),
    "a huge format filter": ("{{ '%999999999d'|format(1) }}", "a width or precision of 100 million"),
    "a huge join": ("{{ (['x' * 10000000] * 2)|join }}", "it joins strings into more than"),
    "too much output": ("{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}", "its output is longer than"),
    "a loop that never ends": ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
                               f"it ran more than {MAX_STEPS} template steps"),
    "a type error": ("{{ 1 + 'a' }}", "TypeError"),
    "an attribute of None": ("{{ none.x.y }}", "the chat template failed"),
    "syntax": ("{% for %}", "not valid Jinja"),
}


@pytest.mark.parametrize("case", TEMPLATE_CASES, ids=list(TEMPLATE_CASES))
def test_hostile_chat_templates(tok, case):
    template, message = TEMPLATE_CASES[case]
    tok.chat_template = template
    fails_fast(TokenizerError, message, lambda: tok.apply_chat_template([{"role": "user", "content": "w1"}]),
               seconds=3.0)  # the step budget is the slowest bound: about a second on CI
    assert sys.gettrace() is None  # the step counter is gone again


@pytest.mark.parametrize("name", ["messages", "eos_token", "raise_exception", "range", "namespace"])
def test_caller_variable_colliding_with_a_given_name(tok, name):
    tok.chat_template = "{{ messages|length }}"
    with pytest.raises(TokenizerError, match=f"variable\\(s\\) '{name}' would hide the name"):
        tok.apply_chat_template([{"role": "user", "content": "w1"}], **{name: 1})


def test_bounded_template_still_renders_like_transformers_settings(tok):
    tok.chat_template = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content|trim }}\n{% endfor %}"
                         "{{ ['a', 'b']|join(',') }}{{ 'x' ~ 1 }}{{ '%03d' % 7 }}{{ '{:>4}'.format(2) }}"
                         "{{ messages|tojson }}")
    text = tok.apply_chat_template([{"role": "user", "content": " w1 "}], tools=[1])
    assert text == '<|user|>w1\na,bx1007   2[{"role": "user", "content": " w1 "}]'
    assert len(render_chat_template("{{ 'a' * n }}", "src", n=MAX_CHARS)) == MAX_CHARS  # the bound is inclusive
    big = "{{ '{:,}'.format(n) }} {{ n|filesizeformat }} {{ (n / 2)|int }} {{ n * n }}"  # big numbers are fine
    assert render_chat_template(big, "src", n=10**12) == "1,000,000,000,000 1.0 TB 500000000000 " + str(10**24)


# ---------------------------------------------------------------------------------------- toggles and snapshots
def test_snapshot_from_another_model_is_refused_before_any_change(flex):
    other = build({**FLEX, "num_hidden_layers": 3})
    other.experts.disable("code")
    snap, key = other.experts.snapshot(), flex._toggle_key
    cache = flex.new_cache()
    flex(torch.tensor([[3, 4]]), cache=cache)
    with unchanged(flex, cache), pytest.raises(ExpertError, match="one entry per layer 0..1 of this model"):
        flex.experts.restore(snap)
    assert flex._toggle_key == key
    flex(torch.tensor([[5]]), cache=cache)  # the cache is still valid: nothing moved


@pytest.mark.parametrize("snap, message", [
    ({0: (frozenset({0, 1, 2}), frozenset()), 1: (frozenset(), frozenset())}, "layer 0: it switches every expert off"),
    ({0: (frozenset({0}), frozenset({1, 2})), 1: (frozenset(), frozenset())}, "layer 0: it switches every expert off"),
    ({0: (frozenset({5}), frozenset()), 1: (frozenset(), frozenset())}, "layer 0: expected .* expert indices 0..2"),
    ({0: (frozenset({1}), frozenset({1})), 1: (frozenset(), frozenset())}, r"experts \[1\] are both opted out"),
    ({0: [frozenset(), frozenset()], 1: (frozenset(), frozenset())}, "layer 0: expected"),
    ({"0": (frozenset(), frozenset()), 1: (frozenset(), frozenset())}, "one entry per layer"),
    ([(frozenset(), frozenset())] * 2, "got 'list'"),
], ids=["all opted out", "all off", "expert out of range", "opted out and dropped", "not a tuple", "str keys",
        "a list"])
def test_bad_snapshots(flex, snap, message):
    key = flex._toggle_key
    with unchanged(flex), pytest.raises(ExpertError, match=message):
        flex.experts.restore(snap)
    assert flex._toggle_key == key


def test_experts_off_exited_out_of_order(flex):
    start = flex.experts.state()  # 'math' is off in layer 1
    a, b = olmo_lab.experts_off(flex, "public"), olmo_lab.experts_off(flex, "math")
    a.__enter__()
    b.__enter__()
    a.__exit__(None, None, None)  # 'public' comes back; 'math' stays off while b is open
    assert flex.experts.state()["public"] == start["public"] and set(flex.experts.state()["math"]) == {"opted out"}
    b.__exit__(None, None, None)
    assert flex.experts.state() == start
    assert flex(torch.tensor([[3, 4]])).logits.isfinite().all()


TOGGLES = st.tuples(st.sampled_from(["public", "math", "code"]), st.sampled_from([None, [0], [1]]),
                    st.sampled_from(["opt_out", "drop"]))


@FUZZ
@given(blocks=st.lists(TOGGLES, min_size=1, max_size=5), order=st.randoms(use_true_random=False))
def test_nested_experts_off_in_any_exit_order(blocks, order):
    """Open up to five blocks, close them in a random order: the toggles end exactly as they began, and
    closing in reverse order passes back through every intermediate state."""
    model = build(FLEX)
    model.experts.disable("math", layers=[1])
    start, key = model.experts.state(), model._toggle_key
    opened, states = [], []
    for experts, layers, mode in blocks:
        states.append(model.experts.state())
        block = olmo_lab.experts_off(model, experts, layers=layers, mode=mode)
        try:
            block.__enter__()
        except ExpertError:  # would switch every expert off in a layer: refused, nothing changed
            assert model.experts.state() == states.pop()
            continue
        opened.append(block)
    exits = list(range(len(opened)))
    order.shuffle(exits)
    for i in exits:
        opened[i].__exit__(None, None, None)
        assert all(len(model.experts.enabled(li)) >= 1 for li in range(2))
    assert model.experts.state() == start and model._toggle_key == key


def test_reverse_exits_restore_each_state(flex):
    states = [flex.experts.state()]
    blocks = [olmo_lab.experts_off(flex, "public"), olmo_lab.experts_off(flex, "math", mode="drop", layers=[0])]
    for block in blocks:
        block.__enter__()
        states.append(flex.experts.state())
    for block in reversed(blocks):
        states.pop()
        block.__exit__(None, None, None)
        assert flex.experts.state() == states[-1]


def test_toggle_reads_check_their_layer(flex):
    with pytest.raises(ExpertError, match="layer 9 is out of range"):
        flex.experts.enabled(9)
    with unchanged(flex), pytest.raises(ExpertError, match="unknown expert name 'CODE'; did you mean 'code'"):
        flex.experts.disable("CODE")


# ---------------------------------------------------------------------------------------- widgets
def test_switchboard_state_refuses_bad_names(flex, tok):
    state = SwitchboardState(flex, tok, prompt="w1 w2", max_new_tokens=2)
    for name, message in (("Math", "did you mean 'math'"), ("physics", "unknown expert name"),
                          (1, "the switchboard takes names"), (None, "expected a name")):
        with pytest.raises(ExpertError, match=message):
            state.set_expert(name, False)
    with pytest.raises(InputError, match="on: expected True or False"):
        state.set_expert("math", "off")
    assert state.on == {"public": True, "math": True, "code": True}


def test_switchboard_shows_a_prompt_longer_than_the_context(flex, tok, capsys):
    board = ExpertSwitchboard(flex, tok, prompt=" ".join(["w1"] * 40), max_new_tokens=2)
    with unchanged(flex):
        board.button.click()  # a callback: it must not raise
    assert "longer than the model's context of 32" in capsys.readouterr().out
    board.prompt.value = " ".join(["w1"] * 31)  # fits, but not with 2 new tokens
    board.button.click()
    assert "exceed the model's context of 32 positions" in capsys.readouterr().out
    board.prompt.value = "w1 w2"
    board.button.click()
    assert capsys.readouterr().out.startswith("experts off (opt_out): none")


@pytest.fixture
def explorer(tmp_path):
    model = build(DENSE)
    tok = load_tokenizer(word_tokenizer(tmp_path / "t", 100))
    return AttentionExplorerState(model, tok, "w1 w2 w3 w4")


@pytest.mark.parametrize("kw, message", [
    (dict(layer=4), r"layer: 4 is not an index in range \(0..3\)"),
    (dict(layer=-1), "layer: -1 is not an index"),
    (dict(layer=1.5), "layer: 1.5 is not an index"),
    (dict(layer=True), "layer: True is not an index"),
    (dict(head="0"), "head: '0' is not an index"),
    (dict(layer=1, query=9), r"query: 9 is not an index in range \(0..3\)"),
], ids=["layer too large", "negative layer", "fractional layer", "bool layer", "head a string", "bad query"])
def test_attention_explorer_selection_is_all_or_nothing(explorer, kw, message):
    before = (explorer.layer, explorer.head, explorer.query)
    with pytest.raises(InputError, match=message):
        explorer.select(**kw)
    assert (explorer.layer, explorer.head, explorer.query) == before


@pytest.mark.parametrize("prompt, message", [("   \n\t", "needs a non-empty prompt"), (None, "needs a non-empty"),
                                             ("x", "tokenizes to no tokens"),
                                             (" ".join(["w1"] * 40), "40 tokens is longer than the model's context")],
                         ids=["whitespace", "None", "unknown word", "too long"])
def test_attention_explorer_refuses_unusable_prompts(tmp_path, prompt, message):
    model = build(DENSE)
    backend = tokenizers.Tokenizer.from_file(str(word_tokenizer(tmp_path / "t", 10) / "tokenizer.json"))
    backend.normalizer = tokenizers.normalizers.Replace("x", "")  # "x" becomes no ids at all
    backend.save(str(tmp_path / "t" / "tokenizer.json"))
    tok = load_tokenizer(tmp_path / "t")
    with unchanged(model), pytest.raises(InputError, match=message):
        AttentionExplorerState(model, tok, prompt)


# ---------------------------------------------------------------------------------------- the command line
@pytest.fixture(scope="module")
def cli_model(tmp_path_factory):
    directory = Path(olmo_lab.save_model(build(DENSE), tmp_path_factory.mktemp("cli")))
    word_tokenizer(directory, 100)
    return str(directory)


@pytest.mark.parametrize("argv, message", [
    (["generate", "w1", "--temperature", "1", "--seed", str(2**70)], "seed: must lie in [0, 2**64)"),
    (["generate", "w1", "--temperature", "nan"], "temperature: must be >= 0"),
    (["generate", "w1", "--temperature", "1e-300", "--seed", "1"], None),
    (["generate", "   "], "tokenizes to no tokens"),
    (["generate", "w1", "--max-new-tokens", str(10**30)], "exceed the model's context"),
    (["generate", "w1", "--top-k", "0", "--temperature", "1"], "top_k: must be a positive integer"),
    (["generate", "w1 \udcff"], "lone surrogate"),
    (["generate", "w1", "--dtype", "bfloat16"], None),
], ids=["seed beyond 64 bits", "NaN temperature", "tiny temperature", "empty tokenization", "huge max_new_tokens",
        "zero top_k", "lone surrogate", "bfloat16"])
def test_command_line_errors_are_one_line(cli_model, capsys, argv, message):
    code = main(argv + ["--model", cli_model])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if message is None:
        assert code == 0 and err == ""
    else:
        assert code == 1 and err.startswith("olmo-lab: error:") and message in err and len(err.splitlines()) == 1


def test_command_line_on_a_corrupt_checkpoint(cli_model, tmp_path, capsys):
    directory = copy_checkpoint(Path(cli_model), tmp_path / "c")
    (directory / "config.json").write_text("[" * 100_000)
    assert main(["generate", "w1", "--model", str(directory)]) == 1
    assert "nested more than 64 levels deep" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- fuzzing
def bounded_reads(monkeypatch):
    """Fail any read that would allocate more bytes than the file it reads from holds."""
    read_bytes = SafetensorsFile._read_bytes

    def checked(self, offset, shape, dtype):
        want = torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
        assert want <= os.fstat(self.file.fileno()).st_size, f"a read of {want} bytes from {self.name}"
        return read_bytes(self, offset, shape, dtype)
    monkeypatch.setattr(SafetensorsFile, "_read_bytes", checked)


def load_or_olmo_lab_error(directory: Path):
    """Load `directory`: the result must be a model or an OlmoLabError, within two seconds."""
    start = time.perf_counter()
    try:
        olmo_lab.load_model(directory)
    except OlmoLabError:
        pass
    assert time.perf_counter() - start < 2.0


JSON_VALUES = st.one_of(st.none(), st.booleans(), st.sampled_from([0, 1, -1, 2, 3, 31, 2**31, 2**63, 2**64, 10**30]),
                        st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=5),
                        st.lists(st.integers(-3, 2**40), max_size=3), st.dictionaries(st.text(max_size=3),
                                                                                      st.integers(), max_size=2))


@pytest.fixture(scope="module")
def fuzz_source(tmp_path_factory) -> Path:
    directory = Path(olmo_lab.save_model(build(DENSE), tmp_path_factory.mktemp("fuzz")))
    olmo_lab.load_model(directory)  # warm up: torch's first meta-device build takes seconds, once per process
    return directory


@FUZZ
@given(data=st.data())
def test_fuzz_safetensors_header(fuzz_source, tmp_path_factory, monkeypatch, data):
    bounded_reads(monkeypatch)
    directory = copy_checkpoint(fuzz_source, tmp_path_factory.mktemp("h") / "c")
    path = directory / "model.safetensors"
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header, body = json.loads(raw[8:8 + n]), raw[8 + n:]
    kind = data.draw(st.sampled_from(["entry", "drop", "copy", "rename", "bytes", "prefix", "truncate"]))
    names = sorted(k for k in header if k != "__metadata__")
    name = data.draw(st.sampled_from(names))
    if kind == "entry":
        field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        value = data.draw(st.one_of(JSON_VALUES, st.sampled_from(["F16", "BF16", "F64", "I64", "U8", "F8_E4M3"])
                                    if field == "dtype" else st.lists(st.integers(-2, 2**63), max_size=4)))
        header[name][field] = value
    elif kind == "drop":
        del header[name]
    elif kind == "copy":
        header[data.draw(st.sampled_from(names))] = dict(header[name])
    elif kind == "rename":
        header[name + data.draw(st.sampled_from(["x", ".weight", ""]))] = header.pop(name)
    text = json.dumps(header).encode()
    if kind == "bytes":
        at = data.draw(st.integers(0, len(text) - 1))
        text = text[:at] + bytes([data.draw(st.integers(0, 255))]) + text[at + 1:]
    prefix = struct.pack("<Q", len(text))
    if kind == "prefix":
        prefix = struct.pack("<Q", data.draw(st.integers(0, 2**64 - 1)))
    blob = prefix + text + body
    if kind == "truncate":
        blob = blob[:data.draw(st.integers(0, len(blob) - 1))]
    path.write_bytes(blob)
    load_or_olmo_lab_error(directory)


@FUZZ
@given(data=st.data())
def test_fuzz_config_json(fuzz_source, tmp_path_factory, monkeypatch, data):
    bounded_reads(monkeypatch)
    directory = copy_checkpoint(fuzz_source, tmp_path_factory.mktemp("k") / "c")
    config = json.loads((directory / "config.json").read_text())
    for _ in range(data.draw(st.integers(1, 3))):
        kind = data.draw(st.sampled_from(["set", "drop", "rope", "add"]))
        key = data.draw(st.sampled_from(sorted(config))) if config else "model_type"
        if kind == "set":
            config[key] = data.draw(JSON_VALUES)
        elif kind == "drop":
            config.pop(key, None)
        elif kind == "rope":
            entry = data.draw(st.sampled_from(["full_attention", "sliding_attention"]))
            field = data.draw(st.sampled_from(["rope_type", "rope_theta", "factor", "original_max_position_embeddings",
                                               "beta_fast", "beta_slow", "attention_factor", "truncate"]))
            rope = config.get("rope_parameters")
            if isinstance(rope, dict) and isinstance(rope.get(entry), dict):
                rope[entry][field] = data.draw(st.one_of(JSON_VALUES, st.just("yarn")))
        else:
            config[data.draw(st.sampled_from(["rope_scaling", "rope_theta", "num_experts", "layer_types",
                                              "expert_names", "clip_qkv", "auto_map"]))] = data.draw(JSON_VALUES)
    text = json.dumps(config)
    if data.draw(st.booleans()):  # and a raw edit of the text: a huge integer, or a cut
        text = data.draw(st.sampled_from([text.replace("32", "3" * 5000, 1), text[:data.draw(st.integers(0, 200))],
                                          "[" * 5000 + text]))
    (directory / "config.json").write_text(text)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RemoteCodeIgnoredWarning)
        load_or_olmo_lab_error(directory)
