"""Placement over devices, CPU memory and disk: the checks that need a GPU, and what offloading costs.

    python benchmarks/placement.py --quick          # CPU: a small model, cpu + disk maps (a smoke test)
    python benchmarks/placement.py                  # CPU: a ~760 MB model (fp32)
    python benchmarks/placement.py --device cuda    # GPU(s): GPU + CPU + disk maps, and a split over 2 GPUs

Each placed model is compared with the same weights in memory on one device (on a GPU every block runs
on the GPU either way, so logits must be equal there too), traced (records on CPU), steered with an
intervention and made to generate; then the time per forward is reported. Not part of the unit tests
(tests/test_placement.py runs the CPU checks and measures peak memory); prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time

import torch

import olmo_lab
from olmo_lab.interventions import Add, intervene


def checkpoint(directory: str, quick: bool) -> str:
    size = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4) if quick else \
        dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=6)
    config = olmo_lab.OlmoConfig(model_type="flex_olmo", vocab_size=4096, num_attention_heads=8, num_experts=4,
                                 num_experts_per_tok=2, max_position_embeddings=512, **size)
    torch.manual_seed(0)
    olmo_lab.save_model(olmo_lab.OlmoModel(config), directory)
    return directory


def maps(device: str, n_layers: int) -> dict[str, dict]:
    """Device maps to check: each block to a place, round robin over `places`."""
    def spread(places, edges):
        m = {"model.embed_tokens": edges, "model.norm": edges, "lm_head": edges}
        m.update({f"model.layers.{i}": places[i % len(places)] for i in range(n_layers)})
        return m
    if device == "cpu":
        return {"cpu+disk": spread(["cpu", "disk"], "cpu"), "disk": {"": "disk"}}
    out = {"gpu+cpu+disk": spread([0, "cpu", "disk"], 0), "gpu+cpu": spread([0, "cpu"], 0)}
    if torch.cuda.device_count() > 1:
        out["gpu0+gpu1"] = spread([0, 1], 0)
        out["gpu0+gpu1+disk"] = spread([0, 1, "disk"], 1)
    return out


def per_forward(model, ids, repeats) -> float:
    times = []
    for _ in range(repeats):
        if ids.is_cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.inference_mode():
            model(ids)
        if ids.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def check(model, ref, ids) -> dict:
    """Logits, a trace, an intervention and generation of `model` against `ref` (same weights, one device)."""
    x = ids.to(model.device)
    with torch.inference_mode():
        same_logits = torch.equal(model(x).logits.cpu(), ref(ids.to(ref.device)).logits.cpu())
    traces = []
    for m in (ref, model):
        with olmo_lab.trace(m, attention=True, routing=True) as tr, torch.inference_mode():
            m(ids.to(m.device))
        traces.append(tr)
    layers = range(model.config.num_hidden_layers)
    same_trace = all(traces[1].attention[i].device.type == "cpu" and torch.equal(traces[0].attention[i],
                                                                                 traces[1].attention[i])
                     and torch.equal(traces[0].routing[i].topk_indices, traces[1].routing[i].topk_indices)
                     for i in layers)
    direction = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    steered = []
    for m in (ref, model):
        last = f"model.layers.{model.config.num_hidden_layers - 1}.hook_resid_post"
        with intervene(m, {last: Add(direction.to(m.dtype).to(m.device))}), torch.inference_mode():
            steered.append(m(ids.to(m.device)).logits.cpu())
    tokens = [olmo_lab.generate(m, None, ids[:1].to(m.device), max_new_tokens=8) for m in (ref, model)]
    return {"logits_equal": same_logits, "trace_equal": same_trace, "intervention_equal": torch.equal(*steered),
            "generate_equal": tokens[0] == tokens[1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device on this machine")
    repeats = 3 if args.quick else 10
    with tempfile.TemporaryDirectory() as work:
        directory = checkpoint(f"{work}/ckpt", args.quick)
        ref = olmo_lab.load_model(directory, device=args.device if args.device == "cpu" else "cuda:0")
        ids = torch.randint(3, 4096, (2, 64), generator=torch.Generator().manual_seed(0))
        report = {"device": args.device, "gpus": torch.cuda.device_count(), "threads": torch.get_num_threads(),
                  "weights_bytes": sum(t.numel() * t.element_size() for t in ref.state_dict().values()),
                  "in_memory_s_per_forward": per_forward(ref, ids.to(ref.device), repeats), "maps": {}}
        for name, device_map in maps(args.device, ref.config.num_hidden_layers).items():
            model = olmo_lab.load_model(directory, device_map=device_map, offload_folder=f"{work}/offload")
            report["maps"][name] = {**check(model, ref, ids), "bytes": model.placement.bytes,
                                    "s_per_forward": per_forward(model, ids.to(model.device), repeats)}
            del model
    print(json.dumps(report))
    failed = [n for n, r in report["maps"].items() if not all(v for k, v in r.items() if k.endswith("_equal"))]
    if failed:
        sys.exit(f"placed models differ from the in-memory one: {failed}")


if __name__ == "__main__":
    main()
