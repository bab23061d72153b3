"""The Ray engine of `olmo_lab.corpus.analyze`: the same shards, sent to one model actor per worker.

    result = corpus.analyze(model, tok, docs, engine="ray", workers=2)            # a local cluster it starts
    result = corpus.analyze(path, tok, docs, engine="ray", address="head:6379",  # an existing cluster
                            gpus_per_worker=1, model_kwargs={"device": "cuda"})

The driver reads, tokenizes and packs the corpus (as in-process), and keeps at most one shard in flight per
worker, so its memory stays flat. Each actor holds one model and returns a shard's counts; the driver
writes them as the in-process engine does (atomically, under out_dir) and sums them in shard order, so the
counts equal the in-process ones exactly and the losses to rounding (the workers' thread counts can round
matrix products differently). A worker that dies loses only its shard, never half of one: the actor is
replaced and the shard sent again, up to `max_retries` times, then the job fails with ClusterError and the
shards already written stay for a resume. Ray Data is not used: shards give the resumption and order the
tables need, and one actor per worker is all a batch-inference job of this shape asks of it.

Multi-node GPU recipe (one model replica per GPU; each node must have olmo-lab installed and read the
checkpoint from its own disk or a shared file system):

    head$    ray start --head --port=6379 --num-gpus=8
    worker$  ray start --address=HEAD_IP:6379 --num-gpus=8        # on every other node
    driver$  python -c "
    import olmo_lab; from olmo_lab import corpus
    tok = olmo_lab.load_tokenizer('/models/FlexOlmo-7x7B-1T')
    docs = corpus.Corpus.from_files(['/data/eval/part-0000.parquet', ...])   # rows with text and domain
    corpus.analyze('/models/FlexOlmo-7x7B-1T', tok, docs, corpus.CorpusConfig(context=4096, batch_size=4),
                   engine='ray', address='HEAD_IP:6379', workers=16, gpus_per_worker=1, cpus_per_worker=4,
                   model_kwargs={'device': 'cuda', 'dtype': 'bfloat16'}, out_dir='/shared/routing-run')"

A bf16 7x7B replica needs about 2 x 33 GB: one 80 GB GPU per worker. Rerunning the same command after a
failure resumes from the shards in out_dir. No GPU run has been made yet, so there is no measured per-GPU
throughput to project a 7x7B tokens/s from (benchmarks/CORPUS_RESULTS.md says so).
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlsplit

import torch

from .corpus import analyze_shard
from ..errors import ClusterError, OlmoLabError

CONNECT_TIMEOUT_S = 5.0


class CorpusWorker:
    """One model replica in a Ray actor: analyses the shards the driver sends it."""

    def __init__(self, model, spec, threads: int, device: str | None, model_kwargs: dict):
        torch.set_num_threads(threads)
        if isinstance(model, (str, os.PathLike)):
            from ..checkpoints.checkpoint import load_model
            model = load_model(model, **model_kwargs)
        self.model = model.to(device) if device else model
        self.model.eval()
        self.spec = spec

    def run(self, batches) -> dict:
        return analyze_shard(self.model, batches, self.spec)

    def pid(self) -> int:
        return os.getpid()


def run(model, shards, spec, store, bar, *, address: str | None = None, workers: int | None = None,
        cpus_per_worker: int = 1, gpus_per_worker: float = 0, max_retries: int = 1, model_kwargs: dict | None = None,
        init_kwargs: dict | None = None) -> tuple[int, int]:
    """Analyse `shards` on a Ray cluster and hand each result to `store`; returns (workers, shards retried).

    address: an existing cluster ("host:port", "ray://host:port" or "auto"); None starts a local one with
        workers x cpus_per_worker CPUs (and shuts it down at the end), unless Ray is already initialised in
        this process, which is then used as it is and left running.
    workers: model actors (default: the cluster's CPUs // cpus_per_worker, or GPUs // gpus_per_worker).
    max_retries: how often a shard is sent again after its worker died.
    model_kwargs: for a checkpoint path, the arguments of `load_model` in each worker (device, dtype, ...).
    init_kwargs: more arguments for `ray.init` (e.g. runtime_env).
    """
    try:
        import ray
    except ImportError as err:
        raise ImportError("engine='ray' needs Ray: pip install 'olmo-lab[scale]'") from err
    for name, value, low in (("workers", workers, 1), ("cpus_per_worker", cpus_per_worker, 1),
                             ("max_retries", max_retries, 0)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise ClusterError(f"{name}: expected an integer >= {low}, got {value!r}")
    started = _connect(ray, address, workers, cpus_per_worker, gpus_per_worker, init_kwargs or {})
    actors = []
    try:
        resources = ray.cluster_resources()
        if workers is None:
            workers = int(resources.get("GPU", 0) // gpus_per_worker) if gpus_per_worker else \
                int(resources.get("CPU", 1) // cpus_per_worker)
        workers = max(workers, 1)
        remote = ray.remote(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker)(CorpusWorker)
        model_ref = model if isinstance(model, (str, os.PathLike)) else ray.put(model)
        device = "cuda" if gpus_per_worker and not model_kwargs else None

        def new_actor():
            return remote.remote(model_ref, spec, cpus_per_worker, device, model_kwargs or {})

        actors = [new_actor() for _ in range(workers)]
        free = list(actors)
        in_flight = {}  # ObjectRef -> (index, batches, digest, attempts, actor)
        retried = []

        def collect() -> None:
            (ready,), _ = ray.wait(list(in_flight), num_returns=1)
            index, batches, digest, attempts, actor = in_flight.pop(ready)
            try:
                part = ray.get(ready)
            except ray.exceptions.RayActorError as e:  # the worker process died: replace it, maybe retry
                actors.remove(actor)
                replacement = new_actor()
                actors.append(replacement)
                if attempts >= max_retries:
                    raise ClusterError(f"a Ray worker died while analysing shard {index} ({attempts + 1} attempt(s), "
                                       f"max_retries={max_retries}); shards finished so far are kept for a resume"
                                       ) from e
                in_flight[replacement.run.remote(batches)] = (index, batches, digest, attempts + 1, replacement)
                retried.append(index)
                return
            except ray.exceptions.RayTaskError as e:  # the analysis itself raised: surface olmo-lab's own error
                cause = getattr(e, "cause", None)
                if isinstance(cause, OlmoLabError):
                    raise cause from None
                raise ClusterError(f"shard {index} failed in a Ray worker: {e}") from e
            store.put(index, part, digest)
            bar.update(int(sum(int(b.lengths.sum()) for b in batches)))
            free.append(actor)

        for index, batches, digest in shards:
            while not free:
                collect()
            actor = free.pop(0)
            in_flight[actor.run.remote(batches)] = (index, batches, digest, 0, actor)
        while in_flight:
            collect()
        return workers, len(retried)
    finally:
        for actor in actors:
            ray.kill(actor)
        if started:
            ray.shutdown()


def _connect(ray, address, workers, cpus_per_worker, gpus_per_worker, init_kwargs) -> bool:
    """Join or start a cluster; True if this call started it (and must shut it down)."""
    if ray.is_initialized():
        return False
    if address is not None:
        if address != "auto":
            _check_reachable(address)
        try:
            ray.init(address=address, log_to_driver=False, **init_kwargs)
        except Exception as e:  # Ray raises ConnectionError, RuntimeError or its own exceptions here
            raise ClusterError(f"cannot join the Ray cluster at {address!r}: {e}") from e
        return False
    cpus = (workers or os.cpu_count() or 1) * cpus_per_worker
    gpus = (workers or 0) * gpus_per_worker if gpus_per_worker else None
    ray.init(num_cpus=cpus, num_gpus=gpus, include_dashboard=False, log_to_driver=False, **init_kwargs)
    return True


def _check_reachable(address: str) -> None:
    """A TCP connection to the cluster's address, so a wrong one fails in seconds rather than Ray's minute."""
    parts = urlsplit(address if "://" in address else f"ray://{address}")
    try:
        host, port = parts.hostname, parts.port or (10001 if address.startswith("ray://") else 6379)
    except ValueError as e:
        raise ClusterError(f"address: {address!r} is not host:port ({e})") from e
    if not host:
        raise ClusterError(f"address: {address!r} is not host:port")
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise ClusterError(f"cannot reach the Ray cluster at {address!r} ({host}:{port}): {e}") from e
