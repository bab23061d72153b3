"""Peak resident memory while loading: expert-subset loading never materialises the other experts."""

import json
import subprocess
import sys

import pytest
import torch

import olmo_lab
from olmo_lab.config import OlmoConfig
from olmo_lab.model import OlmoModel

PROBE = r"""
import json, sys, torch, olmo_lab
def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
experts = json.loads(sys.argv[2])
with torch.device("meta"):  # warm up: page in torch's code paths so only the load itself is measured
    olmo_lab.OlmoModel(olmo_lab.OlmoConfig.from_json(sys.argv[1]))
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
before = rss("VmRSS:")
model = olmo_lab.load_model(sys.argv[1], experts=experts)
print(json.dumps({"peak": rss("VmHWM:") - before, "params": sum(p.numel() * 4 for p in model.parameters())}))
"""


@pytest.fixture(scope="module")
def big_flex(tmp_path_factory):
    """8 experts whose weights dominate the checkpoint (~100 MB of fp32 expert weights)."""
    config = OlmoConfig(model_type="flex_olmo", vocab_size=256, hidden_size=256, intermediate_size=1024,
                        num_hidden_layers=4, num_attention_heads=4, num_experts=8, num_experts_per_tok=2,
                        max_position_embeddings=128)
    torch.manual_seed(0)
    model = OlmoModel(config)
    d = tmp_path_factory.mktemp("big_flex")
    olmo_lab.save_model(model, d, max_shard_size="40MB")
    return d


def _peak(directory, experts):
    out = subprocess.run([sys.executable, "-c", PROBE, str(directory), json.dumps(experts)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_subset_loading_peak_memory_grows_with_experts_kept(big_flex):
    weights = sum(p.stat().st_size for p in big_flex.glob("*.safetensors"))
    full = _peak(big_flex, None)
    two = _peak(big_flex, ["expert_0", "expert_5"])
    four = _peak(big_flex, [0, 1, 2, 3])
    # No second full copy of the weights; 16 MiB of slack for allocator noise on a ~100 MiB checkpoint.
    assert full["peak"] <= 1.2 * weights + 16 * 2**20, (full, weights)
    assert two["peak"] < 0.4 * full["peak"], (two, full)  # 2 of 8 experts: well under half
    assert two["peak"] < four["peak"] < full["peak"]
    assert two["params"] < 0.3 * full["params"]
