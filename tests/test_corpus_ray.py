"""The Ray engine of the corpus analysis on a local 2-CPU cluster: the same tables as in process, a killed
worker retried or reported, and an unreachable address; every cluster is shut down."""

import threading
import time

import pandas as pd
import psutil
import pytest

from olmo_lab import corpus, corpus_ray
from olmo_lab.errors import ClusterError

from test_corpus import EXPERTS, TEXTS, tiny_flex

ray = pytest.importorskip("ray")

# Many small shards, so a worker can be killed while the job is still running.
CONFIG = corpus.CorpusConfig(context=16, batch_size=2, shard_batches=1, bins=8, min_token_count=2, top_tokens=4)
DOCS = {d: texts * 3 for d, texts in TEXTS.items()}


@pytest.fixture(scope="module")
def job():
    from olmo_lab.train import train_bpe_tokenizer
    tok = train_bpe_tokenizer([t for texts in TEXTS.values() for t in texts], vocab_size=300)
    model = tiny_flex(len(tok))
    expected = corpus.analyze(model, tok, corpus.Corpus.from_texts(DOCS), CONFIG, progress=False)
    return tok, model, expected


@pytest.fixture(scope="module")
def cluster():
    """One local 2-CPU cluster for the module (started as the engine starts one; starting takes ~10-20 s),
    always shut down. The engine uses a Ray already initialised in this process and leaves it running."""
    try:
        started = corpus_ray._connect(ray, None, 2, 1, 0, {})
    except Exception:  # noqa: BLE001  Ray's own "node timed out during startup" on an overloaded machine: once more
        ray.shutdown()
        started = corpus_ray._connect(ray, None, 2, 1, 0, {})
    assert started is True
    try:
        assert ray.cluster_resources()["CPU"] == 2
        yield
    finally:
        ray.shutdown()


def kill_a_worker_after_the_first_shard(out_dir, killed: list):
    """Wait for the first shard file, then SIGKILL one of this process's CorpusWorker actors."""
    deadline = time.time() + 120
    while time.time() < deadline and not list((out_dir / "shards").glob("*.safetensors")):
        time.sleep(0.005)
    for pid in workers_alive()[:1]:
        psutil.Process(pid).kill()
        killed.append(pid)


def workers_alive() -> list:
    alive = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.name().startswith("ray::CorpusWorker") and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p.pid)
        except psutil.NoSuchProcess:
            continue
    return alive


def run_with_a_killed_worker(model, tok, out_dir, **options):
    killed = []
    killer = threading.Thread(target=kill_a_worker_after_the_first_shard, args=(out_dir, killed))
    killer.start()
    try:
        return corpus.analyze(model, tok, corpus.Corpus.from_texts(DOCS), CONFIG, out_dir=out_dir, engine="ray",
                              workers=2, progress=False, **options), killed
    finally:
        killer.join()


def test_unreachable_address_is_a_clear_error(job):
    tok, model, _ = job
    assert not ray.is_initialized()
    docs = corpus.Corpus.from_texts({"code": TEXTS["code"]})
    start = time.time()
    with pytest.raises(ClusterError, match=r"cannot reach the Ray cluster at '127.0.0.1:1'"):
        corpus.analyze(model, tok, docs, CONFIG, engine="ray", address="127.0.0.1:1", progress=False)
    with pytest.raises(ClusterError, match="is not host:port"):
        corpus.analyze(model, tok, docs, CONFIG, engine="ray", address="head:port", progress=False)
    with pytest.raises(ClusterError, match="workers: expected an integer >= 1"):
        corpus.analyze(model, tok, docs, CONFIG, engine="ray", workers=0, progress=False)
    assert time.time() - start < 30 and not ray.is_initialized()
    assert EXPERTS == model.config.expert_names


def test_ray_equals_in_process_and_survives_a_killed_worker(job, cluster, tmp_path):
    tok, model, expected = job
    result, killed = run_with_a_killed_worker(model, tok, tmp_path, max_retries=2)
    assert ray.is_initialized()  # the caller's cluster is left running
    assert killed and result.report["retries"] >= 1 and result.report["workers"] == 2
    assert result.report["engine"] == "ray" and result.report["shards"] > 10
    for name in corpus.TABLES:  # counts exactly; losses too, here (same thread count, same batches)
        pd.testing.assert_frame_equal(getattr(expected, name), getattr(result, name), check_exact=name != "loss",
                                      rtol=1e-9)


def test_a_dead_worker_without_retries_fails_and_keeps_only_whole_shards(job, cluster, tmp_path):
    tok, model, expected = job
    with pytest.raises(ClusterError, match="worker died while analysing shard .* max_retries=0"):
        run_with_a_killed_worker(model, tok, tmp_path, max_retries=0)
    deadline = time.time() + 20
    while time.time() < deadline and workers_alive():
        time.sleep(0.1)
    assert not workers_alive()  # the failed job's actors are gone
    assert not (tmp_path / "report.json").exists()  # no result
    assert not list((tmp_path / "shards").glob("*.tmp"))
    resumed = corpus.analyze(model, tok, corpus.Corpus.from_texts(DOCS), CONFIG, out_dir=tmp_path, progress=False)
    assert resumed.report["resumed_shards"] >= 1  # the shards written before the failure are whole and reused
    for name in corpus.TABLES:
        pd.testing.assert_frame_equal(getattr(expected, name), getattr(resumed, name), rtol=1e-9)
