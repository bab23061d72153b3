"""The benchmark script's own logic (timings are measured by `python benchmarks/run.py`, never asserted here)."""

import importlib.util
from pathlib import Path

import pytest
import torch

import olmo_lab

SPEC = importlib.util.spec_from_file_location("bench", Path(__file__).resolve().parent.parent / "benchmarks" / "run.py")
bench = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(bench)


def test_decode_profile_splits_wall_time():
    config = olmo_lab.OlmoConfig(model_type="olmo3", vocab_size=128, hidden_size=64, intermediate_size=96,
                                 num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64, sliding_window=8)
    model = olmo_lab.OlmoModel(config).eval()
    ids = torch.randint(2, model.config.vocab_size, (1, 8))
    shares = bench.decode_profile(lambda: olmo_lab.generate(model, None, ids, max_new_tokens=4, eos_token_id=[]))
    assert set(shares) == {"matrix products", "other operators", "framework and Python"}
    assert all(0 <= v <= 1 for v in shares.values())
    assert shares["matrix products"] > 0 and shares["other operators"] > 0
    assert shares["matrix products"] + shares["other operators"] <= 1.0  # operator time fits in the wall time
    assert sum(shares.values()) == pytest.approx(1.0, abs=0.05)


def test_results_file_judges_every_target(tmp_path):
    results = {"quick": False, "date": "2026-11-24", "device": "cpu", "machine": "x86_64", "torch": "2.13.0",
               "threads": 2, "transformers": "5.24.0", "models": {
                   "olmo3-150M": {"parameters": 1.5e8, "weight_bytes": 6e8, "decode b1 fp32 tok/s": [45.0, 40.0],
                                  "decode b1 fraction of kernel bound": 0.7,
                                  "prefill 512 fp32 tok/s": [100.0, 101.0], "load peak RSS / weight bytes": [1.1, 0.1],
                                  "tracing overhead (fraction of prefill time)": {
                                      "tracing off (after traces were removed)": 0.001}},
                   "flexolmo-160M-top2": {"parameters": 1.6e8, "weight_bytes": 6e8, "decode b1 fp32 tok/s": [90.0, 60.0],
                                          "prefill 512 fp32 tok/s": [150.0, 100.0],
                                          "tracing overhead (fraction of prefill time)": {"routing capture": 0.08}}}}
    bench.write(results, str(tmp_path))
    text = (tmp_path / "RESULTS.md").read_text()
    rows = {tuple(line.split(" | ")[:2]): line.rstrip(" |").split(" | ")[-1] for line in text.splitlines()
            if line.startswith(("| olmo3-150M |", "| flexolmo-160M-top2 |"))}
    assert rows == {("| olmo3-150M", "decode b1 vs transformers >= 3"): "**no**",
                    ("| olmo3-150M", "decode b1, fraction of the kernel bound >= 0.6"): "yes",
                    ("| olmo3-150M", "prefill vs transformers >= 1"): "**no**",
                    ("| olmo3-150M", "load peak RSS / weight bytes <= 1.2"): "yes",
                    ("| olmo3-150M", "tracing off (after traces were removed): within 2%"): "yes",
                    ("| flexolmo-160M-top2", "prefill vs transformers >= 1"): "yes",
                    ("| flexolmo-160M-top2", "top-2 decode vs transformers >= 1.5"): "yes",
                    ("| flexolmo-160M-top2", "top-2 prefill vs transformers >= 1.5"): "yes",
                    ("| flexolmo-160M-top2", "routing capture: within 5%"): "**no**"}


def test_a_quick_run_is_not_judged(tmp_path):
    results = {"quick": True, "date": "2026-11-24", "device": "cpu", "machine": "x86_64", "torch": "2.13.0",
               "threads": 2, "transformers": "5.24.0", "models": {
                   "olmo3-150M": {"parameters": 1e7, "weight_bytes": 4e7, "decode b1 fp32 tok/s": [45.0, 40.0]}}}
    bench.write(results, str(tmp_path))
    text = (tmp_path / "RESULTS-quick.md").read_text()
    assert "Not judged" in text and "| olmo3-150M | decode b1 vs transformers" not in text


def test_the_cold_start_section_judges_its_targets(tmp_path):
    cold = {"date": "2026-12-02", "repeats": 7, "python -c 'import torch' s": 2.0,
            "olmo-lab generate 30 tokens (olmo3-lab) s": 3.0, "generate / import torch": 1.5,
            "first load_model after import s": 0.05, "second load_model s": 0.01,
            "torch._dynamo imported by load_model": False}
    results = {"quick": True, "date": "2026-12-02", "device": "cpu", "machine": "x86_64", "torch": "2.13.0",
               "threads": 2, "transformers": "5.24.0", "models": {}, "cold start": cold}
    bench.write(results, str(tmp_path))
    rows = [line for line in (tmp_path / "RESULTS-quick.md").read_text().splitlines() if "<=" in line or "compiler" in line]
    assert rows == ["| first load_model after import s <= 0.2 | 0.050 | yes |",
                    "| generate / import torch <= 1.4 | 1.500 | **no** |",
                    "| no compiler import on the loading path | none | yes |"]


def test_decode_limits_section_judges_its_targets(tmp_path):
    def figures(eager, compiled, memory):
        return {"bytes read per token": 2**20, "streaming read GiB/s": 20.0, "compile s": 9.0,
                "tok/s": {"eager": eager, "static": eager, "compiled": compiled},
                "fraction of memory bound": {"eager": memory, "static": memory, "compiled": memory / 2},
                "fraction of kernel bound": {"eager": 0.9, "static": 0.9, "compiled": 0.9},
                "matvec GiB/s": {"torch.mv": 10.0}}
    limits = {"conditions": "batch 1", "olmo3-lab": {"float32": figures(600.0, 1300.0, 0.2)},
              "olmo3-150M": {"float32": figures(40.0, 40.0, 0.6), "bfloat16": figures(60.0, 70.0, 0.45)}}
    results = {"quick": False, "date": "2026-12-02", "device": "cpu", "machine": "x86_64", "torch": "2.13.0",
               "threads": 2, "transformers": "5.24.0", "models": {}, "decode limits": limits}
    bench.write(results, str(tmp_path))
    text = (tmp_path / "RESULTS.md").read_text()
    assert ("| olmo3-lab | float32 | 1.0 | 20.0 | 600.0 | 600.0 | 1300.0 | 1.00x | 2.17x | 9.0 | 0.20 | 0.10 | 0.90 |"
            in text)
    rows = [line for line in text.splitlines()
            if line.startswith("| olmo3-") and line.endswith(("| yes |", "**no** |"))]
    assert rows == ["| olmo3-150M | bf16 eager decode / fp32 eager >= 1.8 | 1.50 | **no** |",
                    "| olmo3-150M | fp32 decode, fraction of its memory bound (best path) >= 0.5 | 0.60 | yes |",
                    "| olmo3-150M | bf16 decode, fraction of its memory bound (best path) >= 0.5 | 0.45 | **no** |",
                    "| olmo3-lab | fp32 compiled decode / eager >= 2 | 2.17 | yes |"]
