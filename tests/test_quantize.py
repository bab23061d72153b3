"""Weight-only int8 / int4 quantization while loading: against transformers + torchao, bf16, the lab model's
routing, peak memory, every expert covered, every other feature on a quantized model, and bad input."""

import json
import subprocess
import sys

import pytest
import torch
import transformers

import olmo_lab
from olmo_lab.lens import direct_logit_attribution
from olmo_lab.patching import attribution_patch
from olmo_lab.lab import samples
from olmo_lab.quantized import QuantizedLinear
from oracle import flex_config, load_hf, make_checkpoint, max_diff, olmo3_config


DIMS = dict(hidden_size=64, intermediate_size=128)  # every input width a multiple of int4's group of 32


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    return make_checkpoint(olmo3_config(**DIMS), tmp_path_factory.mktemp("olmo3"))


@pytest.fixture(scope="module")
def flex(tmp_path_factory):
    return make_checkpoint(flex_config(num_experts=4, top_k=2, **DIMS), tmp_path_factory.mktemp("flex"))


def _ids(seq=19, batch=2, seed=1):
    return torch.randint(3, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _dequantized_twin(path, model):
    """The unquantized model with every quantized matrix replaced by what the kernel multiplies with."""
    twin = olmo_lab.load_model(path, dtype=model.dtype)
    with torch.no_grad():
        for name in model.quantization.modules:
            twin.get_submodule(name).weight.copy_(model.get_submodule(name).dequantized())
    return twin


# ------------------------------------------------------------------------------------- against references
@pytest.mark.parametrize("dtype,tol,mean_tol", [(torch.float32, 2e-5, 2e-6), (torch.bfloat16, 0.1, 0.02)])
def test_int8_logits_match_transformers_with_torchao_int8(dense, dtype, tol, mean_tol):
    """The same scheme (Int8WeightOnlyConfig on every linear layer, lm_head included) on the same checkpoint.

    Only the kernel differs: ours (torch._weight_int8pack_mm) accumulates in fp32 and rounds once; torchao's
    rounds the product to the activation dtype, then multiplies by the scales. fp32: max 2e-5 (measured 5e-6,
    logits of size ~5, int8's own effect 0.15). bf16: max 0.1 = 3 bf16 steps at that size, mean 0.02
    (measured 0.086 and 0.014): the extra rounding per layer is what bf16 differs by.
    """
    from torchao.quantization import Int8WeightOnlyConfig
    config = transformers.TorchAoConfig(Int8WeightOnlyConfig(), modules_to_not_convert=[])
    hf = transformers.AutoModelForCausalLM.from_pretrained(dense, dtype=dtype, quantization_config=config).eval()
    ours = olmo_lab.load_model(dense, quantize="int8", dtype=dtype)
    assert type(hf.lm_head.weight).__name__ == "Int8Tensor" and ours.quantization.count("lm_head") == 1
    ids = _ids()
    with torch.no_grad():
        theirs, mine = hf(ids).logits, ours(ids).logits
    assert mine.dtype == dtype and max_diff(mine, theirs) <= tol
    assert (mine.float() - theirs.float()).abs().mean() <= mean_tol
    assert (mine.argmax(-1) == theirs.argmax(-1)).float().mean() >= 0.95


def test_int8_with_attention_biases_matches_transformers(tmp_path):
    from torchao.quantization import Int8WeightOnlyConfig
    path = make_checkpoint(olmo3_config(attention_bias=True, **DIMS), tmp_path)
    config = transformers.TorchAoConfig(Int8WeightOnlyConfig(), modules_to_not_convert=[])
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, quantization_config=config)
    ours = olmo_lab.load_model(path, quantize="int8", dtype=torch.float32)
    assert ours.model.layers[0].self_attn.q_proj.bias is not None
    with torch.no_grad():
        assert max_diff(ours(_ids()).logits, hf(_ids()).logits) <= 2e-5


def test_int4_equals_its_dequantized_weights_and_each_group_rounds_to_its_nearest_step(dense):
    """int4 (groups of 32, fp32 activations) computes what fp32 computes with the dequantized weights, up to
    rounding (1e-4 on logits of size ~5); each weight lies within half a step (group range / 15) of the original."""
    ours = olmo_lab.load_model(dense, quantize="int4", group_size=32, dtype=torch.float32)
    fp32 = olmo_lab.load_model(dense)
    with torch.no_grad():
        assert max_diff(ours(_ids()).logits, _dequantized_twin(dense, ours)(_ids()).logits) <= 1e-4
    for name in ours.quantization.modules:
        w = fp32.get_submodule(name).weight
        groups = w.view(w.shape[0], -1, 32)  # (out, in / 32, 32)
        step = (groups.amax(-1, keepdim=True) - groups.amin(-1, keepdim=True)) / 15
        error = ours.get_submodule(name).dequantized().float().view_as(groups) - groups
        assert (error.abs() <= step / 2 * 1.001 + 1e-6).all(), name
    assert ours.quantization.bytes_after < 0.2 * ours.quantization.bytes_before  # of fp32


def _lab_texts(tok, tokens=64, per_domain=2):
    return [torch.tensor([tok.encode(t)[:tokens]]) for domain in samples().values() for t in domain["texts"][:per_domain]]


def test_int4_and_int8_next_token_distributions_stay_close_to_bf16_on_olmo3_lab():
    """Trained weights (random ones overstate the error). Tolerances, with what was measured over 10 samples x
    64 tokens: relative logit error int8 <= 0.02 (0.007), int4 <= 0.12 (0.076); top-1 next-token agreement
    int8 >= 0.98 (0.995), int4 >= 0.8 (0.86); KL(bf16 || quantized) per token int8 <= 0.002 (0.0002),
    int4 <= 0.04 (0.019)."""
    path = olmo_lab.lab_model("olmo3-lab")
    ids, ref = _lab_texts(olmo_lab.load_tokenizer(path)), olmo_lab.load_model(path, dtype=torch.bfloat16)
    bounds = {"int8": (0.02, 0.98, 0.002), "int4": (0.12, 0.8, 0.04)}
    for scheme, (rel_max, top1_min, kl_max) in bounds.items():
        model = olmo_lab.load_model(path, quantize=scheme)
        rel, top1, kl = [], [], []
        for x in ids:
            with torch.no_grad():
                a, b = ref(x).logits[0].float(), model(x).logits[0].float()
            rel.append((a - b).norm() / a.norm())
            top1.append((a.argmax(-1) == b.argmax(-1)).float().mean())
            kl.append(torch.nn.functional.kl_div(b.log_softmax(-1), a.log_softmax(-1), log_target=True,
                                                 reduction="batchmean"))
        rel, top1, kl = (float(torch.stack(v).mean()) for v in (rel, top1, kl))
        print(f"olmo3-lab {scheme}: relative logit error {rel:.3f}, top-1 agreement {top1:.3f}, KL {kl:.4f}")
        assert rel <= rel_max and top1 >= top1_min and kl <= kl_max, (scheme, rel, top1, kl)


def test_routing_of_the_lab_model_stays_with_a_full_precision_router():
    """Top-1 expert agreement with the bf16 flexolmo-lab over its held-out samples: >= 95% for int8 and int4
    (measured over 10 samples x 100 tokens: int8 99.5%, int4 96.4%)."""
    path = olmo_lab.lab_model("flexolmo-lab")
    tok = olmo_lab.load_tokenizer(path)
    ids, ref = _lab_texts(tok), olmo_lab.load_model(path, dtype=torch.bfloat16)

    def top1(model):
        out = []
        for x in ids:
            with olmo_lab.trace(model, attention=False, routing=True) as tr, torch.no_grad():
                model(x)
            out.append(torch.stack([tr.routing[layer].topk_indices[:, 0] for layer in tr.routing]))
        return torch.cat(out, 1)  # (layers, tokens)
    expected = top1(ref)
    for scheme in ("int8", "int4"):
        model = olmo_lab.load_model(path, quantize=scheme)
        assert model.quantization.kept[-1].endswith("mlp.gate")  # routers stay in bf16
        agreement = (top1(model) == expected).float().mean().item()
        print(f"{scheme}: top-1 routing agreement with bf16 {agreement:.3f}")
        assert agreement >= 0.95, (scheme, agreement)


# ------------------------------------------------------------------------------------- what is quantized
def test_every_expert_of_every_layer_is_quantized_and_counted(flex):
    model = olmo_lab.load_model(flex, quantize="int8", dtype=torch.float32)
    plain = olmo_lab.load_model(flex)
    q, cfg = model.quantization, model.config
    assert q.count("experts") == cfg.num_hidden_layers * cfg.num_experts * 3
    assert q.count("attention") == cfg.num_hidden_layers * 4 and q.count("lm_head") == 1 and q.count("mlp") == 0
    assert len(q.modules) == len(set(q.modules)) == q.count("experts") + q.count("attention") + 1
    for block, ref in zip(model.model.layers, plain.model.layers):
        assert type(block.mlp.gate) is torch.nn.Linear and torch.equal(block.mlp.gate.weight, ref.mlp.gate.weight)
        for expert, expert_ref in zip(block.mlp.experts, ref.mlp.experts):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                layer, w = getattr(expert, proj), getattr(expert_ref, proj).weight
                assert isinstance(layer, QuantizedLinear)
                step = w.abs().amax(dim=1, keepdim=True) / 127  # one int8 step per output row
                assert ((layer.dequantized() - w).abs() <= step / 2 + 1e-6).all()
    assert q.bytes_before == sum(p.numel() * 4 for n, p in plain.named_parameters()
                                 if any(n.startswith(m + ".") for m in q.modules))
    assert q.bytes_after < 0.3 * q.bytes_before and "experts 24" in str(q)
    assert torch.equal(model.model.embed_tokens.weight, plain.model.embed_tokens.weight)


PROBE = r"""
import json, sys, torch, olmo_lab
from olmo_lab.quantized import QuantizedLinear
def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
olmo_lab.load_model(sys.argv[2], quantize="int8")  # warm up torch's and torchao's code paths on a tiny model
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
before = rss("VmRSS:")
model = olmo_lab.load_model(sys.argv[1], quantize="int8")
q = model.quantization
kept = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if not isinstance(
    model.get_submodule(n.rpartition(".")[0]), QuantizedLinear))
print(json.dumps({"peak": rss("VmHWM:") - before, "quantized": q.bytes_after + kept, "bf16": q.bytes_before + kept}))
"""


def test_peak_memory_while_loading_is_the_quantized_model_plus_about_one_layer(tmp_path, dense):
    """A 10-layer bf16 checkpoint of ~87 MB: loading int8 peaks at the int8 model plus about one bf16 layer."""
    config = olmo_lab.OlmoConfig(model_type="olmo3", vocab_size=1024, hidden_size=512, intermediate_size=2048,
                                 num_hidden_layers=10, num_attention_heads=8, num_key_value_heads=8,
                                 max_position_embeddings=128)
    torch.manual_seed(0)
    olmo_lab.save_model(olmo_lab.OlmoModel(config).to(torch.bfloat16), tmp_path)
    out = json.loads(subprocess.run([sys.executable, "-c", PROBE, str(tmp_path), str(dense)], capture_output=True,
                                    text=True, check=True).stdout.strip().splitlines()[-1])
    layer = (4 * 512 * 512 + 3 * 512 * 2048) * 2  # 8.4 MB in bf16
    assert out["peak"] <= out["quantized"] + layer + 16 * 2**20, out  # 16 MiB of slack: torchao's temporaries
    assert out["peak"] < 0.8 * out["bf16"], out  # never the whole model in bf16
    print(out)


# ------------------------------------------------------------------------------------- everything else works
def test_expert_subset_and_opt_out_are_exact_on_the_quantized_model(flex):
    full = olmo_lab.load_model(flex, quantize="int4", group_size=32)
    subset = olmo_lab.load_model(flex, quantize="int4", group_size=32, experts=[0, 2])
    assert subset.quantization.count("experts") == 2 * 2 * 3
    ids = _ids()
    with torch.no_grad(), olmo_lab.experts_off(full, [1, 3]):
        off = full(ids).logits
    with torch.no_grad():
        assert torch.equal(subset(ids).logits, off)
        assert not torch.equal(full(ids).logits, off)


def test_trace_interventions_and_generate_on_a_quantized_model(flex):
    model = olmo_lab.load_model(flex, quantize="int8")
    ids = _ids(batch=1)
    with torch.no_grad():
        plain = model(ids).logits
        with olmo_lab.trace(model, attention=True, routing=True, residual=True) as tr:
            traced = model(ids).logits
        assert torch.equal(traced, plain) and tr.attention[0].shape[-1] == ids.shape[1] and len(tr.routing) == 2
        name = "model.layers.1.mlp.hook_out"
        with olmo_lab.intervene(model, {name: olmo_lab.interventions.Zero()}):
            zeroed = model(ids).logits
        assert not torch.equal(zeroed, plain) and torch.equal(model(ids).logits, plain)
    tokens = olmo_lab.generate(model, None, ids[0].tolist(), max_new_tokens=6, eos_token_id=[])
    seq = ids[0].tolist()
    for _ in range(6):  # greedy, by full forward passes: the cached decode gives the same tokens
        with torch.no_grad():
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    assert tokens == seq[ids.shape[1]:]


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_direct_logit_attribution_sums_to_the_logit_with_a_quantized_lm_head(flex, scheme):
    model = olmo_lab.load_model(flex, quantize=scheme, dtype=torch.float32, group_size=32 if scheme == "int4" else None)
    head = model.lm_head
    assert torch.equal(torch.stack([head.weight_row(t) for t in (0, 5, 127)]), head.dequantized()[[0, 5, 127]])
    ids = _ids(batch=1)
    with olmo_lab.trace(model, attention=False, residual=True) as tr, torch.no_grad():
        logits = model(ids).logits
    token = int(logits[0, -1].argmax())
    att = direct_logit_attribution(model, tr, token)
    assert abs(att.logit - logits[0, -1, token].item()) <= 1e-5 and abs(att.total - att.logit) <= 1e-4


def _metric(logits):
    return logits[0, -1, 5] - logits[0, -1, 7]


def test_attribution_patching_gradients_flow_through_quantized_layers(dense):
    model = olmo_lab.load_model(dense, quantize="int8", dtype=torch.float32)
    twin = _dequantized_twin(dense, model)
    clean, corrupt = _ids(8, 1), _ids(8, 1, seed=6)
    ours, ref = attribution_patch(model, clean, corrupt, _metric), attribution_patch(twin, clean, corrupt, _metric)
    assert (ours.scores - ref.scores).abs().max() <= 1e-3 * max(1.0, ref.scores.abs().max())
    assert ours.scores.abs().max() > 0


def test_save_and_dtype_changes_are_refused_and_change_nothing(dense, tmp_path):
    model = olmo_lab.load_model(dense, quantize="int8")
    with pytest.raises(olmo_lab.QuantizationError, match="quantized"):
        olmo_lab.save_model(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    before = {k: v.clone() for k, v in model.model.state_dict().items() if type(v) is torch.Tensor}
    for convert in (lambda m: m.to(torch.float32), lambda m: m.float(), lambda m: m.to("meta")):
        with pytest.raises(olmo_lab.QuantizationError, match="load it again"):
            convert(model)
    after = {k: v for k, v in model.model.state_dict().items() if type(v) is torch.Tensor}
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert model.to("cpu") is model and model.dtype == torch.bfloat16


# ------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs,match", [
    (dict(quantize="int3"), "unknown scheme"),
    (dict(quantize="INT8"), "unknown scheme"),
    (dict(quantize=8), "unknown scheme"),
    (dict(quantize="int4", group_size=100), "group_size"),
    (dict(quantize="int4", group_size=True), "group_size"),
    (dict(quantize="int4", group_size=128), "does not divide the 64 input columns"),  # nothing fits: hidden 64
    (dict(quantize="int8", group_size=32), "int8 has one scale per output row"),
    (dict(group_size=32), "without quantize"),
    (dict(quantize="int8", dtype=torch.float16), "bfloat16"),
])
def test_bad_quantization_arguments_fail_before_anything_is_read(dense, monkeypatch, kwargs, match):
    from olmo_lab.safetensors_file import SafetensorsFile
    reads = []
    monkeypatch.setattr(SafetensorsFile, "read", lambda self, *a: reads.append(a))
    with pytest.raises(olmo_lab.QuantizationError, match=match):
        olmo_lab.load_model(dense, **kwargs)
    assert reads == []


@pytest.mark.parametrize("device,scheme,dtype,match", [
    ("cuda", "int4", torch.float32, "tinygemm kernel, which takes bfloat16 only"),
    ("cuda", "int4", None, None),  # bfloat16 by default; then the device's compute capability is asked
    ("mps", "int8", None, "runs on 'cpu' and 'cuda' devices"),
])
def test_devices_and_dtypes_the_kernels_cannot_take_are_refused(monkeypatch, device, scheme, dtype, match):
    """The device checks themselves (no GPU needed: load_model first checks the device exists)."""
    from olmo_lab.quantized import Quantizer
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    with pytest.raises(olmo_lab.QuantizationError, match=match or "compute capability >= 8.0"):
        Quantizer.parse(scheme, None, torch.device(device), dtype)


def test_a_bad_tensor_late_in_the_load_leaves_no_quantized_layer_behind(dense, tmp_path, monkeypatch):
    import gc
    import shutil
    import weakref
    from safetensors.torch import load_file, save_file
    from olmo_lab.quantized import Quantizer
    shutil.copytree(dense, tmp_path / "ckpt")
    state = load_file(tmp_path / "ckpt" / "model.safetensors")
    state["lm_head.weight"][0, 0] = float("nan")  # lm_head comes last: every other layer is quantized by then
    save_file(state, tmp_path / "ckpt" / "model.safetensors")
    made, quantize = [], Quantizer.quantize
    monkeypatch.setattr(Quantizer, "quantize", lambda self, w: made.append(weakref.ref(quantize(self, w))) or made[-1]())
    with pytest.raises(olmo_lab.CorruptCheckpointError, match="'lm_head.weight' contains NaN") as info:
        olmo_lab.load_model(tmp_path / "ckpt", quantize="int8")
    assert len(made) == 28  # 4 layers x 7 matrices, then the NaN
    del info
    gc.collect()
    assert all(r() is None for r in made)


@pytest.mark.parametrize("blocked,message", [
    ("torchao", "refused: quantize= needs torchao, which is not installed"),
    ("torchao.prototype.quantization.int4", "refused: quantize= needs torchao 0.18 (pip install 'olmo-lab[quant]'); the installed"),
])
def test_missing_or_unusable_torchao_is_a_clear_error_and_the_library_works_without_it(dense, blocked, message):
    script = r"""
import sys, importlib.abc
class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == sys.argv[2] or name.startswith(sys.argv[2] + "."):
            raise ImportError(f"No module named {name!r}")
sys.meta_path.insert(0, Blocked())
import olmo_lab
model = olmo_lab.load_model(sys.argv[1])  # unquantized loading never needs torchao
try:
    olmo_lab.load_model(sys.argv[1], quantize="int4", group_size=32)
except olmo_lab.QuantizationError as e:
    print("refused:", e)
print("imported torchao:", "torchao" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", script, str(dense), blocked], capture_output=True, text=True,
                         check=True).stdout
    assert message in out and "olmo-lab[quant]" in out
    assert out.strip().endswith(str(blocked != "torchao"))
