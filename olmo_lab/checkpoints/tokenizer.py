"""The tokenizer: a thin, checked wrapper around a Hugging Face `tokenizer.json`.

OLMo 2/3 and FlexOlmo use the "dolma2" tokenizer, a byte-level BPE (cl100k_base plus 22 added tokens:
EOS `<|endoftext|>` 100257, PAD `<|pad|>` 100277, ChatML `<|im_start|>`/`<|im_end|>` 100264/100265).
Exact ids come from `tokenizer.json` run by the `tokenizers` library; this module adds what a
notebook needs around it:

- the special tokens and chat template from the files next to `tokenizer.json`
  (`tokenizer_config.json`, `special_tokens_map.json`, `chat_template.jinja`, `generation_config.json`);
- `encode`/`decode` that never prepend a BOS and never drop special tokens behind your back;
- left-padded batches as torch tensors, ready for the model;
- chat templates rendered in a sandboxed Jinja environment, since a template is untrusted checkpoint data.

Every problem raises `TokenizerError` (or `HubError` for an unreachable hub repo) naming the file or input.
Only JSON and Jinja text are read; nothing is unpickled and no checkpoint code is run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import tokenizers
import torch

from . import hub, revisions
from .chat_template import chat_environment, render_chat_template
from ..errors import CheckpointError, TokenizerError
from .json_file import read_json

# The files a hub snapshot needs for a tokenizer; everything else (weights) is left on the hub.
TOKENIZER_FILES = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
]
# transformers writes this sentinel as `model_max_length` when the real limit is unknown.
_NO_MAX_LENGTH = int(1e12)


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special tokens and chat template of its checkpoint.

    Build one with `load_tokenizer`. Ids are the ids of `tokenizer.json`; `encode` adds no BOS
    (dolma2 has none) unless `add_special_tokens=True` and the file's post-processor adds one.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        eos_token: str | None = None,
        pad_token: str | None = None,
        bos_token: str | None = None,
        chat_template: str | None = None,
        model_max_length: int | None = None,
        stop_token_ids: Sequence[int] = (),
        source: str = "<tokenizer>",
    ):
        # Padding or truncation configured inside tokenizer.json would silently change encode();
        # batches are padded here instead, explicitly.
        backend.no_padding()
        backend.no_truncation()
        self.backend = backend
        self.source = source
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        # Ids may have gaps, so the embedding table must cover the largest id, not just vocab_size rows.
        self.max_token_id: int = max(backend.get_vocab(with_added_tokens=True).values())

        self.eos_token: str | None = eos_token
        self.pad_token: str | None = pad_token
        self.bos_token: str | None = bos_token
        self.eos_token_id: int | None = self._token_id(eos_token, "eos_token")
        self.pad_token_id: int | None = self._token_id(pad_token, "pad_token")
        self.bos_token_id: int | None = self._token_id(bos_token, "bos_token")
        self.chat_template: str | None = chat_template
        self.model_max_length: int | None = model_max_length
        # Ids that end a generation: the EOS plus any extra ones generation_config.json lists
        # (instruct checkpoints also stop at `<|im_end|>`).
        stops = [self.eos_token_id] if self.eos_token_id is not None else []
        self.stop_token_ids: tuple[int, ...] = tuple(dict.fromkeys(stops + [int(i) for i in stop_token_ids]))

    def _token_id(self, token: str | None, role: str) -> int | None:
        if token is None:
            return None
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise TokenizerError(f"{self.source}: {role} {token!r} is not in the vocabulary")
        return token_id

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (f"Tokenizer({self.source!r}, vocab_size={self.vocab_size}, eos={self.eos_token!r} "
                f"({self.eos_token_id}), pad={self.pad_token!r} ({self.pad_token_id}), "
                f"chat_template={'yes' if self.chat_template else 'no'})")

    # ----------------------------------------------------------------------------------- text <-> ids

    def encode(self, text: str | Sequence[str], add_special_tokens: bool = False) -> list[int] | list[list[int]]:
        """Token ids of `text`, or one list of ids per string when given a list of strings.

        `add_special_tokens=False` (the default) returns exactly the ids of the text; special-token
        strings written in the text, like `<|im_start|>`, still become their single ids.
        """
        texts = [_unicode(text, "encode")] if isinstance(text, str) else _check_texts(text, "encode")
        try:
            if isinstance(text, str):
                return self.backend.encode(texts[0], add_special_tokens=add_special_tokens).ids
            return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)]
        except Exception as err:  # noqa: BLE001 -- the Rust side raises a bare Exception (e.g. no unknown token)
            raise TokenizerError(f"{self.source}: cannot encode the text ({_first_line(err)})") from None

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = False) -> str:
        """The text of a sequence of ids (a list or a 1-D tensor).

        Special tokens are kept by default, so what you see is what the model saw.
        (`tokenizers` itself defaults to dropping them.)
        """
        return self.backend.decode(self._check_ids(ids), skip_special_tokens=skip_special_tokens)

    def token_strings(self, ids: Sequence[int] | torch.Tensor) -> list[str]:
        """The text of each token decoded on its own, e.g. for plot labels.

        A token holding only part of a multi-byte character (an emoji split in two) shows as '\\ufffd'.
        """
        return [self.backend.decode([i], skip_special_tokens=False) for i in self._check_ids(ids)]

    def _check_ids(self, ids: Sequence[int] | torch.Tensor) -> list[int]:
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1 or ids.is_floating_point() or ids.is_complex():
                raise TokenizerError(f"ids: expected a 1-D integer tensor, got shape {tuple(ids.shape)} {ids.dtype}")
            ids = ids.tolist()
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
            raise TokenizerError(f"ids: expected a sequence of ints, got {type(ids).__name__}")
        for position, i in enumerate(ids):
            if isinstance(i, bool) or not isinstance(i, int):
                raise TokenizerError(f"ids[{position}]: expected an int, got {type(i).__name__}")
            if not 0 <= i <= self.max_token_id:
                raise TokenizerError(f"ids[{position}]: token id {i} is outside the vocabulary (0..{self.max_token_id})")
        return list(ids)

    # ------------------------------------------------------------------------------------- batches

    def encode_batch(
        self, texts: str | Sequence[str], padding_side: str = "left", add_special_tokens: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode and pad several texts into `(input_ids, attention_mask)`, both int64 of shape (B, S).

        Padding goes on the left by default, so every prompt ends at the last column and generation
        appends new tokens right after each one. The mask is 1 on real tokens, 0 on padding. Padding
        uses `pad_token_id`, or `eos_token_id` when the tokenizer has no pad token. A single string
        is a batch of one.
        """
        if padding_side not in ("left", "right"):
            raise TokenizerError(f"padding_side: expected 'left' or 'right', got {padding_side!r}")
        texts = [texts] if isinstance(texts, str) else _check_texts(texts, "encode_batch")
        if not texts:
            raise TokenizerError("encode_batch: got an empty list of texts; need at least one")
        pad_id = self.pad_token_id if self.pad_token_id is not None else self.eos_token_id
        if pad_id is None:
            raise TokenizerError(f"{self.source}: cannot pad a batch: the tokenizer has neither a pad nor an eos token")

        rows = self.encode(texts, add_special_tokens=add_special_tokens)
        width = max(len(row) for row in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, row in enumerate(rows):
            span = slice(width - len(row), width) if padding_side == "left" else slice(0, len(row))
            input_ids[b, span] = torch.tensor(row, dtype=torch.long)
            attention_mask[b, span] = 1
        return input_ids, attention_mask

    __call__ = encode_batch

    # ------------------------------------------------------------------------------- model checks

    def check_model_vocab(self, model_vocab_size: int) -> None:
        """Raise if some token id would index past a model's embedding table of `model_vocab_size` rows.

        A larger table is fine (FlexOlmo pads dolma2's 100278 ids to 100352 rows); a smaller one
        means the tokenizer belongs to another model.
        """
        needed = self.max_token_id + 1
        if needed > model_vocab_size:
            raise TokenizerError(
                f"{self.source}: the tokenizer needs {needed} embedding rows (ids 0..{self.max_token_id}) "
                f"but the model's vocab_size is {model_vocab_size}; this tokenizer does not belong to this model")

    # ------------------------------------------------------------------------------------- saving

    def save(self, directory: str | os.PathLike) -> str:
        """Write `tokenizer.json`, `tokenizer_config.json` and `chat_template.jinja` into `directory`.

        `load_tokenizer` and transformers' `AutoTokenizer` both load the result. The config names
        `PreTrainedTokenizerFast`, so transformers runs `tokenizer.json` as-is: with "GPT2Tokenizer"
        transformers 5 swaps in GPT-2's pre-tokenizer regex, which splits code into other ids.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                  "eos_token": self.eos_token, "pad_token": self.pad_token, "bos_token": self.bos_token}
        if self.model_max_length is not None:
            config["model_max_length"] = self.model_max_length
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        template_file = directory / "chat_template.jinja"
        if self.chat_template is not None:
            template_file.write_text(self.chat_template, encoding="utf-8")
        elif template_file.exists():  # a stale template from an earlier save would be loaded back
            template_file.unlink()
        return str(directory)

    # ------------------------------------------------------------------------------ chat template

    def apply_chat_template(
        self,
        messages: Sequence[Mapping],
        /,
        add_generation_prompt: bool = False,
        tokenize: bool = False,
        **variables,
    ) -> str | list[int]:
        """Render a conversation with the checkpoint's chat template: the text, or its ids if `tokenize`.

        `messages` is a list of `{"role": ..., "content": ...}` dicts. The template sees `messages`,
        `add_generation_prompt`, `bos_token`, `eos_token`, `pad_token` and any extra `variables`
        (e.g. `tools=[...]`; they may not reuse those names or the environment's globals), and may call
        `raise_exception(msg)`. It runs in a bounded Jinja sandbox (`olmo_lab.chat_template`) with the
        same settings as transformers, so the text matches what the model was trained on while the
        template cannot reach Python internals, run unboundedly or build huge strings.
        """
        if self.chat_template is None:
            raise TokenizerError(f"{self.source}: this tokenizer has no chat template "
                                 "(no chat_template.jinja and no 'chat_template' in tokenizer_config.json)")
        if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
            raise TokenizerError(f"messages: expected a list of dicts, got {type(messages).__name__}")
        for position, message in enumerate(messages):
            if not isinstance(message, Mapping):
                raise TokenizerError(f"messages[{position}]: expected a dict with 'role' and 'content', "
                                     f"got {type(message).__name__}")

        given = dict(messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt,
                     bos_token=self.bos_token or "", eos_token=self.eos_token or "", pad_token=self.pad_token or "")
        taken = sorted(set(variables) & (set(given) | set(chat_environment().globals)))
        if taken:
            raise TokenizerError(f"apply_chat_template: variable(s) {', '.join(map(repr, taken))} would hide the "
                                 f"name(s) the template is given; rename them")
        text = render_chat_template(self.chat_template, self.source, **given, **variables)
        return self.encode(text) if tokenize else text


def _check_texts(texts: object, where: str) -> list[str]:
    """`texts` as a list of strings, or a TokenizerError naming what is wrong with it."""
    if texts is None or isinstance(texts, (bytes, bytearray)) or not isinstance(texts, Sequence):
        raise TokenizerError(f"{where}: expected a str or a list of str, got {type(texts).__name__}")
    for position, text in enumerate(texts):
        if not isinstance(text, str):
            raise TokenizerError(f"{where}: item {position} is {type(text).__name__}, expected str")
        _unicode(text, f"{where}: item {position}")
    return list(texts)


def _unicode(text: str, where: str) -> str:
    """`text`, if it is valid Unicode (a lone surrogate such as '\\ud800' cannot be encoded as UTF-8)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise TokenizerError(f"{where}: the text has a lone surrogate {text[e.start]!r} at position {e.start}, "
                             f"which is not valid Unicode") from None
    return text


# ------------------------------------------------------------------------------------------ loading


def load_tokenizer(path_or_repo_id: str | os.PathLike, *, revision: str | None = None) -> Tokenizer:
    """Load a tokenizer from a checkpoint directory, a `tokenizer.json` file, or a hub repo id.

    A directory must hold `tokenizer.json`; `tokenizer_config.json`, `special_tokens_map.json`,
    `chat_template.jinja` and `generation_config.json` next to it are used when present. A string
    that is not an existing path is taken as a hub repo id (e.g. "allenai/dolma2-tokenizer"): only
    the tokenizer files are fetched, at `revision`, or read from the local hub cache when
    `HF_HUB_OFFLINE` is set.
    """
    if not isinstance(path_or_repo_id, (str, os.PathLike)) or "\0" in str(path_or_repo_id):
        raise TokenizerError(f"tokenizer: expected a file, a directory or a hub repo id (a str or path), got "
                             f"{path_or_repo_id!r:.100}")
    path = Path(path_or_repo_id).expanduser()
    if revision is not None and path.is_dir():  # a local checkpoint's revisions/<name>/
        try:
            path = Path(revisions.local_revision(str(path), revision))
        except CheckpointError as e:
            raise TokenizerError(str(e)) from None
    elif revision is not None and path.exists():
        raise TokenizerError(f"revision: {revision!r} names a version of a checkpoint, but {path} is a file")
    if path.is_file():
        return _load_files(path, path.parent if path.name == "tokenizer.json" else None)
    if path.is_dir():
        return _load_files(path / "tokenizer.json", path)
    if hub.looks_like_repo_id(str(path_or_repo_id)):
        return _load_files(*_from_hub(str(path_or_repo_id), revision))
    raise TokenizerError(f"{path_or_repo_id}: no such file or directory (and not a hub repo id like 'owner/name')")


def check_fits(tokenizer: Tokenizer, vocab_size: int) -> None:
    """Raise `TokenizerError` if `tokenizer` has ids past a model's `vocab_size` embedding rows."""
    tokenizer.check_model_vocab(vocab_size)


def _from_hub(repo_id: str, revision: str | None) -> tuple[Path, Path]:
    """Download (or find in the local hub cache) the tokenizer files of `repo_id`."""
    snap = hub.snapshot(repo_id, revision, TOKENIZER_FILES, "tokenizer")
    return snap / "tokenizer.json", snap


def _load_files(tokenizer_json: Path, directory: Path | None) -> Tokenizer:
    """Build a Tokenizer from `tokenizer_json` and, if `directory` is given, the config files in it."""
    if not tokenizer_json.is_file():
        raise TokenizerError(f"{tokenizer_json}: tokenizer.json is missing")
    try:
        backend = tokenizers.Tokenizer.from_file(str(tokenizer_json))
    except Exception as err:  # noqa: BLE001 -- the Rust side raises a bare Exception for any bad file
        raise TokenizerError(f"{tokenizer_json}: not a valid tokenizer.json ({_first_line(err)})") from None

    config, specials, generation, chat_template = {}, {}, {}, None
    if directory is not None:
        config = _read_json(directory / "tokenizer_config.json")
        # special_tokens_map.json overrides tokenizer_config.json, as in transformers.
        specials = {**config, **_read_json(directory / "special_tokens_map.json")}
        generation = _read_json(directory / "generation_config.json")
        chat_template = _chat_template(config, directory / "chat_template.jinja")

    max_length = config.get("model_max_length")
    model_max_length = int(max_length) if isinstance(max_length, (int, float)) and 0 < max_length < _NO_MAX_LENGTH \
        else None
    # Tokens the configs do not mention (a bare tokenizer.json) fall back to the dolma2 / GPT-style
    # names when the vocabulary has them; an explicit null means "none".
    eos_default = "<|endoftext|>" if backend.token_to_id("<|endoftext|>") is not None else None
    pad_default = "<|pad|>" if backend.token_to_id("<|pad|>") is not None else None
    return Tokenizer(
        backend,
        eos_token=_token_content(specials.get("eos_token", eos_default), "eos_token", directory),
        pad_token=_token_content(specials.get("pad_token", pad_default), "pad_token", directory),
        bos_token=_token_content(specials.get("bos_token"), "bos_token", directory),
        chat_template=chat_template,
        model_max_length=model_max_length,
        stop_token_ids=_ids(generation.get("eos_token_id")),
        source=str(directory if directory is not None else tokenizer_json),
    )


def _chat_template(config: dict, jinja_file: Path) -> str | None:
    """The chat template: `chat_template.jinja` (the transformers 5 form) or tokenizer_config.json's entry."""
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # the named-templates form: [{"name": "default", "template": ...}, ...]
        template = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}.get("default")
    return template if isinstance(template, str) else None


def _read_json(path: Path) -> dict:
    """The JSON object in `path`, or {} when the file does not exist."""
    if not path.is_file():
        return {}
    data = read_json(path, str(path), TokenizerError)
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_content(value: object, role: str, directory: Path | None) -> str | None:
    """A special token written as a string or as transformers' `{"content": ...}` AddedToken dict."""
    if isinstance(value, Mapping):
        value = value.get("content")
    if value is None or isinstance(value, str):
        return value
    raise TokenizerError(f"{directory}: {role} must be a string or {{'content': ...}}, got {value!r}")


def _ids(value: object) -> list[int]:
    """generation_config.json's `eos_token_id`, which may be one id or a list of ids."""
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**63]


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
