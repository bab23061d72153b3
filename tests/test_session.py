"""`olmo_lab.Lab`: a model with its tokenizer; each method gives what the library function it hands over to gives."""

import pytest
import torch

import olmo_lab


@pytest.fixture(scope="module")
def flex():
    path = olmo_lab.lab_model("flexolmo-lab")
    return olmo_lab.Lab("flexolmo-lab"), olmo_lab.load_model(path), olmo_lab.load_tokenizer(path)


def test_the_default_is_the_dense_lab_model():
    lab = olmo_lab.Lab()
    assert lab.model.source == olmo_lab.lab_model("olmo3-lab") and lab.model.config.model_type == "olmo3"
    assert "Lab('olmo3-lab': olmo3" in repr(lab)


def test_generate_and_trace_equal_the_functions(flex):
    lab, model, tok = flex
    prompt = "The integral of x^2 is"
    assert lab.generate(prompt, max_new_tokens=8) == olmo_lab.generate(model, tok, prompt, max_new_tokens=8)
    assert "".join(lab.generate(prompt, max_new_tokens=8, stream=True)) == lab.generate(prompt, max_new_tokens=8)
    with lab.trace(attention=False) as ours:
        lab.generate(prompt, max_new_tokens=3)
    with olmo_lab.trace(model, attention=False, tokenizer=tok) as theirs:
        olmo_lab.generate(model, tok, prompt, max_new_tokens=3)
    assert ours.tokens == theirs.tokens
    assert all(torch.equal(ours.routing[l].probs, theirs.routing[l].probs) for l in theirs.routing)


def test_experts_are_the_models_switchboard(flex):
    lab, model, tok = flex
    assert lab.experts.names == model.experts.names
    prompt = "def add(a, b):"
    lab.experts.disable(["code"])
    try:
        with olmo_lab.experts_off(model, ["code"]):
            assert lab.generate(prompt, max_new_tokens=6) == olmo_lab.generate(model, tok, prompt, max_new_tokens=6)
        assert lab.experts.enabled() == [n for n in model.experts.names if n != "code"]
    finally:
        lab.experts.enable(["code"])


def test_dtype_device_and_a_separate_tokenizer():
    lab = olmo_lab.Lab("olmo3-lab", dtype="float32", device="cpu", tokenizer=olmo_lab.lab_model("flexolmo-lab"))
    assert lab.model.dtype == torch.float32 and lab.model.device == torch.device("cpu")
    assert lab.tokenizer.source == olmo_lab.lab_model("flexolmo-lab")


def test_a_dense_model_has_no_experts():
    with pytest.raises(olmo_lab.ExpertError, match="dense olmo3 model"):
        olmo_lab.Lab().experts
