"""olmo_lab.tokenizer against the real dolma2 tokenizer.json (fetched from PyPI by _dolma2.py).

All offline: hub look-ups run with HF_HUB_OFFLINE=1 and an empty cache, or with snapshot_download
replaced by a fake. transformers is used only as the oracle for chat-template rendering.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import huggingface_hub
import pytest
import torch
from _dolma2 import dolma2_tokenizer_json

from olmo_lab.errors import HubError, TokenizerError
from olmo_lab.tokenizer import TOKENIZER_FILES, Tokenizer, check_fits, load_tokenizer

CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Closer to the released OLMo templates: whitespace control, a default system prompt, eos on the last
# assistant turn, tojson and raise_exception; rendering it exercises the transformers-compatible settings.
OLMO_STYLE = """{%- if messages[0]['role'] != 'system' %}
<|im_start|>system
You are a helpful AI assistant.<|im_end|>
{% endif %}
{% for message in messages %}
    {% if message['role'] not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('unknown role ' + message['role']) }}
    {% endif %}
    <|im_start|>{{ message['role'] }}
{{ message['content'] }}{% if message.get('meta') %} {{ message['meta'] | tojson }}{% endif %}
{% if loop.last and message['role'] == 'assistant' %}{{ eos_token }}{% else %}<|im_end|>
{% endif %}
{% endfor %}
{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""
MESSAGES = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]
SPECIAL_IDS = {
    "<|extra_id_0|>": 100256, "<|endoftext|>": 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259,
    "<|fim_suffix|>": 100260, "|||PHONE_NUMBER|||": 100261, "|||EMAIL_ADDRESS|||": 100262,
    "|||IP_ADDRESS|||": 100263, "<|im_start|>": 100264, "<|im_end|>": 100265, "<|extra_id_1|>": 100266,
    "<|extra_id_10|>": 100275, "<|endofprompt|>": 100276, "<|pad|>": 100277,
}
ROUND_TRIP = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "héllo wörld — naïve café, 日本語のテキスト, emoji 🙂🚀",
    "def add(a, b):\n    return a + b  # tabs\tand  spaces\n\n",
    "  leading and trailing spaces  ",
    "<|im_start|>user\nhi<|im_end|>",
]


@pytest.fixture(scope="module")
def dolma2_json() -> Path:
    return dolma2_tokenizer_json()


@pytest.fixture(scope="module")
def tok(dolma2_json) -> Tokenizer:
    return load_tokenizer(dolma2_json)


def make_checkpoint(directory: Path, dolma2_json: Path, chat_template: str = CHATML, **config) -> Path:
    """A checkpoint-style tokenizer directory like the released OLMo ones."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(dolma2_json, directory / "tokenizer.json")
    config = {"tokenizer_class": "GPT2Tokenizer", "bos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
              "eos_token": {"__type": "AddedToken", "content": "<|endoftext|>", "special": True}, "pad_token": "<|pad|>",
              "model_max_length": 8192, "chat_template": chat_template, **config}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


# ------------------------------------------------------------------------------- the dolma2 file


def test_dolma2_sizes_and_special_tokens(tok):
    assert tok.vocab_size == len(tok) == 100278
    assert tok.max_token_id == 100277
    assert (tok.eos_token, tok.eos_token_id) == ("<|endoftext|>", 100257)
    assert (tok.pad_token, tok.pad_token_id) == ("<|pad|>", 100277)
    # A bare tokenizer.json has no BOS, chat template or length limit.
    assert tok.bos_token_id is None and tok.chat_template is None and tok.model_max_length is None
    assert tok.stop_token_ids == (100257,)
    for token, token_id in SPECIAL_IDS.items():
        assert tok.encode(token) == [token_id], token
        assert tok.token_strings([token_id]) == [token]


def test_known_ids_match_cl100k(tok):
    # dolma2 ids 0..100255 are cl100k_base ranks.
    assert tok.encode("Hello") == [9906]
    assert tok.encode(" world") == [1917]
    assert tok.encode("Hello world") == [9906, 1917]
    assert tok.encode("!") == [0]
    assert tok.encode("\n") == [198]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(isinstance(i, int) for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode(torch.tensor(ids)) == text


def test_no_bos_even_with_special_tokens(tok):
    assert tok.encode("Hello world", add_special_tokens=True) == [9906, 1917]
    assert tok.encode("") == []


def test_encode_list_and_decode_specials(tok):
    assert tok.encode(["Hello", " world", ""]) == [[9906], [1917], []]
    ids = tok.encode("<|im_start|>user")
    assert ids == [100264, 882]
    assert tok.decode(ids) == "<|im_start|>user"  # kept by default, unlike tokenizers' own decode
    assert tok.decode(ids, skip_special_tokens=True) == "user"


def test_token_strings(tok):
    assert tok.token_strings(tok.encode("Hello world")) == ["Hello", " world"]
    assert tok.token_strings(tok.encode("def f(x):\n")) == ["def", " f", "(x", "):\n"]
    # An emoji split over two byte-level tokens: neither half is valid UTF-8 on its own.
    pieces = tok.token_strings(tok.encode("🙂"))
    assert len(pieces) == 2 and all("\ufffd" in p for p in pieces)


def test_encode_batch_left_pads(tok):
    ids, mask = tok(["Hello world", "Hi", "<|im_start|>user\nHello there"])
    assert ids.dtype == mask.dtype == torch.long and ids.shape == mask.shape
    rows = tok.encode(["Hello world", "Hi", "<|im_start|>user\nHello there"])
    width = max(map(len, rows))
    assert ids.shape == (3, width)
    for b, row in enumerate(rows):
        pad = width - len(row)
        assert ids[b, :pad].tolist() == [100277] * pad
        assert ids[b, pad:].tolist() == row
        assert mask[b].tolist() == [0] * pad + [1] * len(row)

    ids, mask = tok.encode_batch(["Hello world", "Hi"], padding_side="right")
    assert ids.tolist() == [[9906, 1917], [13347, 100277]] and mask.tolist() == [[1, 1], [1, 0]]
    ids, mask = tok.encode_batch("Hello world")  # one string is a batch of one
    assert ids.tolist() == [[9906, 1917]] and mask.tolist() == [[1, 1]]


def test_padding_falls_back_to_eos(dolma2_json, tmp_path):
    directory = make_checkpoint(tmp_path / "ckpt", dolma2_json)
    (directory / "special_tokens_map.json").write_text(json.dumps({"pad_token": None}))
    tok = load_tokenizer(directory)
    assert tok.pad_token_id is None
    ids, mask = tok(["Hello world", "Hi"])
    assert ids[1].tolist() == [100257, 13347] and mask[1].tolist() == [0, 1]


def test_check_model_vocab(tok):
    tok.check_model_vocab(100278)  # OLMo 3: exactly the tokenizer
    check_fits(tok, 100352)  # FlexOlmo: padded table
    with pytest.raises(TokenizerError, match=r"100278.*50304"):
        tok.check_model_vocab(50304)
    with pytest.raises(TokenizerError, match="100277"):
        check_fits(tok, 100277)


# ------------------------------------------------------------------------- checkpoint directories


def test_checkpoint_directory_and_chat_template(dolma2_json, tmp_path):
    tok = load_tokenizer(make_checkpoint(tmp_path / "ckpt", dolma2_json))
    assert (tok.bos_token, tok.bos_token_id) == ("<|endoftext|>", 100257)
    assert tok.eos_token_id == 100257 and tok.pad_token_id == 100277 and tok.model_max_length == 8192
    assert tok.encode("Hello world") == [9906, 1917]  # a bos_token in the config still prepends nothing

    text = tok.apply_chat_template(MESSAGES, add_generation_prompt=True)
    assert text == ("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
                    "<|im_start|>assistant\n")
    ids = tok.apply_chat_template(MESSAGES[:1], add_generation_prompt=True, tokenize=True)
    assert ids == [100264, 882, 198, *tok.encode("What is 2+2?"), 100265, 198, 100264, 78191, 198]
    assert tok.decode(ids) == tok.apply_chat_template(MESSAGES[:1], add_generation_prompt=True)
    assert tok.apply_chat_template(MESSAGES[:1]) == "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"


def test_tokenizer_json_path_inside_checkpoint_uses_its_configs(dolma2_json, tmp_path):
    directory = make_checkpoint(tmp_path / "ckpt", dolma2_json)
    assert load_tokenizer(directory / "tokenizer.json").chat_template == CHATML
    assert load_tokenizer(str(directory)).chat_template == CHATML


def test_chat_template_jinja_and_generation_config(dolma2_json, tmp_path):
    directory = make_checkpoint(tmp_path / "ckpt", dolma2_json, chat_template="ignored")
    (directory / "chat_template.jinja").write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [100265, 100257]}))
    tok = load_tokenizer(directory)
    assert tok.apply_chat_template(MESSAGES) == "[What is 2+2?][4]"
    assert tok.stop_token_ids == (100257, 100265)


def test_chat_template_matches_transformers(dolma2_json, tmp_path):
    transformers = pytest.importorskip("transformers")
    directory = make_checkpoint(tmp_path / "ckpt", dolma2_json, chat_template=OLMO_STYLE)
    ours = load_tokenizer(directory)
    # Not AutoTokenizer: for tokenizer_class "GPT2Tokenizer" transformers 5 swaps in GPT-2's pre-tokenizer
    # regex, which splits code differently from the cl100k-style regex in tokenizer.json.
    theirs = transformers.PreTrainedTokenizerFast.from_pretrained(directory)
    conversations = [MESSAGES, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi",
                                                                             "meta": {"lang": "日本", "x": "<b>"}}]]
    for messages in conversations:
        for generation_prompt in (False, True):
            expected = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
            assert ours.apply_chat_template(messages, add_generation_prompt=generation_prompt) == expected
            assert ours.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True) == \
                theirs(expected, add_special_tokens=False)["input_ids"]
    for text in ROUND_TRIP:
        assert ours.encode(text) == theirs(text, add_special_tokens=False)["input_ids"]


def test_save_round_trip(dolma2_json, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok = load_tokenizer(make_checkpoint(tmp_path / "ckpt", dolma2_json))
    saved = Path(tok.save(tmp_path / "saved"))
    assert sorted(p.name for p in saved.iterdir()) == ["chat_template.jinja", "tokenizer.json", "tokenizer_config.json"]
    again = load_tokenizer(saved)
    for attribute in ("vocab_size", "eos_token_id", "pad_token_id", "bos_token_id", "chat_template", "model_max_length"):
        assert getattr(again, attribute) == getattr(tok, attribute), attribute
    theirs = transformers.AutoTokenizer.from_pretrained(saved)  # runs tokenizer.json as-is
    assert (theirs.eos_token_id, theirs.pad_token_id) == (100257, 100277)
    for text in ROUND_TRIP:
        assert theirs(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    assert theirs.apply_chat_template(MESSAGES, tokenize=False) == tok.apply_chat_template(MESSAGES)

    tok.chat_template = None
    tok.save(saved)  # no template now: the old chat_template.jinja must not be loaded back
    assert load_tokenizer(saved).chat_template is None


# ------------------------------------------------------------------------------------ chat errors


@pytest.mark.parametrize("template, fragment", [
    ("{{ ''.__class__.__mro__ }}", "unsafe"),
    ("{{ messages.__class__.__subclasses__() }}", "unsafe"),
    ("{% for m in messages %}{{ raise_exception('only user turns, got ' + m['role']) }}{% endfor %}",
     "only user turns, got user"),
    ("{% for m in messages %}", "not valid Jinja"),
    ("{{ undefined_thing.attr }}", "undefined_thing"),
])
def test_chat_template_errors(dolma2_json, tmp_path, template, fragment):
    tok = load_tokenizer(make_checkpoint(tmp_path / "ckpt", dolma2_json, chat_template=template))
    with pytest.raises(TokenizerError, match=fragment):
        tok.apply_chat_template(MESSAGES[:1])


def test_chat_template_bad_input(tok, dolma2_json, tmp_path):
    with pytest.raises(TokenizerError, match="no chat template"):
        tok.apply_chat_template(MESSAGES)
    chat = load_tokenizer(make_checkpoint(tmp_path / "ckpt", dolma2_json))
    with pytest.raises(TokenizerError, match="expected a list of dicts"):
        chat.apply_chat_template("hi")
    with pytest.raises(TokenizerError, match=r"messages\[1\]"):
        chat.apply_chat_template([MESSAGES[0], "hi"])


# ----------------------------------------------------------------------------- input/file errors


@pytest.mark.parametrize("bad, fragment", [
    (5, "got int"), (None, "got NoneType"), (b"Hello", "got bytes"), (["ok", 3], "item 1 is int"),
])
def test_encode_rejects_non_strings(tok, bad, fragment):
    with pytest.raises(TokenizerError, match=fragment):
        tok.encode(bad)


def test_encode_batch_errors(tok):
    with pytest.raises(TokenizerError, match="empty list"):
        tok.encode_batch([])
    with pytest.raises(TokenizerError, match="padding_side"):
        tok.encode_batch(["Hi"], padding_side="middle")
    with pytest.raises(TokenizerError, match="item 0 is NoneType"):
        tok([None])


@pytest.mark.parametrize("bad, fragment", [
    ([100278], "outside the vocabulary"), ([-1], "outside the vocabulary"), ([1.5], "expected an int"),
    ("Hello", "sequence of ints"), (torch.zeros(2, 2, dtype=torch.long), "1-D integer tensor"),
])
def test_decode_rejects_bad_ids(tok, bad, fragment):
    with pytest.raises(TokenizerError, match=fragment):
        tok.decode(bad)


def test_missing_and_broken_files(dolma2_json, tmp_path):
    with pytest.raises(TokenizerError, match="tokenizer.json is missing"):
        load_tokenizer(tmp_path)
    with pytest.raises(TokenizerError, match="no such file or directory"):
        load_tokenizer(tmp_path / "nowhere" / "tokenizer.json")

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(TokenizerError, match="not a valid tokenizer.json"):
        load_tokenizer(broken)
    (broken / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "NoSuchModel"}}')
    with pytest.raises(TokenizerError, match="not a valid tokenizer.json"):
        load_tokenizer(broken / "tokenizer.json")

    ckpt = make_checkpoint(tmp_path / "ckpt", dolma2_json)
    (ckpt / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="tokenizer_config.json: not valid JSON"):
        load_tokenizer(ckpt)
    (ckpt / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|no_such_token|>"}))
    with pytest.raises(TokenizerError, match="eos_token '<|no_such_token|>' is not in the vocabulary"):
        load_tokenizer(ckpt)


# ------------------------------------------------------------------------------------------- hub


def test_hub_offline_raises_hub_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    with pytest.raises(HubError, match=r"allenai/dolma2-tokenizer.*HF_HUB_OFFLINE") as info:
        load_tokenizer("allenai/dolma2-tokenizer")
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_hub_snapshot_is_used(dolma2_json, tmp_path, monkeypatch):
    snapshot = make_checkpoint(tmp_path / "snapshot", dolma2_json)
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    tok = load_tokenizer("allenai/Olmo-3-7B-Instruct", revision="main")
    assert tok.chat_template == CHATML and tok.pad_token_id == 100277
    [(repo_id, kwargs)] = calls
    assert repo_id == "allenai/Olmo-3-7B-Instruct" and kwargs["revision"] == "main"
    assert kwargs["allow_patterns"] == TOKENIZER_FILES and kwargs["local_files_only"] is True
    assert kwargs["cache_dir"] == str(tmp_path / "hub")


def test_hub_unreachable_raises_hub_error(tmp_path, monkeypatch):
    def unreachable(repo_id, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("An error happened while trying to locate the files")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(HubError, match=r"'allenai/FlexOlmo-7x7B-1T'.*unreachable.*LocalEntryNotFoundError"):
        load_tokenizer("allenai/FlexOlmo-7x7B-1T")
