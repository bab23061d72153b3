"""OLMo-core interop: checkpoints its Hugging Face exporter writes before its final fix-ups.

OLMo-core's `get_hf_config` writes `"max_position_embeddings": -1` and null pad/eos/bos ids; transformers
loads such a checkpoint (it has no context limit of its own and generates without an EOS). olmo-lab reads
a limit <= 0 as "not stated" (the family's default context, with an UnstatedContextWarning) and runs
without the ids; logits and greedy generations equal transformers' on the same files.
"""

import json

import pytest
import torch

import olmo_lab
from olmo_lab.config import OlmoConfig, UnstatedContextWarning
from oracle import flex_config, load_hf, make_checkpoint, max_diff, olmo3_config

EXPORTED = dict(max_position_embeddings=-1, pad_token_id=None, eos_token_id=None, bos_token_id=None)
DEFAULT_CONTEXT = {"olmo3": 65536, "flex_olmo": 4096}


@pytest.fixture(scope="module", params=["olmo3", "flex_olmo"])
def exported(request, tmp_path_factory):
    config = (olmo3_config if request.param == "olmo3" else flex_config)(**EXPORTED)
    directory = make_checkpoint(config, tmp_path_factory.mktemp(request.param))
    written = json.loads((directory / "config.json").read_text())
    assert {k: written[k] for k in EXPORTED} == EXPORTED  # what OLMo-core's exporter leaves in config.json
    return directory, request.param


def test_an_unstated_context_warns_and_names_the_limit(exported):
    directory, family = exported
    limit = DEFAULT_CONTEXT[family]
    with pytest.warns(UnstatedContextWarning, match=f"max_position_embeddings -1 means 'not stated'; using the "
                                                    f"{family} default context of {limit} positions"):
        model = olmo_lab.load_model(directory)
    assert model.config.max_position_embeddings == limit
    assert (model.config.pad_token_id, model.config.eos_token_id, model.config.bos_token_id) == (None, None, None)


@pytest.mark.filterwarnings("ignore::olmo_lab.config.UnstatedContextWarning")
def test_logits_and_greedy_generation_equal_transformers(exported):
    directory, _ = exported
    ours, theirs = olmo_lab.load_model(directory), load_hf(directory)
    ids = torch.randint(3, 128, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert max_diff(ours(ids).logits, theirs(input_ids=ids).logits) < 1e-5
        hf_new = theirs.generate(ids[:1], max_new_tokens=12, do_sample=False)[0, 40:].tolist()
    assert len(hf_new) == 12  # no EOS: transformers runs the full length, and so must we
    assert olmo_lab.generate(ours, None, ids[0].tolist(), max_new_tokens=12) == hf_new


@pytest.mark.parametrize("value", [0, -1])
def test_absent_ids_and_any_unstated_limit_read_the_same(value):
    base = dict(model_type="olmo3", vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                num_attention_heads=4)
    with pytest.warns(UnstatedContextWarning):
        unstated = OlmoConfig.from_dict({**base, "max_position_embeddings": value})
    assert unstated == OlmoConfig.from_dict(base)  # as if the key were absent
    assert unstated.eos_token_id is None and unstated.pad_token_id is None
