"""Bad inputs (issue 8): each one raises a specific olmo_lab error whose message names the problem,
and a failure changes nothing.

After every failure the test checks, rather than assumes, that nothing moved: the model's weights,
its expert toggles and any KV cache are exactly as before; a failed `load_model` leaves the checkpoint
directory byte-identical and no model or loaded tensor alive, even while the exception (and with it
the traceback, as Jupyter keeps it) is still held; a failed `save_model` leaves the directory as it was.
Models are tiny and built directly from an `OlmoConfig`; no transformers oracle is needed here.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import pickle
import shutil
import struct
import weakref
from pathlib import Path

import pytest
import tokenizers
import torch
from safetensors.torch import load_file, save_file

import olmo_lab
from olmo_lab import checkpoint
from olmo_lab.config import RemoteCodeIgnoredWarning
from olmo_lab.errors import (CheckpointError, ConfigError, CorruptCheckpointError, ExpertError, GenerationError,
                             HubError, InputError, MissingTensorError, ShapeMismatchError, StaleCacheError,
                             TokenizerError, UnexpectedTensorError, UnsafeCheckpointError)
from olmo_lab.safetensors_file import SafetensorsFile
from olmo_lab.tokenizer import check_fits, load_tokenizer

DENSE = dict(model_type="olmo3", vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, sliding_window=4, max_position_embeddings=32,
             pad_token_id=1, eos_token_id=2)
FLEX = dict(model_type="flex_olmo", vocab_size=128, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, num_experts=3, num_experts_per_tok=2,
            expert_names=["public", "math", "code"], max_position_embeddings=32, pad_token_id=1, eos_token_id=2)
WEIGHT = "model.layers.0.self_attn.q_proj.weight"


def build(spec: dict, seed: int = 0) -> olmo_lab.OlmoModel:
    torch.manual_seed(seed)
    return olmo_lab.OlmoModel(olmo_lab.OlmoConfig(**spec)).eval()


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory) -> Path:
    return Path(olmo_lab.save_model(build(DENSE), tmp_path_factory.mktemp("dense")))


@pytest.fixture(scope="module")
def flex_dir(tmp_path_factory) -> Path:
    return Path(olmo_lab.save_model(build(FLEX), tmp_path_factory.mktemp("flex")))


@pytest.fixture
def dense():
    return build(DENSE)


@pytest.fixture
def flex():
    """A FlexOlmo model with a toggle already set, so "toggles unchanged" is not trivially true."""
    model = build(FLEX)
    model.experts.disable("math", layers=[1])
    return model


@pytest.fixture
def tok(tmp_path) -> olmo_lab.Tokenizer:
    """A word-level tokenizer ("w0".."w99" -> 3..102) that fits the 128-row models."""
    return load_tokenizer(word_tokenizer(tmp_path / "tok", 100))


def word_tokenizer(directory: Path, n_words: int) -> Path:
    vocab = {"<unk>": 0, "<|pad|>": 1, "<|endoftext|>": 2, **{f"w{i}": 3 + i for i in range(n_words)}}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    directory.mkdir(parents=True, exist_ok=True)
    backend.save(str(directory / "tokenizer.json"))
    return directory


# ------------------------------------------------------------------------------- "nothing changed"
def files_of(directory: Path) -> dict:
    """Every entry under `directory`: a file's sha256, a link's target."""
    out = {}
    for path in sorted(Path(directory).rglob("*")):
        key = str(path.relative_to(directory))
        out[key] = ("link", os.readlink(path)) if path.is_symlink() else (
            hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir")
    return out


@contextlib.contextmanager
def tracking_loads():
    """Weak references to every model `load_model` builds and every tensor it reads from a file
    (the test checkpoints are fp32 and load as fp32, so these are the very tensors a model would hold)."""
    made = {"models": [], "tensors": []}
    build_model, read = checkpoint.OlmoModel, SafetensorsFile.read

    def tracked_model(config):
        model = build_model(config)
        made["models"].append(weakref.ref(model))
        return model

    def tracked_read(self, *args):
        tensor = read(self, *args)
        made["tensors"].append(weakref.ref(tensor))
        return tensor
    checkpoint.OlmoModel, SafetensorsFile.read = tracked_model, tracked_read
    try:
        yield made
    finally:
        checkpoint.OlmoModel, SafetensorsFile.read = build_model, read


def alive(refs: list) -> list:
    return [r() for r in refs if r() is not None]


@contextlib.contextmanager
def unchanged(model, cache=None):
    """Assert on exit that the model's weights, expert toggles and the cache are exactly as on entry."""
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    toggles = model.experts.state() if model.config.is_moe else None
    saved = None if cache is None else (cache.length,
                                        [None if t is None else t.clone() for t in cache.keys + cache.values])
    yield
    now = model.state_dict()
    assert now.keys() == weights.keys() and all(torch.equal(now[k], v) for k, v in weights.items())
    if toggles is not None:
        assert model.experts.state() == toggles
    if cache is not None:
        assert cache.length == saved[0]
        for a, b in zip(saved[1], cache.keys + cache.values, strict=True):
            assert (a is None and b is None) or torch.equal(a, b)


def test_the_checks_notice_a_change(flex):
    """The "nothing changed" helpers are themselves checked: each kind of change trips them."""
    cache = flex.new_cache()
    for change in (lambda: flex(torch.tensor([[3]]), cache=cache), lambda: flex.experts.disable("code"),
                   lambda: flex.lm_head.weight.data.add_(1e-6)):
        with pytest.raises(AssertionError), unchanged(flex, cache):
            change()


def assert_load_fails(directory, error, match, **kw):
    """load_model raises `error` matching `match`, leaves `directory` untouched and builds nothing."""
    files = files_of(directory)
    result = "not assigned"
    with tracking_loads() as made, pytest.raises(error, match=match) as info:
        result = olmo_lab.load_model(directory, **kw)
    assert result == "not assigned"
    assert files_of(directory) == files
    # While the exception is still held (Jupyter keeps the last one, traceback and frames included),
    # no model shell is alive and at most the one offending tensor is; nothing once it is dropped.
    assert not alive(made["models"])
    assert len(alive(made["tensors"])) <= 1
    del info
    if alive(made["models"]) or alive(made["tensors"]):
        gc.collect()  # reference cycles are not a leak; only what survives a collection is
    assert not alive(made["models"]) and not alive(made["tensors"])


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


DELETE = object()  # edit_config(key=DELETE) removes the key


def edit_config(directory: Path, **changes) -> Path:
    path = directory / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is DELETE:
            del config[key]
        else:
            config[key] = value
    path.write_text(json.dumps(config))
    return directory


def edit_weights(directory: Path, edit) -> Path:
    path = directory / "model.safetensors"
    state = load_file(path)
    edit(state)
    save_file(state, path)
    return directory


def write_raw_safetensors(path: Path, header: dict, data: bytes = b"") -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


# ---------------------------------------------------------------------------------------- config
CONFIG_CASES = {
    "unknown model_type": (dict(model_type="llama"), "model_type: 'llama' is not supported"),
    "missing model_type": (dict(model_type=DELETE), "model_type: missing"),
    "missing field": (dict(hidden_size=DELETE), "hidden_size: missing from config.json"),
    "wrong-typed int": (dict(vocab_size="128"), "vocab_size: must be an integer, got '128'"),
    "float where int": (dict(num_hidden_layers=4.0), "num_hidden_layers: must be an integer, got 4.0"),
    "zero size": (dict(intermediate_size=0), "intermediate_size: must be >= 1, got 0"),
    "wrong-typed bool": (dict(tie_word_embeddings="yes"), "tie_word_embeddings: must be true or false"),
    "wrong-typed eps": (dict(rms_norm_eps="small"), "rms_norm_eps: must be a finite number"),
    "wrong-typed eos id": (dict(eos_token_id="</s>"), "eos_token_id: must be a token id"),
    "wrong-typed pad id": (dict(pad_token_id=1.5), "pad_token_id: must be a token id"),
    "heads do not divide hidden": (dict(num_attention_heads=5, num_key_value_heads=5, head_dim=None),
                                   "num_attention_heads: 5 does not divide hidden_size 32"),
    "kv heads do not divide heads": (dict(num_key_value_heads=3), "num_key_value_heads: 3 does not divide "
                                                                  "num_attention_heads 4"),
    "odd head_dim": (dict(head_dim=7), "head_dim: must be even"),
    "unknown rope type": (dict(rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4}),
                          "unknown rope type 'dynamic'"),
    "rope entry not an object": (dict(rope_parameters={"full_attention": 10000.0}),
                                 r"rope_parameters\['full_attention'\]: must be an object"),
    "layer_types too short": (dict(layer_types=["full_attention"] * 3),
                              "layer_types: has 3 entries but num_hidden_layers is 4"),
    "unknown layer type": (dict(layer_types=["full_attention"] * 3 + ["local"]), r"layer_types\[3\]: unknown layer "
                                                                                "type 'local'"),
    "zero sliding window": (dict(sliding_window=0), "sliding_window: must be >= 1, got 0"),
    "unsupported activation": (dict(hidden_act="gelu"), "hidden_act: only 'silu'"),
}


@pytest.mark.parametrize("case", CONFIG_CASES, ids=list(CONFIG_CASES))
def test_bad_config(dense_dir, tmp_path, case):
    changes, message = CONFIG_CASES[case]
    assert_load_fails(edit_config(copy_checkpoint(dense_dir, tmp_path / "c"), **changes), ConfigError, message)


FLEX_CONFIG_CASES = {
    "top-k larger than experts": (dict(num_experts_per_tok=4), "top-k 4 is larger than num_experts 3"),
    "duplicate expert names": (dict(expert_names=["public", "math", "math"]), "names must be unique"),
    "wrong number of expert names": (dict(expert_names=["public", "math"]), "2 names for 3 experts"),
    "sliding layers in FlexOlmo": (dict(layer_types=["sliding_attention", "full_attention"]),
                                   "flex_olmo has no sliding-window layers"),
}


@pytest.mark.parametrize("case", FLEX_CONFIG_CASES, ids=list(FLEX_CONFIG_CASES))
def test_bad_flex_config(flex_dir, tmp_path, case):
    changes, message = FLEX_CONFIG_CASES[case]
    assert_load_fails(edit_config(copy_checkpoint(flex_dir, tmp_path / "c"), **changes), ConfigError, message)


def test_missing_config_json(dense_dir, tmp_path):
    directory = copy_checkpoint(dense_dir, tmp_path / "c")
    (directory / "config.json").unlink()
    assert_load_fails(directory, ConfigError, "config.json: file not found")


@pytest.mark.parametrize("text, message", [("{\"model_type\": \"olmo3\",", "config.json: not valid JSON"),
                                           ("[1, 2]", "config.json: expected a JSON object, got list"),
                                           ("\udcff", "config.json: not valid JSON")],
                         ids=["truncated JSON", "JSON array", "not UTF-8"])
def test_unreadable_config_json(dense_dir, tmp_path, text, message):
    directory = copy_checkpoint(dense_dir, tmp_path / "c")
    (directory / "config.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    assert_load_fails(directory, ConfigError, message)


def test_config_constructor_rejects_wrong_types():
    with pytest.raises(ConfigError, match="hidden_size: must be an integer, got '32'"):
        olmo_lab.OlmoConfig(**{**DENSE, "hidden_size": "32"})


def test_bad_dtype_argument(dense_dir):
    assert_load_fails(dense_dir, ConfigError, "dtype: torch.int8 is not a floating-point dtype", dtype=torch.int8)
    assert_load_fails(dense_dir, ConfigError, "dtype: unknown dtype 'fp8'", dtype="fp8")


def test_path_is_not_a_checkpoint_directory(dense_dir, tmp_path):
    with pytest.raises(CheckpointError, match="is not a directory"):
        olmo_lab.load_model(dense_dir / "config.json")
    with pytest.raises(CheckpointError, match="is not a directory"):
        olmo_lab.load_model(tmp_path / "no-such-dir")


def test_hub_repo_not_available_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(HubError, match="checkpoint of hub repo 'nobody/no-such-model': HF_HUB_OFFLINE is set"):
        olmo_lab.load_model("nobody/no-such-model")
    assert not (tmp_path / "hub").exists() or not any((tmp_path / "hub").rglob("*.safetensors"))


# ---------------------------------------------------------------------------------------- weights
def _nonfinite(value):
    def edit(state):
        state[WEIGHT][0, 0] = value
    return edit


WEIGHT_CASES = {
    "missing tensor": (lambda s: s.pop(WEIGHT), MissingTensorError,
                       f"missing 1 tensor\\(s\\) the model needs: {WEIGHT}"),
    "unexpected tensor": (lambda s: s.update({"model.layers.0.extra.weight": torch.zeros(2)}), UnexpectedTensorError,
                          "1 tensor\\(s\\) this olmo3 model does not use: model.layers.0.extra.weight"),
    "wrong shape": (lambda s: s.update({WEIGHT: torch.zeros(16, 32)}), ShapeMismatchError,
                    f"'{WEIGHT}' has shape \\(16, 32\\) in the checkpoint, but the config implies \\(32, 32\\)"),
    "integer tensor": (lambda s: s.update({WEIGHT: torch.zeros(32, 32, dtype=torch.int32)}), ShapeMismatchError,
                       f"'{WEIGHT}' has dtype torch.int32; weights must be floating point"),
    "NaN weight": (_nonfinite(float("nan")), CorruptCheckpointError, f"'{WEIGHT}' contains NaN or Inf"),
    "Inf weight": (_nonfinite(float("inf")), CorruptCheckpointError, f"'{WEIGHT}' contains NaN or Inf"),
}


@pytest.mark.parametrize("case", WEIGHT_CASES, ids=list(WEIGHT_CASES))
def test_bad_weights(dense_dir, tmp_path, case):
    edit, error, message = WEIGHT_CASES[case]
    assert_load_fails(edit_weights(copy_checkpoint(dense_dir, tmp_path / "c"), edit), error, message)


def test_nonfinite_weights_are_documented_as_an_error():
    assert "Non-finite (NaN/Inf) weights are an error (CorruptCheckpointError" in olmo_lab.load_model.__doc__


def test_last_tensor_nonfinite_frees_everything_read_before(dense_dir, tmp_path):
    """The last tensor read is bad: the ~20 good tensors read before it must not stay alive."""
    directory = copy_checkpoint(dense_dir, tmp_path / "c")
    edit_weights(directory, lambda s: s["lm_head.weight"].__setitem__((0, 0), float("nan")))
    assert_load_fails(directory, CorruptCheckpointError, "'lm_head.weight' contains NaN or Inf")


def test_truncated_safetensors(dense_dir, tmp_path):
    directory = copy_checkpoint(dense_dir, tmp_path / "c")
    path = directory / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    assert_load_fails(directory, CorruptCheckpointError, "model.safetensors: file is truncated: tensor")


def test_safetensors_shorter_than_its_length_prefix(dense_dir, tmp_path):
    directory = copy_checkpoint(dense_dir, tmp_path / "c")
    (directory / "model.safetensors").write_bytes(b"\x01\x02")
    assert_load_fails(directory, CorruptCheckpointError, r"file is truncated \(2 bytes\): not a safetensors file")


def test_corrupted_safetensors_header(dense_dir, tmp_path):
    directory = copy_checkpoint(dense_dir, tmp_path / "c")
    path = directory / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:12] = b"\xff\xfe{["  # garbage at the start of the JSON header
    path.write_bytes(bytes(data))
    assert_load_fails(directory, CorruptCheckpointError, "model.safetensors: corrupted header: not valid JSON")


def test_header_length_larger_than_file(dense_dir, tmp_path):
    directory = copy_checkpoint(dense_dir, tmp_path / "c")
    path = directory / "model.safetensors"
    path.write_bytes(struct.pack("<Q", 2**40) + path.read_bytes()[8:])
    assert_load_fails(directory, CorruptCheckpointError, "corrupted header: it claims 1099511627776 bytes")


@pytest.mark.parametrize("entry, message", [
    ({"dtype": "F32", "shape": [-2, -2], "data_offsets": [0, 16]}, r"shape \[-2, -2\] is not a list of non-negative"),
    ({"dtype": "F32", "shape": "22", "data_offsets": [0, 16]}, "shape '22' is not a list of non-negative"),
    ({"dtype": "F8", "shape": [2], "data_offsets": [0, 2]}, "corrupted header entry for tensor"),
    ({"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}, r"offsets \[0, 12\] do not fit dtype F32"),
], ids=["negative dims", "shape as string", "unknown dtype", "offsets disagree with shape"])
def test_inconsistent_header_entry(tmp_path, entry, message):
    directory = tmp_path / "c"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(olmo_lab.OlmoConfig(**DENSE).to_dict()))
    write_raw_safetensors(directory / "model.safetensors", {WEIGHT: entry}, b"\0" * 16)
    assert_load_fails(directory, CorruptCheckpointError, message)


@pytest.fixture
def sharded(tmp_path) -> Path:
    return Path(olmo_lab.save_model(build(DENSE), tmp_path / "sharded", max_shard_size=20_000))


def edit_index(directory: Path, edit) -> Path:
    path = directory / checkpoint.INDEX_FILE
    index = json.loads(path.read_text())
    edit(index["weight_map"])
    path.write_text(json.dumps(index))
    return directory


def shards(directory: Path) -> list[str]:
    return sorted(set(json.loads((directory / checkpoint.INDEX_FILE).read_text())["weight_map"].values()))


def test_index_whose_shard_is_missing(sharded):
    assert len(shards(sharded)) >= 2
    (sharded / shards(sharded)[1]).unlink()
    assert_load_fails(sharded, CorruptCheckpointError, f"shard '{shards(sharded)[1]}' is missing")


@pytest.mark.parametrize("shard, message", [
    ("../../etc/passwd", "shard '../../etc/passwd' is not a plain file name inside the checkpoint directory"),
    ("/etc/passwd", "shard '/etc/passwd' is not a plain file name inside the checkpoint directory"),
    ("sub/model.safetensors", "shard 'sub/model.safetensors' is not a plain file name"),
    ("..", "shard '..' is not a plain file name"),
    ("pytorch_model.bin", "shard 'pytorch_model.bin' is not a .safetensors file; olmo-lab never loads pickled"),
], ids=["relative escape", "absolute path", "subdirectory", "parent dir", "pickle shard"])
def test_index_naming_a_shard_outside_the_checkpoint(sharded, shard, message):
    (sharded / "pytorch_model.bin").write_bytes(b"not loaded")
    assert_load_fails(edit_index(sharded, lambda m: m.update({WEIGHT: shard})), UnsafeCheckpointError, message)


def test_index_shard_symlinked_outside(sharded, tmp_path):
    outside, first = tmp_path / "outside.safetensors", shards(sharded)[0]
    shutil.move(sharded / first, outside)
    (sharded / first).symlink_to(outside)
    assert_load_fails(sharded, UnsafeCheckpointError, f"'{first}' is a link to a file outside the checkpoint "
                                                      f"directory")


def test_single_file_symlinked_outside(dense_dir, tmp_path):
    directory = copy_checkpoint(dense_dir, tmp_path / "c")
    shutil.move(directory / "model.safetensors", tmp_path / "elsewhere.safetensors")
    (directory / "model.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    assert_load_fails(directory, UnsafeCheckpointError, "model.safetensors is a link to a file outside")


@pytest.mark.parametrize("text, message", [
    ("{\"weight_map\": [\"a\"]}", r"malformed index \(no 'weight_map' object\)"),
    ("{\"metadata\": {}}", r"malformed index \(no 'weight_map' object\)"),
    ("{\"weight_map\": {\"a\": 1, \"b\": \"x.safetensors\"}}", "weight_map values must be shard file names"),
    ("{\"weight_map\": {\"a\": [\"x.safetensors\"]}}", "weight_map values must be shard file names"),
    ("{\"weight_map\": ", r"model.safetensors.index.json: not valid JSON \(Expecting value"),
], ids=["map is a list", "no weight_map", "int shard", "list shard", "truncated JSON"])
def test_malformed_index(sharded, text, message):
    (sharded / checkpoint.INDEX_FILE).write_text(text)
    assert_load_fails(sharded, CorruptCheckpointError, message)


def test_index_maps_a_tensor_to_the_wrong_shard(sharded):
    index = json.loads((sharded / checkpoint.INDEX_FILE).read_text())["weight_map"]
    other = next(s for s in shards(sharded) if s != index[WEIGHT])
    edit_index(sharded, lambda m: m.update({WEIGHT: other}))
    assert_load_fails(sharded, CorruptCheckpointError, f"tensor '{WEIGHT}' is not in {other}")


def test_no_weights_at_all(dense_dir, tmp_path):
    directory = copy_checkpoint(dense_dir, tmp_path / "c")
    (directory / "model.safetensors").unlink()
    assert_load_fails(directory, MissingTensorError, "no weights in .*: expected model.safetensors")


@pytest.mark.parametrize("fused, message", [
    (torch.tensor(1.0), r"'model.layers.0.mlp.experts.gate_up_proj' has shape \(\) in the checkpoint, but the config "
                        r"implies \(3, 48, 32\)"),
    (torch.zeros(2, 48, 32), r"'model.layers.0.mlp.experts.gate_up_proj' has shape \(2, 48, 32\) in the checkpoint"),
], ids=["scalar", "too few experts"])
def test_bad_fused_expert_tensor(flex_dir, tmp_path, fused, message):
    """transformers 5's fused layout: one (experts, 2 * intermediate, hidden) tensor per layer; its header
    shape is checked before any of its rows is read."""
    def fuse(state):
        prefix = "model.layers.0.mlp.experts"
        for name in [n for n in state if n.startswith(prefix + ".")]:
            del state[name]
        state.update({f"{prefix}.gate_up_proj": fused, f"{prefix}.down_proj": torch.zeros(3, 32, 24)})
    assert_load_fails(edit_weights(copy_checkpoint(flex_dir, tmp_path / "c"), fuse), ShapeMismatchError, message)


# ---------------------------------------------------------------------------------------- experts at load
@pytest.mark.parametrize("kw, message", [
    (dict(experts=["public", "physics"]), "unknown expert name 'physics'"),
    (dict(experts=[3]), r"expert index 3 is out of range: this model has 3 experts \(0..2\)"),
    (dict(experts=[-1]), "expert index -1 is out of range"),
    (dict(experts=[]), "the list of experts is empty"),
    (dict(expert_names=["a", "b"]), "2 names for 3 experts"),
], ids=["unknown name", "index too large", "negative index", "empty list", "too few names"])
def test_bad_expert_selection_at_load(flex_dir, kw, message):
    assert_load_fails(flex_dir, ExpertError, message, **kw)


def test_expert_selection_on_a_dense_checkpoint(dense_dir):
    assert_load_fails(dense_dir, ExpertError, "dense olmo3 checkpoint; it has no experts", experts=["public"])


# ---------------------------------------------------------------------------------------- code execution
class _Marker:
    """Unpickling this creates `path`: proof that a loader ran code from a pickle."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return Path.touch, (Path(self.path),)


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "weights.pkl"])
def test_pickle_weights_are_refused_and_never_unpickled(dense_dir, tmp_path, name):
    directory = copy_checkpoint(dense_dir, tmp_path / "c")
    (directory / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    (directory / name).write_bytes(pickle.dumps(_Marker(marker)))
    assert_load_fails(directory, UnsafeCheckpointError, f"refusing to load pickle-based weights \\['{name}'\\]")
    assert not marker.exists()
    pickle.loads((directory / name).read_bytes())  # the test's own proof that this pickle does run code
    assert marker.exists()


def test_pickle_next_to_safetensors_is_ignored(dense_dir, tmp_path):
    directory = copy_checkpoint(dense_dir, tmp_path / "c")
    marker = tmp_path / "pwned"
    (directory / "pytorch_model.bin").write_bytes(pickle.dumps(_Marker(marker)))
    olmo_lab.load_model(directory)
    assert not marker.exists()


def test_auto_map_is_ignored_with_a_warning_and_its_code_never_runs(dense_dir, tmp_path):
    directory = copy_checkpoint(dense_dir, tmp_path / "c")
    marker = tmp_path / "pwned"
    (directory / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    edit_config(directory, auto_map={"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"})
    with pytest.warns(RemoteCodeIgnoredWarning, match="'auto_map' \\(remote code\\) is ignored"):
        model = olmo_lab.load_model(directory)
    assert isinstance(model, olmo_lab.OlmoModel) and model.config.model_type == "olmo3"
    assert not marker.exists()


# ---------------------------------------------------------------------------------------- tokenizer
def test_missing_tokenizer_json(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerError, match="tokenizer.json is missing"):
        load_tokenizer(tmp_path / "empty")


def test_broken_tokenizer_json(tmp_path):
    directory = word_tokenizer(tmp_path / "tok", 10)
    (directory / "tokenizer.json").write_text('{"model": {"type": "WordLevel", "vocab": ')
    before = files_of(directory)
    with pytest.raises(TokenizerError, match="not a valid tokenizer.json"):
        load_tokenizer(directory)
    assert files_of(directory) == before


def test_tokenizer_vocab_larger_than_the_embedding_table(tmp_path, dense):
    big = load_tokenizer(word_tokenizer(tmp_path / "big", 200))
    with pytest.raises(TokenizerError, match=r"needs 203 embedding rows \(ids 0..202\) but the model's vocab_size "
                                             r"is 128"):
        check_fits(big, dense.config.vocab_size)


@pytest.mark.parametrize("prompt, error, message", [
    ("", GenerationError, "prompt is empty"),
    (["w1 w2", ""], GenerationError, "prompt is empty"),
    ([], GenerationError, "prompt is empty"),
    (3.5, GenerationError, "prompt: expected text, a list of texts, token ids or a .* got float"),
    (b"w1 w2", GenerationError, "prompt: expected text, .* got bytes"),
    (["w1", 2], GenerationError, "prompt: expected text, .* got list"),
    (" ".join(["w1"] * 40), GenerationError, "prompt: 40 tokens is longer than the model's context of 32"),
], ids=["empty", "empty in batch", "empty list", "float", "bytes", "mixed list", "longer than context"])
def test_bad_text_prompt(flex, tok, prompt, error, message):
    with unchanged(flex), pytest.raises(error, match=message):
        olmo_lab.generate(flex, tok, prompt, max_new_tokens=2)


def test_text_prompt_without_a_tokenizer(flex):
    with unchanged(flex), pytest.raises(TokenizerError, match="a text prompt needs a tokenizer"):
        olmo_lab.generate(flex, None, "w1 w2")


@pytest.mark.parametrize("text", [None, 12, b"w1"], ids=["None", "int", "bytes"])
def test_tokenizer_rejects_non_text(tok, text):
    with pytest.raises(TokenizerError, match="expected a str or a list of str"):
        tok.encode(text)


# ---------------------------------------------------------------------------------------- generation
GENERATION_CASES = {
    "negative max_new_tokens": (dict(max_new_tokens=-1), "max_new_tokens: must be a non-negative integer, got -1"),
    "fractional max_new_tokens": (dict(max_new_tokens=2.5), "max_new_tokens: must be a non-negative integer"),
    "string max_new_tokens": (dict(max_new_tokens="5"), "max_new_tokens: must be a non-negative integer, got '5'"),
    "bool max_new_tokens": (dict(max_new_tokens=True), "max_new_tokens: must be a non-negative integer, got True"),
    "absurd max_new_tokens": (dict(max_new_tokens=10**12), "exceed the model's context of 32 positions"),
    "negative temperature": (dict(temperature=-0.5), "temperature: must be >= 0"),
    "NaN temperature": (dict(temperature=float("nan")), "temperature: must be >= 0"),
    "top_k with greedy": (dict(top_k=5), "sampling filters need temperature > 0"),
    "top_p with greedy": (dict(top_p=0.9), "sampling filters need temperature > 0"),
    "zero top_p": (dict(temperature=1.0, top_p=0.0), r"top_p: must be in \(0, 1\], got 0.0"),
    "top_p above 1": (dict(temperature=1.0, top_p=1.5), r"top_p: must be in \(0, 1\], got 1.5"),
    "zero top_k": (dict(temperature=1.0, top_k=0), "top_k: must be a positive integer, got 0"),
    "non-int seed": (dict(temperature=1.0, seed="x"), "seed: must be an integer"),
    "empty stop string": (dict(stop=[""]), "stop strings must be non-empty"),
}


@pytest.mark.parametrize("case", GENERATION_CASES, ids=list(GENERATION_CASES))
def test_bad_generation_arguments(flex, tok, case):
    kw, message = GENERATION_CASES[case]
    with unchanged(flex), pytest.raises(GenerationError, match=message):
        olmo_lab.generate(flex, tok, "w1 w2 w3", **{"max_new_tokens": 2, **kw})


@pytest.mark.parametrize("prompt, message", [
    (torch.tensor([[1.0, 2.0]]), "prompt ids: expected an integer tensor"),
    (torch.zeros(1, 2, 2, dtype=torch.long), r"prompt ids: expected an integer tensor .* shape \(1, 2, 2\)"),
    (torch.zeros(1, 0, dtype=torch.long), "prompt is empty"),
    ([[3, 4], []], "every sequence must be a non-empty list of ints"),
], ids=["float ids", "3-D ids", "zero-length ids", "empty row"])
def test_bad_prompt_ids(flex, prompt, message):
    with unchanged(flex), pytest.raises(GenerationError, match=message):
        olmo_lab.generate(flex, None, prompt, max_new_tokens=2)


def test_streaming_a_batch(flex):
    with unchanged(flex), pytest.raises(GenerationError, match="streaming needs a single prompt, got a batch of 2"):
        olmo_lab.generate(flex, None, [[3, 4], [5, 6]], max_new_tokens=2, stream=True)


# ---------------------------------------------------------------------------------------- expert toggles
TOGGLE_CASES = {
    "unknown name": (lambda ex: ex.disable("physics"), "unknown expert name 'physics'; this model's experts are"),
    "index too large": (lambda ex: ex.disable(3), "expert index 3 is out of range: this model has 3 experts"),
    "negative index": (lambda ex: ex.disable(-1), "expert index -1 is out of range"),
    "all experts off": (lambda ex: ex.disable(["public", "math", "code"]), "no expert would be left enabled"),
    "last expert off": (lambda ex: ex.disable(["public", "code"], layers=[1]),
                        "cannot disable 'public', 'code' in layer 1: no expert would be left"),
    "all dropped": (lambda ex: ex.disable([0, 1, 2], mode="drop"), "no expert would be left enabled"),
    "layer out of range": (lambda ex: ex.disable("math", layers=[2]), "layer 2 is out of range: this model has 2"),
    "unknown mode": (lambda ex: ex.disable("math", mode="zero"), "unknown toggle mode 'zero'"),
    "enable unknown": (lambda ex: ex.enable("physics"), "unknown expert name 'physics'"),
    "not a name": (lambda ex: ex.disable(1.5), "expected a name, an index or a list"),
    "bool index": (lambda ex: ex.disable([True]), "expert True: expected a name"),
}


@pytest.mark.parametrize("case", TOGGLE_CASES, ids=list(TOGGLE_CASES))
def test_bad_toggle(flex, case):
    bad, message = TOGGLE_CASES[case]
    ids = torch.tensor([[3, 4, 5, 6]])
    logits = flex(ids).logits
    with unchanged(flex), pytest.raises(ExpertError, match=message):
        bad(flex.experts)
    assert torch.equal(flex(ids).logits, logits)


def test_experts_off_with_an_unknown_name_changes_nothing(flex):
    with unchanged(flex), pytest.raises(ExpertError, match="unknown expert name 'physics'"):
        with olmo_lab.experts_off(flex, ["code", "physics"]):
            pass


def test_dense_model_has_no_toggles(dense):
    with unchanged(dense), pytest.raises(ExpertError, match="dense olmo3 model; it has no experts to toggle"):
        dense.experts.disable("math")


# ---------------------------------------------------------------------------------------- caches
def test_stale_cache_after_toggling(flex):
    cache = flex.new_cache()
    flex(torch.tensor([[3, 4, 5]]), cache=cache)
    flex.experts.disable("code")
    with unchanged(flex, cache), pytest.raises(StaleCacheError, match="expert toggles changed since this KV cache"):
        flex(torch.tensor([[6]]), cache=cache)


def test_cache_of_another_model(flex):
    other = build(FLEX, seed=1)
    cache = other.new_cache()
    other(torch.tensor([[3, 4, 5]]), cache=cache)
    with unchanged(flex, cache), pytest.raises(StaleCacheError, match="built by a different model"):
        flex(torch.tensor([[6]]), cache=cache)


# ---------------------------------------------------------------------------------------- model inputs
INPUT_CASES = {
    "float ids": (lambda: torch.tensor([[3.0, 4.0]]), None, "input_ids: expected an integer tensor .* torch.float32"),
    "1-D ids": (lambda: torch.tensor([3, 4]), None, r"input_ids: expected .* of shape \(2,\)"),
    "list ids": (lambda: [[3, 4]], None, "input_ids: expected an integer tensor .* got list"),
    "empty sequence": (lambda: torch.zeros(1, 0, dtype=torch.long), None, "input_ids: the sequence is empty"),
    "id past vocab": (lambda: torch.tensor([[3, 128]]), None, r"token ids must lie in \[0, 128\), got \[3, 128\]"),
    "negative id": (lambda: torch.tensor([[-1, 3]]), None, r"token ids must lie in \[0, 128\), got \[-1, 3\]"),
    "mask too short": (lambda: torch.tensor([[3, 4, 5]]), dict(attention_mask=torch.ones(1, 2)),
                       r"attention_mask: expected a tensor of shape \(1, 3\) .* got \(1, 2\)"),
    "mask wrong batch": (lambda: torch.tensor([[3, 4, 5]]), dict(attention_mask=torch.ones(2, 3)),
                         r"attention_mask: expected a tensor of shape \(1, 3\)"),
    "mask as a list": (lambda: torch.tensor([[3, 4, 5]]), dict(attention_mask=[[1, 1, 1]]),
                       r"attention_mask: expected a tensor of shape \(1, 3\) .* got list"),
    "mask values": (lambda: torch.tensor([[3, 4, 5]]), dict(attention_mask=torch.tensor([[0.5, 1, 2]])),
                    r"attention_mask: values must be 1 \(token\) or 0 \(padding\)"),
    "positions wrong shape": (lambda: torch.tensor([[3, 4, 5]]), dict(position_ids=torch.arange(4)[None]),
                              r"position_ids: expected an integer tensor of shape \(1, 3\), got \(1, 4\)"),
    "float positions": (lambda: torch.tensor([[3, 4, 5]]), dict(position_ids=torch.zeros(1, 3)),
                        r"position_ids: expected an integer tensor"),
    "negative positions": (lambda: torch.tensor([[3, 4, 5]]), dict(position_ids=torch.tensor([[-1, 0, 1]])),
                           r"position_ids: positions must be >= 0"),
    "longer than the context": (lambda: torch.full((1, 40), 3), None,
                                r"40 positions exceed the model's context of 32"),
}


@pytest.mark.parametrize("case", INPUT_CASES, ids=list(INPUT_CASES))
def test_bad_model_inputs(dense, case):
    ids, kw, message = INPUT_CASES[case]
    with unchanged(dense), pytest.raises(InputError, match=message):
        dense(ids(), **(kw or {}))


def test_mask_that_ignores_the_cache_leaves_the_cache_alone(dense):
    cache = dense.new_cache()
    dense(torch.tensor([[3, 4, 5]]), cache=cache)
    with unchanged(dense, cache), pytest.raises(InputError, match=r"expected a tensor of shape \(1, 4\) \(batch, cached \+ new"):
        dense(torch.tensor([[6]]), attention_mask=torch.ones(1, 1), cache=cache)


def test_out_of_vocab_ids_through_generate(dense):
    with unchanged(dense), pytest.raises(GenerationError, match=r"prompt ids: token ids must lie in \[0, 128\)"):
        olmo_lab.generate(dense, None, [3, 500], max_new_tokens=2)


# ---------------------------------------------------------------------------------------- saving
def _failing_save_file(fail_on: int):
    """A safetensors writer that writes half a file, then fails (disk full) on the `fail_on`-th call."""
    calls = []

    def save(state, path, metadata=None):
        calls.append(path)
        if len(calls) == fail_on:
            Path(path).write_bytes(b"\0" * 100)
            raise OSError(28, "No space left on device")
        save_file(state, path, metadata=metadata)
    return save


@pytest.mark.parametrize("shard_size, fail_on", [(None, 1), (20_000, 2)], ids=["single file", "second shard"])
def test_failed_save_leaves_the_directory_as_it_was(dense_dir, tmp_path, monkeypatch, shard_size, fail_on):
    directory = copy_checkpoint(dense_dir, tmp_path / "c")
    before = files_of(directory)
    model = build(DENSE, seed=1)
    monkeypatch.setattr(checkpoint, "save_file", _failing_save_file(fail_on))
    with unchanged(model), pytest.raises(OSError, match="No space left on device"):
        olmo_lab.save_model(model, directory, max_shard_size=shard_size)
    assert files_of(directory) == before  # no temporary file, no new shard next to the old config
    monkeypatch.undo()
    assert torch.equal(olmo_lab.load_model(directory).lm_head.weight, build(DENSE).lm_head.weight)


@pytest.mark.parametrize("size", [0, -5, True, "lots", "0MB", 1.5])
def test_bad_max_shard_size(dense, tmp_path, size):
    with unchanged(dense), pytest.raises(InputError, match="max_shard_size: expected a positive number of bytes"):
        olmo_lab.save_model(dense, tmp_path / "out", max_shard_size=size)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_stream_checks_its_ids_when_called(flex):
    with pytest.raises(GenerationError, match=r"token ids must lie in \[0, 128\)"):
        olmo_lab.generate(flex, None, [3, 999], max_new_tokens=2, stream=True)
