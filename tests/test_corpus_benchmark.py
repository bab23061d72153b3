"""benchmarks/corpus.py's own logic: the results file judges each target from the measured numbers."""

import importlib.util
from pathlib import Path

SPEC = importlib.util.spec_from_file_location("corpus_bench", Path(__file__).resolve().parent.parent / "benchmarks"
                                              / "corpus.py")
bench = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(bench)


def test_results_file_judges_every_target(tmp_path):
    results = {"quick": False, "date": "2026-12-02", "machine": "x86_64", "cpus": 2, "load average": 1.0,
               "torch": "2.13.0", "threads": 2, "config": bench.CONFIG,
               "throughput": {"tokens": 1000, "batches": 4, "plain forward s": 1.0, "analysis s": 1.25,
                              "analysis / plain throughput": 0.8, "per-batch analysis s": 1.05,
                              "per-batch analysis / plain throughput": 0.95,
                              "per-job cost s (reading, tokenizing, tables)": 0.2, "full job s (with opt-out losses)": 6.0,
                              "full job / 6 plain forwards throughput": 1.0, "plain tok/s": 1000.0,
                              "analysis tok/s": 800.0},
               "ray": {"in-process s (2 threads)": 10.0, "ray s, cluster running (2 workers x 1 thread)": 12.0,
                       "ray / in-process wall time": 1.2, "ray s, starting the cluster": 30.0,
                       "ray with start / in-process wall time": 3.0},
               "peak RSS MiB": {"2 copies": 400.0, "8 copies": 404.0}}
    bench.write(results, str(tmp_path))
    text = (tmp_path / "CORPUS_RESULTS.md").read_text()
    assert "every batch, the tables) | 0.80x (800 vs 1000 tok/s) | >= 0.9x | no |" in text
    assert "`analyze_shard` over the batches) | 0.95x |" in text and "| 0.20 s |" in text
    assert "| 1.20x (12.0 s vs 10.0 s) | <= 1.3x | yes |" in text
    assert "| 400 / 404 MiB (1.01x) | flat | yes |" in text
    assert (tmp_path / "corpus_results.json").exists()
