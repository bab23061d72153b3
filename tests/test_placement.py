"""Placement over devices, CPU memory and disk (issue 19): `load_model(device_map=, max_memory=, offload_folder=)`.

On CPU every place runs on the CPU, so a placed model must equal the in-memory one bit for bit: logits,
generated tokens, traces, expert toggles and interventions. Disk offload keeps the resident memory of a
load and a forward under half the weights. Bad placements raise PlacementError before anything is read,
and a failed load leaves no offloaded files and no model behind. The CUDA paths (GPU places, CPU
offload to a GPU) are the same code with other devices; a GPU machine checks them with
benchmarks/placement_gpu.py.
"""

import gc
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import olmo_lab
from olmo_lab.errors import CorruptCheckpointError, InputError, PlacementError
from olmo_lab.checkpoints.placement import parameter
from olmo_lab.interventions import Add, ForceRouting, Zero, intervene
from olmo_lab.lens import direct_logit_attribution, logit_lens
from olmo_lab.model import OlmoModel
from olmo_lab.patching import attribution_patch, patch

DENSE = dict(model_type="olmo3", vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, sliding_window=4, max_position_embeddings=64)
FLEX = dict(model_type="flex_olmo", vocab_size=128, hidden_size=32, intermediate_size=24, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
            expert_names=["public", "math", "code", "news"], max_position_embeddings=64)
CPU_AND_DISK = {"model.embed_tokens": "disk", "model.layers.0": "cpu", "model.layers.1": "disk",
                "model.layers.2": "cpu", "model.norm": "disk", "lm_head": "cpu"}


def checkpoint(spec, directory, seed=0):
    torch.manual_seed(seed)
    olmo_lab.save_model(OlmoModel(olmo_lab.OlmoConfig(**spec)), directory)
    return directory


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    return checkpoint(DENSE, tmp_path_factory.mktemp("dense"))


@pytest.fixture(scope="module")
def flex(tmp_path_factory):
    return checkpoint(FLEX, tmp_path_factory.mktemp("flex"))


def ids(S=10, B=2, seed=1):
    return torch.randint(3, 128, (B, S), generator=torch.Generator().manual_seed(seed))


def offloaded(folder):
    """The private offload folders load_model made in `folder`."""
    return sorted(p for p in os.listdir(folder) if p.startswith("olmo-lab-offload-")) if os.path.isdir(folder) else []


def live_models():
    gc.collect()
    return sum(type(o) is OlmoModel for o in gc.get_objects())


# ---------------------------------------------------------------------------------------------- equal to memory
@pytest.mark.parametrize("spec", ["dense", "flex"])
def test_an_explicit_cpu_and_disk_map_gives_the_in_memory_logits_and_tokens(spec, request, tmp_path):
    directory = request.getfixturevalue(spec)
    device_map = CPU_AND_DISK if spec == "flex" else {**CPU_AND_DISK, "model.layers.3": "disk"}
    ref = olmo_lab.load_model(directory)
    model = olmo_lab.load_model(directory, device_map=device_map, offload_folder=tmp_path / "off")
    p = model.placement
    assert p.device_map == device_map and p.main_device == torch.device("cpu") and model.device == torch.device("cpu")
    assert set(p.bytes) == {"cpu", "disk"} and sum(p.bytes.values()) == sum(
        t.numel() * 4 for t in ref.state_dict().values())
    files = os.listdir(p.offload_folder)  # one file per disk tensor, in accelerate's offload format
    assert "model.layers.1.self_attn.q_proj.weight.dat" in files and "lm_head.weight.dat" not in files
    assert model.model.layers[1].self_attn.q_proj.weight.is_meta  # on disk, not in memory
    assert not model.model.layers[0].self_attn.q_proj.weight.is_meta
    x = ids()
    assert torch.equal(model(x).logits, ref(x).logits)
    assert olmo_lab.generate(model, None, x, max_new_tokens=6) == olmo_lab.generate(ref, None, x, max_new_tokens=6)
    folder = p.offload_folder
    del model, p
    gc.collect()
    assert not os.path.exists(folder)  # the offloaded weights go with the model


def test_auto_spreads_over_cpu_and_disk_within_max_memory(flex, tmp_path):
    ref = olmo_lab.load_model(flex)
    block = sum(p.numel() * 4 for p in ref.model.layers[0].parameters())
    model = olmo_lab.load_model(flex, device_map="auto", max_memory={"cpu": 3 * block}, offload_folder=tmp_path)
    places = model.placement.device_map
    assert set(places.values()) == {"cpu", "disk"}, places
    assert model.placement.bytes["cpu"] <= 3 * block
    x = ids()
    assert torch.equal(model(x).logits, ref(x).logits)
    everything = olmo_lab.load_model(flex, device_map="auto", max_memory={"cpu": "1GiB"})  # room for all of it
    assert set(everything.placement.device_map.values()) == {"cpu"} and everything.placement.offload_folder is None
    assert torch.equal(everything(x).logits, ref(x).logits)


def test_one_place_for_everything_including_disk(dense, tmp_path):
    ref = olmo_lab.load_model(dense, dtype=torch.bfloat16)
    model = olmo_lab.load_model(dense, dtype=torch.bfloat16, device_map={"": "disk"}, offload_folder=tmp_path)
    assert model.placement.bytes == {"disk": sum(t.numel() * 2 for t in ref.state_dict().values())}
    assert model.dtype == torch.bfloat16 and all(p.is_meta for p in model.parameters())
    x = ids()
    assert torch.equal(model(x).logits, ref(x).logits)


def test_tied_embeddings_share_one_place(tmp_path):
    directory = checkpoint({**DENSE, "num_hidden_layers": 2, "tie_word_embeddings": True}, tmp_path / "tied")
    ref, x = olmo_lab.load_model(directory), ids()
    block = sum(p.numel() * 4 for p in ref.model.layers[0].parameters())
    for device_map, memory in [({"model": "disk", "lm_head": "disk"}, None), ("auto", {"cpu": 2 * block})]:
        model = olmo_lab.load_model(directory, device_map=device_map, max_memory=memory, offload_folder=tmp_path)
        assert "disk" in model.placement.device_map.values()
        assert torch.equal(model(x).logits, ref(x).logits)
    with pytest.raises(PlacementError, match="lm_head shares its weight with model.embed_tokens"):
        olmo_lab.load_model(directory, device_map={"model": "disk", "lm_head": "cpu"}, offload_folder=tmp_path / "off")
    assert not os.path.exists(tmp_path / "off")


def test_an_expert_subset_can_be_placed(flex, tmp_path):
    ref = olmo_lab.load_model(flex, experts=["code", "public"])
    model = olmo_lab.load_model(flex, experts=["code", "public"], device_map=CPU_AND_DISK, offload_folder=tmp_path)
    assert model.config.expert_names == ref.config.expert_names == ["public", "code"]
    x = ids()
    assert torch.equal(model(x).logits, ref(x).logits)


def test_a_lab_passes_its_placement_on(tmp_path):
    lab = olmo_lab.Lab("olmo3-lab", device_map={"model": "disk", "lm_head": "cpu"}, offload_folder=tmp_path)
    ref = olmo_lab.Lab("olmo3-lab")
    assert lab.model.placement.bytes["disk"] > 0
    assert lab.generate("The king said", max_new_tokens=8) == ref.generate("The king said", max_new_tokens=8)


def test_saving_an_offloaded_model_is_refused(dense, tmp_path):
    model = olmo_lab.load_model(dense, device_map={"": "disk"}, offload_folder=tmp_path / "off")
    with pytest.raises(InputError, match="offloaded"):
        olmo_lab.save_model(model, tmp_path / "saved")
    assert not os.path.exists(tmp_path / "saved")


# ---------------------------------------------------------------------------------------------- features
def test_trace_toggles_and_interventions_on_an_offloaded_model_equal_the_in_memory_ones(flex, tmp_path):
    ref = olmo_lab.load_model(flex)
    model = olmo_lab.load_model(flex, device_map=CPU_AND_DISK, offload_folder=tmp_path)
    x = ids()
    traces = []
    for m in (ref, model):
        with olmo_lab.trace(m, attention=True, routing=True, residual=True) as tr:
            olmo_lab.generate(m, None, x, max_new_tokens=4)
        traces.append(tr)
    a, b = traces
    for layer in range(FLEX["num_hidden_layers"]):
        assert b.attention[layer].device.type == "cpu" and torch.equal(a.attention[layer], b.attention[layer])
        assert torch.equal(a.routing[layer].probs, b.routing[layer].probs)
        assert torch.equal(a.routing[layer].topk_indices, b.routing[layer].topk_indices)
        assert torch.equal(a.block(layer, "resid_post"), b.block(layer, "resid_post"))
    for mode in ("opt_out", "drop"):
        with olmo_lab.experts_off(ref, ["math"], mode=mode), olmo_lab.experts_off(model, ["math"], mode=mode):
            assert torch.equal(model(x).logits, ref(x).logits)
            assert olmo_lab.generate(model, None, x, max_new_tokens=4) == olmo_lab.generate(ref, None, x,
                                                                                           max_new_tokens=4)
    direction = torch.randn(FLEX["hidden_size"], generator=torch.Generator().manual_seed(2))
    edits = {"model.layers.0.self_attn.hook_z": Zero(heads=[1]), "model.layers.1.hook_resid_post": Add(direction),
             "model.layers.2.mlp.hook_routing": ForceRouting(["code"], positions=[-1])}
    outs = []
    for m in (ref, model):
        with intervene(m, edits):
            outs.append((m(x).logits, olmo_lab.generate(m, None, x, max_new_tokens=4)))
    assert torch.equal(outs[0][0], outs[1][0]) and outs[0][1] == outs[1][1]
    assert not torch.equal(outs[1][0], ref(x).logits)  # the edits did something


def test_patching_an_offloaded_model_equals_patching_the_in_memory_one(flex, tmp_path):
    ref = olmo_lab.load_model(flex)
    model = olmo_lab.load_model(flex, device_map=CPU_AND_DISK, offload_folder=tmp_path)
    clean, corrupt = ids(8, 1, seed=3), ids(8, 1, seed=4)

    def metric(logits):
        return logits[0, -1, 5] - logits[0, -1, 7]

    for site in ("resid_pre", "heads", "experts"):
        a, b = (patch(m, clean, corrupt, metric, site=site, progress=False) for m in (ref, model))
        assert torch.equal(a.scores, b.scores)
    a, b = (attribution_patch(m, clean, corrupt, metric) for m in (ref, model))  # a backward through offloaded blocks
    assert torch.equal(a.scores, b.scores) and a.scores.abs().sum() > 0


def test_direct_logit_attribution_and_the_logit_lens_read_offloaded_weights(flex, tmp_path):
    ref = olmo_lab.load_model(flex)
    model = olmo_lab.load_model(flex, device_map={"model": "disk", "lm_head": "disk"}, offload_folder=tmp_path)
    views = []
    for m in (ref, model):
        with olmo_lab.trace(m, residual=True, routing=True) as tr:
            m(ids(8, 1))
        views.append((direct_logit_attribution(m, tr, 5), logit_lens(m, tr)))
    assert views[0] == views[1]
    assert parameter(model, "lm_head.weight").device.type == "cpu" and model.lm_head.weight.is_meta


# ---------------------------------------------------------------------------------------------- memory
PROBE = r"""
import json, sys, torch, olmo_lab, accelerate.big_modeling, accelerate.hooks, accelerate.utils
from safetensors.torch import save_file
def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
directory, folder, out, threads = sys.argv[1:5]
torch.set_num_threads(int(threads))
tiny = olmo_lab.OlmoModel(olmo_lab.OlmoConfig(model_type="olmo3", vocab_size=64, hidden_size=32, intermediate_size=32,
                                              num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=32))
tiny(torch.zeros(2, 12, dtype=torch.long))  # warm up: page in torch's code paths so only the load is measured
with torch.device("meta"):
    olmo_lab.OlmoModel(olmo_lab.OlmoConfig.from_json(directory))
ids = torch.randint(3, 1024, (2, 12), generator=torch.Generator().manual_seed(1))
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
before = rss("VmRSS:")
model = olmo_lab.load_model(directory, device_map="auto", max_memory=json.loads(sys.argv[5]), offload_folder=folder)
logits = model(ids).logits
peak = rss("VmHWM:") - before
save_file({"logits": logits}, out)
print(json.dumps({"peak": peak, "bytes": model.placement.bytes, "map": model.placement.device_map}))
"""


BIG = {"dense": dict(model_type="olmo3", vocab_size=1024, hidden_size=256, intermediate_size=1024, num_hidden_layers=8,
                     num_attention_heads=4, max_position_embeddings=64),
       "flex": dict(model_type="flex_olmo", vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=6,
                    num_attention_heads=4, num_experts=4, num_experts_per_tok=2, max_position_embeddings=64)}


@pytest.mark.parametrize("family", ["dense", "flex"])
def test_disk_offload_peaks_under_half_the_weights_and_gives_the_in_memory_logits(family, tmp_path):
    """~35 MB of fp32 weights, ~1/4 of them in CPU memory: a load plus a forward stay under half the weights."""
    spec, budget = BIG[family], {"dense": 8 * 2**20, "flex": 10 * 2**20}[family]  # CPU memory: ~1/4 of the weights
    directory = checkpoint(spec, tmp_path / "ckpt")
    weights = os.path.getsize(directory / "model.safetensors")
    out = tmp_path / "logits.safetensors"
    run = subprocess.run([sys.executable, "-c", PROBE, str(directory), str(tmp_path / "off"), str(out),
                          str(torch.get_num_threads()), json.dumps({"cpu": budget})], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert "disk" in result["map"].values() and result["bytes"]["disk"] > 0.7 * weights, result
    assert result["peak"] <= 0.5 * weights, (result, weights)
    ref = olmo_lab.load_model(directory)
    x = torch.randint(3, 1024, (2, 12), generator=torch.Generator().manual_seed(1))
    assert torch.equal(load_file(out)["logits"], ref(x).logits)
    assert offloaded(tmp_path / "off") == []  # the process ended: its offloaded weights are gone


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs,match", [
    (dict(device_map={"model.layer.0": "cpu"}), r"no module 'model.layer.0'; did you mean 'model.layers.0'"),
    (dict(device_map={"model.layers.0.mlp": "cpu", "": "cpu"}), r"part of the decoder block 'model.layers.0'"),
    (dict(device_map={"model": "cpu", "model.layers.1": "disk"}), r"'model.layers.1' lies inside 'model'"),
    (dict(device_map={"model": "cpu"}), r"no place for 1 module\(s\): lm_head"),
    (dict(device_map={"": "cuda:3"}), r"device_map\[''\]: .*cuda"),
    (dict(device_map={"": "tpu"}), r"device_map\[''\]"),
    (dict(device_map={"": -1}), r"negative"),
    (dict(device_map={}), r"empty"),
    (dict(device_map="balanced"), r"expected 'auto'"),
    (dict(device_map={"": "disk"}), r"give offload_folder="),
    (dict(device_map="auto", max_memory={"cpu": 100_000}), r"on disk .*: give offload_folder=.*or more max_memory"),
    (dict(device_map="auto", max_memory={"cpu": 1000}, offload_folder="OFF"), r"room for none of the model's"),
    (dict(device_map="auto", max_memory={"cpu": "lots"}), r"max_memory\['cpu'\]: expected a number of bytes"),
    (dict(device_map="auto", max_memory={"gpu": 10}), r"max_memory key 'gpu'"),
    (dict(device_map="auto", max_memory={5: 10}), r"max_memory key 5: .*cuda"),
    (dict(device_map="auto", device="cpu"), r"device='cpu' and device_map= both"),
    (dict(max_memory={"cpu": 10}), r"max_memory: only applies with device_map="),
    (dict(offload_folder="OFF"), r"offload_folder: only applies with device_map="),
])
def test_bad_placements_are_refused_before_anything_is_written(dense, tmp_path, kwargs, match):
    kwargs = {k: (str(tmp_path / "off") if v == "OFF" else v) for k, v in kwargs.items()}
    with pytest.raises(PlacementError, match=match):
        olmo_lab.load_model(dense, **kwargs)
    assert not os.path.exists(tmp_path / "off")


def test_an_unwritable_offload_folder_is_refused_and_leaves_nothing(dense, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for folder in (blocker, blocker / "below"):  # permissions would not stop root, a file in the way does
        with pytest.raises(PlacementError, match="offload_folder: cannot write offloaded weights to"):
            olmo_lab.load_model(dense, device_map={"": "disk"}, offload_folder=folder)
    assert os.listdir(tmp_path) == ["a-file"] and blocker.read_text() == "not a folder"


def test_a_load_that_fails_midway_removes_its_offloaded_files_and_holds_no_model(tmp_path):
    spec = {**DENSE, "num_hidden_layers": 2}
    torch.manual_seed(0)
    model = OlmoModel(olmo_lab.OlmoConfig(**spec))
    with torch.no_grad():
        model.lm_head.weight[3, 4] = float("nan")  # read last: the layers before it are already on disk
    olmo_lab.save_model(model, tmp_path / "ckpt")
    del model
    before = live_models()
    for folder in (tmp_path / "off", tmp_path / "new" / "deeper"):
        with pytest.raises(CorruptCheckpointError, match="lm_head.weight") as failure:
            olmo_lab.load_model(tmp_path / "ckpt", device_map={"model": "disk", "lm_head": "cpu"},
                                offload_folder=folder)
        assert live_models() == before  # while the traceback (as Jupyter keeps it) holds load_model's frame
    assert offloaded(tmp_path / "off") == [] and not os.path.exists(tmp_path / "new")  # made by the load: removed


def test_the_library_imports_and_loads_without_accelerate(dense):
    code = (f"import sys; sys.modules['accelerate'] = None\n"  # as if it were not installed
            f"import olmo_lab, torch\n"
            f"m = olmo_lab.load_model({str(dense)!r})\n"
            f"try:\n    olmo_lab.load_model({str(dense)!r}, device_map='auto', max_memory={{'cpu': '1GiB'}})\n"
            f"except olmo_lab.PlacementError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "pip install 'olmo-lab[placement]'" in out


def test_quantize_with_a_device_map_is_refused_before_anything_is_read(tmp_path):
    with pytest.raises(PlacementError, match="quantize= with device_map="):
        olmo_lab.load_model(tmp_path / "not-even-a-checkpoint", quantize="int8", device_map="auto")
