"""The corpus analysis (olmo_lab.corpus) against a plain forward pass, in process and on a local Ray cluster.

    python benchmarks/corpus.py            # writes benchmarks/CORPUS_RESULTS.md and corpus_results.json
    python benchmarks/corpus.py --quick    # a smaller corpus, one repeat (a smoke test; -quick files)

Figures, on the shipped flexolmo-lab model over its held-out samples repeated to a corpus size:
- in-process throughput of the routing analysis (routing capture, every count, the all-experts loss) as a
  ratio to plain forward passes over the same batches (target >= 0.9x); the full job, which adds one
  forward per opted-out expert, is reported against the same number of plain forwards;
- Ray on a local 2-CPU cluster (2 workers x 1 thread) against in-process (2 threads) on the same job
  (target: within 1.3x of the in-process wall time), with and without starting the cluster;
- peak resident memory of the in-process job at two corpus sizes (target: flat), each in a fresh process.
Timings are medians over repeats, measured in one run; they are recorded here, never asserted in tests.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

import olmo_lab
from olmo_lab import corpus

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG = dict(context=128, batch_size=8, shard_batches=8)


def lab_job(copies: int):
    """flexolmo-lab, its tokenizer, and its held-out samples repeated `copies` times per domain."""
    path = olmo_lab.lab_model("flexolmo-lab")
    model, tok = olmo_lab.load_model(path), olmo_lab.load_tokenizer(path)
    texts = {d: [t for t in entry["texts"] for _ in range(copies)] for d, entry in olmo_lab.lab.samples().items()}
    return model, tok, corpus.Corpus.from_texts(texts)


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def throughput(copies: int, repeats: int) -> dict:
    model, tok, docs = lab_job(copies)
    config = corpus.CorpusConfig(**CONFIG, opt_out_loss=False)
    domains = docs.domains(lambda *a: None)
    batches = list(corpus._batches(docs, tok, domains, config.context, config.batch_size, tok.pad_token_id,
                                   corpus.Report(), lambda *a: None))
    tokens = sum(int(b.lengths.sum()) for b in batches)

    @torch.inference_mode()
    def plain():
        for b in batches:
            model(b.ids)

    spec = corpus._spec(corpus._model_config(model, "inprocess"), model, tok, config, len(domains))
    forward = timed(plain, repeats)
    steady = timed(lambda: corpus.analyze_shard(model, batches, spec), repeats)  # the per-batch work alone
    routing = timed(lambda: corpus.analyze(model, tok, docs, config, progress=False), repeats)
    full = timed(lambda: corpus.analyze(model, tok, docs, corpus.CorpusConfig(**CONFIG), progress=False), 1)
    forwards = 1 + model.config.num_experts
    return {"tokens": tokens, "batches": len(batches), "plain forward s": forward, "analysis s": routing,
            "analysis / plain throughput": forward / routing, "per-batch analysis s": steady,
            "per-batch analysis / plain throughput": forward / steady,
            "per-job cost s (reading, tokenizing, tables)": routing - steady,
            "full job s (with opt-out losses)": full,
            f"full job / {forwards} plain forwards throughput": forward * forwards / full,
            "plain tok/s": tokens / forward, "analysis tok/s": tokens / routing}


def ray_vs_inprocess(copies: int, repeats: int) -> dict:
    import ray
    model, tok, docs = lab_job(copies)
    config = corpus.CorpusConfig(**CONFIG)
    torch.set_num_threads(2)
    inprocess = timed(lambda: corpus.analyze(model, tok, docs, config, progress=False), repeats)
    start = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)  # as engine="ray" starts a local cluster
    try:
        job = lambda: corpus.analyze(model, tok, docs, config, engine="ray", workers=2, progress=False)  # noqa: E731
        job()
        cold = time.perf_counter() - start  # the cluster's start and the first job
        warm = timed(job, repeats)
    finally:
        ray.shutdown()
    return {"in-process s (2 threads)": inprocess, "ray s, cluster running (2 workers x 1 thread)": warm,
            "ray / in-process wall time": warm / inprocess, "ray s, starting the cluster": cold,
            "ray with start / in-process wall time": cold / inprocess}


def peak_memory(copies: int, threads: int) -> float:
    """MiB of peak RSS of a fresh process that runs the in-process routing analysis over `copies` copies."""
    code = (f"import resource, sys, torch; torch.set_num_threads({threads}); sys.path.insert(0, {HERE!r}); "
            f"import corpus as b; from olmo_lab import corpus; "
            f"m, t, d = b.lab_job({copies}); "
            f"corpus.analyze(m, t, d, corpus.CorpusConfig(**b.CONFIG, opt_out_loss=False), progress=False); "
            f"print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return int(out.split()[-1]) / 1024


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a smaller corpus and one repeat (smoke test)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads in process (the Ray figure uses 2)")
    ap.add_argument("--copies", type=int, default=32, help="copies of the held-out samples (corpus size)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=HERE)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    copies, repeats = (2, 1) if args.quick else (args.copies, args.repeats)
    results = {"quick": args.quick, "date": datetime.date.today().isoformat(), "machine": platform.machine(),
               "cpus": os.cpu_count(), "load average": os.getloadavg()[0], "torch": torch.__version__,
               "threads": args.threads, "config": CONFIG, "copies": copies, "repeats": repeats,
               "throughput": throughput(copies, repeats),
               "ray": ray_vs_inprocess(copies, repeats)}
    torch.set_num_threads(args.threads)
    small, large = copies, copies * 4
    results["peak RSS MiB"] = {f"{small} copies": peak_memory(small, args.threads),
                               f"{large} copies": peak_memory(large, args.threads)}
    write(results, args.out)
    return results


def write(results: dict, out: str) -> None:
    t, r, m = results["throughput"], results["ray"], results["peak RSS MiB"]
    (small, a), (large, b) = m.items()
    lines = [f"# Corpus analysis benchmark{' (quick)' if results['quick'] else ''}", "",
             f"{results['date']}, {results['machine']} with {results['cpus']} CPUs (load average "
             f"{results['load average']:.1f} when it started), torch {results['torch']}, {results['threads']} "
             f"thread(s) in process; flexolmo-lab, context {results['config']['context']}, batch "
             f"{results['config']['batch_size']}, {t['tokens']} tokens in {t['batches']} batches. "
             f"Written by `python benchmarks/corpus.py`; medians of {results.get('repeats', '?')} repeat(s) after a "
             "warm-up, in one run.", "",
             "| figure | measured | target | met |", "|---|---|---|---|",
             f"| routing analysis / plain forward, throughput (the whole job: reading and tokenizing the corpus, "
             f"every batch, the tables) | {t['analysis / plain throughput']:.2f}x "
             f"({t['analysis tok/s']:.0f} vs {t['plain tok/s']:.0f} tok/s) | >= 0.9x | "
             f"{'yes' if t['analysis / plain throughput'] >= 0.9 else 'no'} |",
             f"| the same per batch (routing capture, every count, the loss; `analyze_shard` over the batches) | "
             f"{t['per-batch analysis / plain throughput']:.2f}x | (the part that grows with the corpus) | |",
             f"| per-job cost (reading, tokenizing, shard digests, tables) | "
             f"{t['per-job cost s (reading, tokenizing, tables)']:.2f} s | | |"]
    full = next(k for k in t if k.startswith("full job /"))
    lines += [f"| full job (with opt-out losses) / as many plain forwards | {t[full]:.2f}x | (none) | |",
              f"| Ray, local 2 CPUs / in-process, wall time (cluster running) | {r['ray / in-process wall time']:.2f}x "
              f"({r['ray s, cluster running (2 workers x 1 thread)']:.1f} s vs {r['in-process s (2 threads)']:.1f} s) "
              f"| <= 1.3x | {'yes' if r['ray / in-process wall time'] <= 1.3 else 'no'} |",
              f"| Ray including cluster start / in-process | {r['ray with start / in-process wall time']:.2f}x "
              f"({r['ray s, starting the cluster']:.1f} s) | (none) | |",
              f"| peak RSS, {small} / {large} of the corpus | {a:.0f} / {b:.0f} MiB ({b / a:.2f}x) | flat | "
              f"{'yes' if b / a <= 1.1 else 'no'} |", "",
              *([f"**The machine was oversubscribed** (load average {results['load average']:.1f} on "
                 f"{results['cpus']} CPUs, shared with other jobs): these timings are dominated by that load, not "
                 "by the code (an analysis cannot really be faster than the plain forward it contains); rerun on "
                 "an idle machine for figures to judge. The memory figure does not depend on it.", ""]
                if results["load average"] > results["cpus"] else []),
              "Ray overhead is per job (actor start: a Python process importing torch and receiving the model) and "
              "per shard (sending the batches, returning the counts); it shrinks relative to the work as shards "
              "grow. No GPU run has been made, so there is no measured per-GPU throughput and no estimate of "
              "tokens/s for FlexOlmo-7x7B on N GPUs yet.", ""]
    name = "CORPUS_RESULTS-quick" if results["quick"] else "CORPUS_RESULTS"
    with open(os.path.join(out, name + ".md"), "w") as f:
        f.write("\n".join(lines))
    with open(os.path.join(out, name.lower() + ".json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
