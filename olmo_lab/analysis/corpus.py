"""Routing analysis at corpus scale: how a FlexOlmo model routes every token of a domain-labelled corpus.

    from olmo_lab import corpus
    docs = corpus.Corpus.from_files({"code": ["a.py.txt"], "math": ["math.jsonl"]})   # or .parquet, a Dataset
    result = corpus.analyze(model, tok, docs, corpus.CorpusConfig(context=128, batch_size=8), out_dir="run/")
    result.domain_specialization()      # OLMoE's domain specialization per layer, domain and expert
    result.loss                          # bits per byte per domain: all experts, and each expert opted out
    result = corpus.analyze(model, tok, docs, engine="ray", workers=2)   # the same job on a Ray cluster

Documents stream from local files (text, JSON Lines, Parquet) or a `datasets.Dataset` built from local
files; each is tokenized, cut into chunks of at most `context` tokens, and the chunks are packed in corpus
order into batches of `batch_size` rows, right-padded to the batch's longest chunk (a causal model never
sees the padding, and padded positions are left out of every count). Each batch runs once with routing
capture (`olmo_lab.trace`) and once per expert opted out (`olmo_lab.experts_off`) for the loss table.
Everything is aggregated as it goes into fixed-size counts, so memory does not grow with the corpus.

Shards of `shard_batches` batches are the unit of work: with `out_dir`, each finished shard is written
atomically (temporary name, then rename), an interrupted job resumes from the shards on disk, and the
final tables are the shards summed in order, so a run is deterministic and a resumed run equals an
uninterrupted one. The Ray engine (`olmo_lab.corpus_ray`) sends the same shards to one model actor per
worker, so its counts equal the in-process ones exactly.

Definitions (OLMoE, Muennighoff et al. 2024, and its analysis scripts `scripts/run_moe_analysis.py`,
`scripts/plot_routing_analysis_v2*.ipynb` in allenai/OLMoE):
- domain specialization of expert e for domain D at a layer: the share of D's tokens that have e among
  their top-k experts (top-1: as their highest-weight expert); uniform routing gives k/E (1/E);
- vocabulary specialization of a token id: the share of its occurrences routed (top-1) to its most
  frequent expert; ids seen fewer than `min_token_count` times (OLMoE: 10) are left out; an expert's
  vocabulary specialization is the mean over the ids it is the most frequent expert of, and those ids,
  by share, are the tokens most specific to it;
- co-activation of experts a, b at a layer: of the tokens with a among their top experts, the share that
  also have b (OLMoE's script counts rank-adjacent pairs of its top-8; all pairs are counted here);
- routing consistency from layer l to l+1: the top-1 transition counts, and the share of tokens whose
  top-1 expert at l+1 is the same expert (FlexOlmo's experts keep their identity across layers);
- loss: cross-entropy of every token predicted from its chunk's earlier tokens (a chunk's first token is
  context only), in bits per UTF-8 byte of the predicted tokens, as `olmo_lab.train.bits_per_byte`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import safetensors.torch
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import CorpusError
from ..modeling.experts import experts_off
from .trace import trace
from ..recipe.train import token_byte_lengths

try:
    import pandas as pd
except ImportError as err:  # the optional extra
    raise ImportError("olmo_lab.corpus needs pandas and pyarrow: pip install 'olmo-lab[scale]'") from err

TEXT_SUFFIXES, JSONL_SUFFIXES, PARQUET_SUFFIXES = (".txt",), (".jsonl", ".ndjson"), (".parquet",)
BAD_ROW_POLICIES = ("raise", "skip")
ENGINES = ("inprocess", "ray")
MAX_REPORTED_ROWS = 100  # skipped rows listed one by one in the report (all of them are counted)


# ------------------------------------------------------------------------------------ configuration
@dataclass
class CorpusConfig:
    """What to measure and how to batch it."""

    context: int | None = None  # tokens per chunk (default: the model's max_position_embeddings)
    batch_size: int = 8  # chunks per forward pass
    shard_batches: int = 8  # batches per shard: the unit of resumption and of Ray work
    bins: int = 20  # routing-weight histogram bins over [0, 1]
    coactivation_top: int | None = None  # experts per token for co-activation (default top-k; 2 if top-k = all)
    min_token_count: int = 10  # occurrences for a token id to count in vocabulary specialization (OLMoE: 10)
    top_tokens: int = 15  # most specific tokens kept per layer and expert
    opt_out_loss: bool = True  # also the loss with each expert opted out (one more forward per expert)
    records: bool = False  # also write one row per token (needs out_dir)
    on_bad_row: str = "raise"  # a malformed row or unknown domain: "raise" (CorpusError) or "skip" (reported)

    def check(self, max_context: int) -> int:
        """The chunk length in tokens; CorpusError for settings that cannot work."""
        context = max_context if self.context is None else self.context
        for name in ("batch_size", "shard_batches", "bins", "min_token_count", "top_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise CorpusError(f"{name}: expected a positive integer, got {value!r}")
        if isinstance(context, bool) or not isinstance(context, int) or not 2 <= context <= max_context:
            raise CorpusError(f"context: {context!r} tokens cannot fit: a chunk needs 2 to {max_context} tokens "
                              f"(the model's max_position_embeddings)")
        if self.on_bad_row not in BAD_ROW_POLICIES:
            raise CorpusError(f"on_bad_row: expected 'raise' or 'skip', got {self.on_bad_row!r}")
        return context


# ------------------------------------------------------------------------------------ documents
@dataclass
class Document:
    text: str
    domain: str
    where: str  # "file:line" or "dataset row N", for messages


class Corpus:
    """Domain-labelled documents read lazily from local sources (nothing is downloaded)."""

    def __init__(self, readers: list[Callable], domains: list[str] | None, description: list):
        self._readers, self._domains, self.description = readers, domains, description

    @classmethod
    def from_texts(cls, texts: dict[str, Sequence[str]]) -> "Corpus":
        """{domain: [document text, ...]} held in memory."""
        if not isinstance(texts, dict) or not texts:
            raise CorpusError("texts: expected a non-empty dict {domain: [document text, ...]}")

        def reader(bad):
            for domain, docs in texts.items():
                for i, text in enumerate(docs):
                    if not isinstance(text, str):
                        bad(f"{domain} text {i}", f"expected a string, got {type(text).__name__}")
                        continue
                    yield Document(text, domain, f"{domain} text {i}")
        digest = hashlib.sha256(json.dumps(texts, sort_keys=True, default=str).encode()).hexdigest()
        return cls([reader], list(texts), [{"texts": digest}])

    @classmethod
    def from_files(cls, files, *, text_field: str = "text", domain_field: str = "domain",
                   separator: str | None = None, domains: Sequence[str] | None = None) -> "Corpus":
        """Documents from local files, by suffix: .txt (one document per file, or per block between lines equal
        to `separator`, e.g. "\\f" for the lab's held-out files), .jsonl (one JSON object per line) or .parquet.

        files: {domain: path or [paths]} labels every document by its key; a path or list of paths instead
        takes each row's label from `domain_field` (text files have none). `domains` fixes the domains and
        their order (default: the dict's keys, or every label found in a first pass over the rows).
        """
        labelled = isinstance(files, dict)
        groups = files.items() if labelled else [(None, files)]
        readers, description = [], []
        for domain, paths in groups:
            for path in [paths] if isinstance(paths, (str, os.PathLike)) else list(paths):
                path = _check_file(path, labelled)
                kind = path.suffix.lower()
                readers.append(_file_reader(path, kind, domain, text_field, domain_field, separator))
                st = path.stat()
                description.append({"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
        if not readers:
            raise CorpusError("files: no files given")
        return cls(readers, list(domains) if domains is not None else list(files) if labelled else None,
                   description)

    @classmethod
    def from_dataset(cls, dataset, *, text_field: str = "text", domain_field: str = "domain",
                     domains: Sequence[str] | None = None) -> "Corpus":
        """Rows of a Hugging Face `datasets.Dataset` (built from local files, e.g. `Dataset.from_parquet`)."""
        columns = getattr(dataset, "column_names", None)
        if columns is None or not hasattr(dataset, "__iter__"):
            raise CorpusError(f"dataset: expected a datasets.Dataset, got {type(dataset).__name__}")
        missing = [c for c in (text_field, domain_field) if c not in columns]
        if missing:
            raise CorpusError(f"dataset: no column {missing[0]!r} (columns: {columns})")

        def reader(bad):
            for i, row in enumerate(dataset):
                yield from _row_document(row, None, text_field, domain_field, f"dataset row {i}", bad)
        return cls([reader], list(domains) if domains is not None else None,
                   [{"dataset": getattr(dataset, "_fingerprint", None),
                     "rows": len(dataset) if hasattr(dataset, "__len__") else None}])

    def documents(self, domains: list[str], bad: Callable[[str, str], None]) -> Iterator[Document]:
        """Every usable document in order; `bad(where, reason)` is told of each malformed row."""
        known = set(domains)
        for reader in self._readers:
            for doc in reader(bad):
                if doc.domain not in known:
                    bad(doc.where, f"unknown domain label {doc.domain!r} (known: {domains})")
                    continue
                yield doc

    def domains(self, bad: Callable[[str, str], None]) -> list[str]:
        """The domains, in order: as given, or every label the rows carry (sorted)."""
        if self._domains is not None:
            if not self._domains or len(set(self._domains)) != len(self._domains):
                raise CorpusError(f"domains: expected distinct domain names, got {self._domains}")
            return list(self._domains)
        labels = {doc.domain for reader in self._readers for doc in reader(lambda where, reason: None)}
        if not labels:
            raise CorpusError("the corpus has no usable rows, so no domains")
        return sorted(labels)


def _check_file(path, labelled: bool) -> Path:
    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"{path}: no such file")
    if not os.access(path, os.R_OK):
        raise CorpusError(f"{path}: cannot be read (permission denied)")
    kind = path.suffix.lower()
    if kind not in TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES:
        raise CorpusError(f"{path}: unsupported file type {kind or '(none)'!r}; expected .txt, .jsonl or .parquet")
    if kind in TEXT_SUFFIXES and not labelled:
        raise CorpusError(f"{path}: a text file carries no domain label; pass files as {{domain: [paths]}}")
    return path


def _file_reader(path: Path, kind: str, domain, text_field, domain_field, separator) -> Callable:
    if kind in TEXT_SUFFIXES:
        return lambda bad: _read_text(path, domain, separator, bad)
    if kind in JSONL_SUFFIXES:
        return lambda bad: _read_jsonl(path, domain, text_field, domain_field, bad)
    return lambda bad: _read_parquet(path, domain, text_field, domain_field, bad)


def _read_text(path: Path, domain: str, separator: str | None, bad) -> Iterator[Document]:
    with open(path, "rb") as f:
        lines, start = [], 1
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                bad(f"{path}:{n}", "not valid UTF-8 (the rest of the file is skipped)")
                return
            if separator is not None and line.rstrip("\r\n") == separator:
                yield Document("".join(lines)[:-1], domain, f"{path}:{start}")  # its last newline is the separator's
                lines, start = [], n + 1
            else:
                lines.append(line)
        yield Document("".join(lines), domain, f"{path}:{start}")


def _read_jsonl(path: Path, domain, text_field, domain_field, bad) -> Iterator[Document]:
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            where = f"{path}:{n}"
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                bad(where, "not valid UTF-8")
                continue
            except json.JSONDecodeError as e:
                bad(where, f"not valid JSON ({e.msg} at column {e.colno})")
                continue
            yield from _row_document(row, domain, text_field, domain_field, where, bad)


def _read_parquet(path: Path, domain, text_field, domain_field, bad) -> Iterator[Document]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise CorpusError(f"{path}: not a readable Parquet file ({e})") from e
    columns = [text_field] + ([domain_field] if domain is None else [])
    missing = [c for c in columns if c not in pf.schema_arrow.names]
    if missing:
        raise CorpusError(f"{path}: no column {missing[0]!r} (columns: {pf.schema_arrow.names})")
    n = 0
    for batch in pf.iter_batches(batch_size=1024, columns=columns):
        for row in batch.to_pylist():
            n += 1
            yield from _row_document(row, domain, text_field, domain_field, f"{path}: row {n}", bad)


def _row_document(row, domain, text_field, domain_field, where, bad) -> Iterator[Document]:
    if not isinstance(row, dict):
        bad(where, f"expected an object with a {text_field!r} field, got {type(row).__name__}")
        return
    text = row.get(text_field)
    label = domain if domain is not None else row.get(domain_field)
    if not isinstance(text, str):
        bad(where, f"field {text_field!r} is missing or not a string")
    elif not isinstance(label, str):
        bad(where, f"field {domain_field!r} is missing or not a string")
    else:
        yield Document(text, label, where)


# ------------------------------------------------------------------------------------ batches
@dataclass
class Batch:
    """Chunks packed into one forward pass, right-padded."""

    ids: torch.Tensor  # (B, S) token ids, padding after each row's length
    lengths: torch.Tensor  # (B,) real tokens per row
    domains: torch.Tensor  # (B,) domain index per row
    documents: torch.Tensor  # (B,) document index (corpus order) per row
    starts: torch.Tensor  # (B,) position of the row's first token in its document


@dataclass
class Report:
    """What the reading found: documents used, skipped and why."""

    documents: int = 0
    empty_documents: int = 0
    skipped_rows: int = 0
    skipped: list = field(default_factory=list)  # [(where, reason)], the first MAX_REPORTED_ROWS
    chunks: int = 0
    tokens: int = 0
    batches: int = 0
    shards: int = 0
    resumed_shards: int = 0


def _batches(corpus: Corpus, tokenizer, domains: list[str], context: int, batch_size: int, pad_id: int,
             report: Report, bad) -> Iterator[Batch]:
    index = {d: i for i, d in enumerate(domains)}
    rows = []
    for doc in corpus.documents(domains, bad):
        if not doc.text.strip():
            report.empty_documents += 1  # stated behaviour: skipped and counted, not an error
            continue
        ids = tokenizer.encode(doc.text)
        for start in range(0, len(ids), context):
            rows.append((ids[start:start + context], index[doc.domain], report.documents, start))
            report.chunks += 1
            report.tokens += len(rows[-1][0])
            if len(rows) == batch_size:
                yield _pack(rows, pad_id)
                rows = []
        report.documents += 1
    if rows:
        yield _pack(rows, pad_id)


def _pack(rows, pad_id: int) -> Batch:
    S = max(len(r[0]) for r in rows)
    ids = torch.full((len(rows), S), pad_id, dtype=torch.long)
    for b, (chunk, *_) in enumerate(rows):
        ids[b, :len(chunk)] = torch.tensor(chunk, dtype=torch.long)
    lengths, domains, documents, starts = (torch.tensor(col, dtype=torch.long) for col in
                                           zip(*[(len(r[0]), r[1], r[2], r[3]) for r in rows]))
    return Batch(ids, lengths, domains, documents, starts)


def _shards(batches: Iterator[Batch], shard_batches: int) -> Iterator[tuple[int, list[Batch], str]]:
    """(index, batches, digest of their inputs) for each run of `shard_batches` batches."""
    shard, index = [], 0
    for batch in batches:
        shard.append(batch)
        if len(shard) == shard_batches:
            yield index, shard, _digest(shard)
            shard, index = [], index + 1
    if shard:
        yield index, shard, _digest(shard)


def _digest(batches: list[Batch]) -> str:
    h = hashlib.sha256()
    for b in batches:
        for t in (b.ids, b.lengths, b.domains, b.documents, b.starts):
            h.update(str(tuple(t.shape)).encode())
            h.update(t.numpy().tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------------ one shard
@dataclass
class Spec:
    """Everything a worker needs to analyse shards besides the model (sent once to each Ray actor)."""

    layers: int
    experts: int
    domains: int
    vocab: int
    bins: int
    coactivation_top: int
    opt_out: list[int]  # experts whose opted-out loss is measured
    records: bool
    byte_lengths: torch.Tensor  # (vocab,) UTF-8 bytes per token id

    def empty(self) -> dict[str, torch.Tensor]:
        L, E, D, V = self.layers, self.experts, self.domains, self.vocab
        z = lambda *shape: torch.zeros(shape, dtype=torch.long)  # noqa: E731
        nats = torch.full((1 + E, D), float("nan"), dtype=torch.float64)
        nats[[0] + [1 + e for e in self.opt_out]] = 0.0  # row 0: all experts; row 1 + e: without expert e
        return {"topk": z(L, D, E), "top1": z(L, D, E), "hist": z(L, D, E, self.bins), "coact": z(L, E, E),
                "transitions": z(max(L - 1, 0), E, E), "vocab": z(L, V, E), "nats": nats, "bytes": z(D),
                "predicted": z(D), "tokens": z(D), "chunks": z(D)}


@torch.inference_mode()
def analyze_shard(model, batches: list[Batch], spec: Spec, on_batch: Callable[[int], None] | None = None
                  ) -> dict[str, torch.Tensor]:
    """The counts and loss sums of a few batches (summed over shards by the engines)."""
    part = spec.empty()
    if spec.records:
        part["records"] = []
    for batch in batches:
        _analyze_batch(model, batch, spec, part)
        if on_batch is not None:
            on_batch(int(batch.lengths.sum()))
    if spec.records:
        part.update({k: torch.cat(v) for k, v in zip(("rec_document", "rec_position", "rec_token", "rec_domain",
                                                      "rec_top1", "rec_nats"), zip(*part.pop("records")))})
    return part


def _analyze_batch(model, batch: Batch, spec: Spec, part: dict) -> None:
    E, D, V, nb = spec.experts, spec.domains, spec.vocab, spec.bins
    ids = batch.ids.to(model.device)
    B, S = ids.shape
    with trace(model, attention=False, routing=True) as tr:
        logits = model(ids).logits  # (B, S, V)
    routing = tr.routing
    valid = (torch.arange(S)[None] < batch.lengths[:, None]).reshape(-1)  # (B*S,) real tokens, batch-major
    dom = batch.domains.repeat_interleave(S)[valid]  # (T,)
    tok = batch.ids.reshape(-1)[valid]
    T = tok.numel()
    part["tokens"] += torch.bincount(dom, minlength=D)
    part["chunks"] += torch.bincount(batch.domains, minlength=D)
    tops, previous = [], None
    for layer in range(spec.layers):
        record = routing[layer]
        topk = record.topk_indices[valid].long()  # (T, k)
        top1 = topk[:, 0]
        tops.append(top1)
        part["topk"][layer] += torch.bincount((dom[:, None] * E + topk).reshape(-1), minlength=D * E).view(D, E)
        part["top1"][layer] += torch.bincount(dom * E + top1, minlength=D * E).view(D, E)
        bins = (record.probs[valid].float() * nb).long().clamp_(max=nb - 1)  # (T, E)
        key = (dom[:, None] * E + torch.arange(E)[None]) * nb + bins  # (T, E): (domain, expert, bin)
        part["hist"][layer] += torch.bincount(key.reshape(-1), minlength=D * E * nb).view(D, E, nb)
        chosen = torch.zeros(T, E, dtype=torch.float64).scatter_(1, topk[:, :spec.coactivation_top], 1.0)
        part["coact"][layer] += (chosen.T @ chosen).round().long()  # (E, E), exact integers in float64
        part["vocab"][layer] += torch.bincount(tok * E + top1, minlength=V * E).view(V, E)
        if previous is not None:
            part["transitions"][layer - 1] += torch.bincount(previous * E + top1, minlength=E * E).view(E, E)
        previous = top1
    # Loss: position s predicts token s + 1 of the same chunk.
    predicted = (torch.arange(1, S)[None] < batch.lengths[:, None])  # (B, S-1)
    pdom = batch.domains[:, None].expand(B, S - 1)[predicted]
    target = batch.ids[:, 1:]
    part["predicted"] += torch.bincount(pdom, minlength=D)
    part["bytes"] += torch.zeros(D, dtype=torch.long).index_add_(0, pdom, spec.byte_lengths[target[predicted]])
    nats = _token_nats(logits, ids)  # (B, S-1)
    part["nats"][0] += torch.zeros(D, dtype=torch.float64).index_add_(0, pdom, nats[predicted].double())
    for e in spec.opt_out:
        with experts_off(model, [e]):
            off = _token_nats(model(ids).logits, ids)
        part["nats"][1 + e] += torch.zeros(D, dtype=torch.float64).index_add_(0, pdom, off[predicted].double())
    if spec.records:
        positions = (batch.starts[:, None] + torch.arange(S)[None]).reshape(-1)[valid]
        token_nats = torch.cat([torch.full((B, 1), float("nan")), nats], dim=1).reshape(-1)[valid]
        part["records"].append((batch.documents.repeat_interleave(S)[valid], positions, tok, dom,
                                torch.stack(tops, dim=1).to(torch.int16), token_nats.float()))


def _token_nats(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(B, S-1) cross-entropy of each next token, one row at a time (an fp32 copy of one row's logits)."""
    return torch.stack([F.cross_entropy(logits[b, :-1].float(), ids[b, 1:], reduction="none")
                        for b in range(ids.shape[0])]).cpu()


def merge(total: dict[str, torch.Tensor] | None, part: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """total + part (shards are merged in index order, so float sums round the same way every run)."""
    if total is None:
        return {k: v.clone() for k, v in part.items() if not k.startswith("rec_")}
    for k, v in part.items():
        if not k.startswith("rec_"):
            total[k] += v
    return total


# ------------------------------------------------------------------------------------ shard stores
class _MemoryStore:
    """Shards summed in index order as they arrive (no out_dir): nothing to resume."""

    def __init__(self):
        self.total, self._pending, self._next = None, {}, 0

    def done(self, index: int, digest: str) -> bool:
        return False

    def put(self, index: int, part: dict, digest: str) -> None:
        self._pending[index] = part
        while self._next in self._pending:
            self.total = merge(self.total, self._pending.pop(self._next))
            self._next += 1

    def merged(self, count: int, spec: Spec) -> dict:
        return self.total if self.total is not None else spec.empty()


class _DiskStore:
    """Shards as safetensors files under out_dir/shards, each written atomically; resumable."""

    def __init__(self, out_dir: Path, job: dict, resume: bool):
        self.dir, self.shards = out_dir, out_dir / "shards"
        job_file = out_dir / "job.json"
        if job_file.exists() and resume:
            previous = json.loads(job_file.read_text())
            if previous != job:
                differs = sorted(k for k in set(job) | set(previous) if job.get(k) != previous.get(k))
                raise CorpusError(f"{out_dir} holds shards of another job ({', '.join(differs)} differ); pass a "
                                  f"fresh out_dir, or resume=False to start over")
        elif not resume:
            for sub in ("shards", "records"):
                shutil.rmtree(out_dir / sub, ignore_errors=True)
        self.shards.mkdir(parents=True, exist_ok=True)
        for stale in self.shards.glob("*.tmp"):  # a shard being written when the job stopped: never a result
            stale.unlink()
        _write_atomic(job_file, json.dumps(job, indent=1, sort_keys=True).encode())

    def path(self, index: int) -> Path:
        return self.shards / f"shard-{index:06d}.safetensors"

    def done(self, index: int, digest: str) -> bool:
        path = self.path(index)
        if not path.exists():
            return False
        with safetensors.safe_open(str(path), "pt") as f:
            stored = f.metadata().get("digest")
        if stored != digest:
            raise CorpusError(f"{path} was computed from other input batches than this corpus gives; pass a fresh "
                              f"out_dir, or resume=False to start over")
        return True

    def put(self, index: int, part: dict, digest: str) -> None:
        tensors = {k: v.contiguous() for k, v in part.items() if not k.startswith("rec_")}
        vocab = tensors.pop("vocab")  # (L, V, E): only the ids this shard saw are stored
        seen = vocab.sum(dim=(0, 2)).nonzero().flatten()
        tensors["vocab_ids"], tensors["vocab_counts"] = seen, vocab[:, seen].contiguous()
        tensors["vocab_size"] = torch.tensor([vocab.shape[1]])
        if "rec_token" in part:
            _write_records(self.dir / "records" / f"shard-{index:06d}.parquet", part)
        tmp = self.path(index).with_suffix(".tmp")
        safetensors.torch.save_file(tensors, str(tmp), metadata={"digest": digest})
        os.replace(tmp, self.path(index))

    def merged(self, count: int, spec: Spec) -> dict:
        total = spec.empty()
        for index in range(count):
            part = safetensors.torch.load_file(str(self.path(index)))
            vocab = torch.zeros(part["vocab_counts"].shape[0], int(part.pop("vocab_size")), spec.experts,
                                dtype=torch.long)
            vocab[:, part.pop("vocab_ids")] = part.pop("vocab_counts")
            part["vocab"] = vocab
            total = merge(total, part)
        return total


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _write_records(path: Path, part: dict) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = {"document": part["rec_document"], "position": part["rec_position"], "token_id": part["rec_token"],
               "domain": part["rec_domain"], "nats": part["rec_nats"]}
    columns.update({f"top1_layer{l}": part["rec_top1"][:, l] for l in range(part["rec_top1"].shape[1])})
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(pa.table({k: v.numpy() for k, v in columns.items()}), tmp)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------ the driver
def analyze(model, tokenizer, corpus: Corpus, config: CorpusConfig | None = None, *, out_dir=None,
            resume: bool = True, engine: str = "inprocess", progress: bool = True,
            **ray_options) -> "CorpusResult":
    """Analyse every document of `corpus`; returns a CorpusResult (and writes it to `out_dir` if given).

    model: a FlexOlmo `OlmoModel`, or (Ray engine) a checkpoint path that every worker loads itself.
    out_dir: shards, job description and the final tables (Parquet); an interrupted job resumes from the
        shards there unless resume=False.
    engine: "inprocess" (default) or "ray"; ray_options go to `olmo_lab.corpus_ray.run` (address, workers,
        cpus_per_worker, gpus_per_worker, max_retries, model_kwargs, init_kwargs).
    """
    config = config or CorpusConfig()
    if engine not in ENGINES:
        raise CorpusError(f"engine: expected 'inprocess' or 'ray', got {engine!r}")
    if ray_options and engine != "ray":
        raise CorpusError(f"{', '.join(sorted(ray_options))}: options of the Ray engine (engine='ray')")
    if not isinstance(corpus, Corpus):
        raise CorpusError(f"corpus: expected an olmo_lab.corpus.Corpus, got {type(corpus).__name__}")
    model_config = _model_config(model, engine)
    if not model_config.is_moe:
        raise CorpusError(f"routing analysis needs a FlexOlmo (MoE) model; this is a dense {model_config.model_type}")
    context = config.check(model_config.max_position_embeddings)
    if config.records and out_dir is None:
        raise CorpusError("records=True writes one row per token to out_dir/records: pass out_dir")
    report = Report()

    def bad(where: str, reason: str) -> None:
        if config.on_bad_row == "raise":
            raise CorpusError(f"{where}: {reason} (on_bad_row='skip' skips such rows)")
        report.skipped_rows += 1
        if len(report.skipped) < MAX_REPORTED_ROWS:
            report.skipped.append((where, reason))

    domains = corpus.domains(bad)
    spec = _spec(model_config, model, tokenizer, config, len(domains))
    job = {"config": asdict(config), "context": context, "domains": domains, "corpus": corpus.description,
           "model": _model_fingerprint(model, model_config), "tokenizer": _tokenizer_fingerprint(tokenizer)}
    out = Path(out_dir) if out_dir is not None else None
    store = _DiskStore(out, job, resume) if out is not None else _MemoryStore()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    shards = _counted(_shards(_batches(corpus, tokenizer, domains, context, config.batch_size, pad, report, bad),
                              config.shard_batches), report, store)
    bar = tqdm(unit="tok", unit_scale=True, desc=f"corpus ({engine})", disable=not progress)
    try:
        if engine == "ray":
            from . import corpus_ray
            workers, retries = corpus_ray.run(model, shards, spec, store, bar, **ray_options)
        else:
            workers, retries = 1, 0
            for index, batches, digest in shards:
                store.put(index, analyze_shard(model, batches, spec, on_batch=bar.update), digest)
    finally:
        bar.close()
    totals = store.merged(report.shards, spec)
    result = CorpusResult.build(totals, spec, model_config, tokenizer, domains, config, report,
                                {"engine": engine, "workers": workers, "retries": retries, "context": context})
    if out is not None:
        result.save(out)
    return result


def _counted(shards, report: Report, store) -> Iterator:
    """Shards still to compute; ones already on disk (same inputs) are counted as resumed."""
    for index, batches, digest in shards:
        report.batches += len(batches)
        report.shards = index + 1
        if store.done(index, digest):
            report.resumed_shards += 1
            continue
        yield index, batches, digest


def _model_config(model, engine: str):
    from ..modeling.config import OlmoConfig
    from ..modeling.model import OlmoModel
    if isinstance(model, OlmoModel):
        return model.config
    if engine == "ray" and isinstance(model, (str, os.PathLike)):
        path = Path(model) / "config.json"
        if not path.is_file():
            raise CorpusError(f"model: {model} is not a checkpoint directory (no config.json)")
        return OlmoConfig.from_json(path)
    raise CorpusError(f"model: expected an OlmoModel{' or a checkpoint path' if engine == 'ray' else ''}, "
                      f"got {type(model).__name__}")


def _spec(model_config, model, tokenizer, config: CorpusConfig, domains: int) -> Spec:
    from ..modeling.model import OlmoModel
    E, k = model_config.num_experts, model_config.num_experts_per_tok
    top = config.coactivation_top or (k if k < E else min(2, E))
    if isinstance(top, bool) or not isinstance(top, int) or not 1 <= top <= min(k, E):
        raise CorpusError(f"coactivation_top: expected 1..{min(k, E)} (the model's top-k), got {top!r}")
    if tokenizer.max_token_id >= model_config.vocab_size:
        raise CorpusError(f"the tokenizer's ids reach {tokenizer.max_token_id}, beyond the model's vocabulary of "
                          f"{model_config.vocab_size}")
    lengths = torch.zeros(model_config.vocab_size, dtype=torch.long)
    table = token_byte_lengths(tokenizer)
    lengths[:table.numel()] = table
    opt_out = []
    if config.opt_out_loss:
        toggles = model.experts.snapshot() if isinstance(model, OlmoModel) else {}
        off = set().union(*(o | d for o, d in toggles.values())) if toggles else set()
        opt_out = [e for e in range(E) if e not in off and len(off | {e}) < E]  # one expert must stay on
    return Spec(model_config.num_hidden_layers, E, domains, model_config.vocab_size, config.bins, top, opt_out,
                config.records, lengths)


def _model_fingerprint(model, model_config) -> dict:
    """The model's config and toggles, and a hash of a sample of every tensor (cheap, and catches other weights)."""
    from ..modeling.model import OlmoModel
    if not isinstance(model, OlmoModel):
        return {"path": str(Path(model).resolve()), "config": model_config.to_dict()}
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().reshape(-1)[:64].float().cpu().numpy().tobytes())
    toggles = {str(li): [sorted(o), sorted(d)] for li, (o, d) in model.experts.snapshot().items()}
    return {"config": model_config.to_dict(), "weights": h.hexdigest(), "toggles": toggles}


def _tokenizer_fingerprint(tokenizer) -> str:
    return hashlib.sha256(tokenizer.backend.to_str().encode()).hexdigest()


# ------------------------------------------------------------------------------------ the result
TABLES = ("routing", "histograms", "coactivation", "consistency", "vocabulary", "specific_tokens", "loss")


@dataclass
class CorpusResult:
    """Tidy tables (pandas DataFrames) of one corpus analysis, and the reading report."""

    routing: pd.DataFrame  # layer, domain, expert: tokens routed (top-1 / top-k) and their shares
    histograms: pd.DataFrame  # layer, domain, expert, bin: tokens whose routing weight falls in the bin
    coactivation: pd.DataFrame  # layer, expert, other: tokens choosing both, and P(other | expert)
    consistency: pd.DataFrame  # layer, next_layer, expert, next_expert: top-1 transitions
    vocabulary: pd.DataFrame  # layer, token_id, expert: share of the id's occurrences routed (top-1) there
    specific_tokens: pd.DataFrame  # layer, expert, rank: the ids most specific to the expert
    loss: pd.DataFrame  # domain, removed: bits per byte with all experts and with each opted out
    report: dict

    @classmethod
    def build(cls, t: dict, spec: Spec, model_config, tokenizer, domains: list[str], config: CorpusConfig,
              report: Report, run: dict) -> "CorpusResult":
        names = list(model_config.expert_names)
        L, E, D = spec.layers, spec.experts, spec.domains
        k = min(model_config.num_experts_per_tok, E)
        grid = pd.MultiIndex.from_product([range(L), domains, names], names=["layer", "domain", "expert"])
        domain_tokens = t["tokens"].repeat_interleave(E).repeat(L)  # (L*D*E,) in grid order
        routing = pd.DataFrame({"tokens_top1": t["top1"].reshape(-1).numpy(), "tokens_topk": t["topk"].reshape(-1).numpy(),
                                "domain_tokens": domain_tokens.numpy()}, index=grid).reset_index()
        with_tokens = routing.domain_tokens.where(routing.domain_tokens > 0)
        routing["share_top1"] = routing.tokens_top1 / with_tokens
        routing["share_topk"] = routing.tokens_topk / with_tokens
        edges = torch.linspace(0, 1, spec.bins + 1).tolist()
        hist = pd.DataFrame({"tokens": t["hist"].reshape(-1).numpy()}, index=pd.MultiIndex.from_product(
            [range(L), domains, names, range(spec.bins)], names=["layer", "domain", "expert", "bin"])).reset_index()
        hist["weight_low"] = hist["bin"].map(lambda b: edges[b])
        hist["weight_high"] = hist["bin"].map(lambda b: edges[b + 1])
        coact = pd.DataFrame({"both": t["coact"].reshape(-1).numpy()}, index=pd.MultiIndex.from_product(
            [range(L), names, names], names=["layer", "expert", "other"])).reset_index()
        diagonal = t["coact"].diagonal(dim1=1, dim2=2)  # (L, E) tokens choosing each expert at all
        coact["expert_tokens"] = diagonal.repeat_interleave(E, dim=1).reshape(-1).numpy()
        coact["share"] = coact.both / coact.expert_tokens.where(coact.expert_tokens > 0)
        coact = coact[coact.expert != coact.other].reset_index(drop=True)
        consistency = pd.DataFrame({"tokens": t["transitions"].reshape(-1).numpy()}, index=pd.MultiIndex.from_product(
            [range(L - 1), names, names], names=["layer", "expert", "next_expert"])).reset_index()
        consistency.insert(1, "next_layer", consistency.layer + 1)
        vocabulary, specific = _vocabulary_tables(t["vocab"], names, tokenizer, config)
        loss = _loss_table(t, spec, names, domains)
        rep = asdict(report) | run | {"domains": domains, "experts": names, "top_k": k,
                                      "coactivation_top": spec.coactivation_top, "min_token_count": config.min_token_count}
        return cls(routing, hist, coact, consistency, vocabulary, specific, loss, rep)

    # ------------------------------------------------------------------ views
    def domain_specialization(self, top: str = "k") -> pd.DataFrame:
        """(layer, domain) x expert: OLMoE's domain specialization, with top="k" (the model's top-k) or "1"."""
        column = {"k": "share_topk", "1": "share_top1"}[str(top)]
        return self.routing.pivot_table(index=["layer", "domain"], columns="expert", values=column, sort=False)

    def vocabulary_specialization(self) -> pd.DataFrame:
        """layer x expert: mean share of the ids each expert is the most frequent top-1 expert of ("all": every id)."""
        ids = self.vocabulary[self.vocabulary.is_top & (self.vocabulary.occurrences >= self.report["min_token_count"])]
        per_expert = ids.pivot_table(index="layer", columns="expert", values="share", aggfunc="mean")
        per_expert = per_expert.reindex(columns=[e for e in self.report["experts"] if e in per_expert.columns])
        per_expert["all"] = ids.groupby("layer").share.mean()
        return per_expert

    def coactivation_matrix(self, layer: int) -> pd.DataFrame:
        """expert x other at one layer: of the tokens choosing the row expert, the share also choosing the column."""
        experts = self.report["experts"]
        c = self.coactivation[self.coactivation.layer == layer]
        return c.pivot_table(index="expert", columns="other", values="share").reindex(index=experts, columns=experts)

    def routing_consistency(self) -> pd.Series:
        """Per layer pair: share of tokens whose top-1 expert is the same at the next layer."""
        c = self.consistency
        same = c[c.expert == c.next_expert].groupby(["layer", "next_layer"]).tokens.sum()
        return (same / c.groupby(["layer", "next_layer"]).tokens.sum()).rename("same_expert")

    def summary(self) -> str:
        """The numbers the plots show, as text."""
        r = self.report
        lines = [f"{r['documents']} documents ({r['empty_documents']} empty, {r['skipped_rows']} rows skipped), "
                 f"{r['tokens']} tokens in {r['chunks']} chunks, {r['batches']} batches, {r['shards']} shards "
                 f"({r['resumed_shards']} resumed); engine {r['engine']} with {r['workers']} worker(s), "
                 f"{r['retries']} shard(s) retried"]
        top1 = self.domain_specialization("1")
        lines.append("domain specialization, top-1 (share of the domain's tokens whose first expert is ...):")
        lines.append(top1.to_string(float_format=lambda v: f"{v:.2f}"))
        lines.append("routing consistency (same top-1 expert at the next layer):")
        lines += [f"  layer {a} -> {b}: {v:.2f}" for (a, b), v in self.routing_consistency().items()]
        lines.append("vocabulary specialization (mean top-1 share of each id's most frequent expert):")
        lines.append(self.vocabulary_specialization().to_string(float_format=lambda v: f"{v:.2f}"))
        lines.append("loss, bits per byte (all experts, and with each expert opted out):")
        lines.append(self.loss_table().to_string(float_format=lambda v: f"{v:.3f}"))
        return "\n".join(lines)

    def loss_table(self) -> pd.DataFrame:
        """domain x (all experts, without each expert): bits per byte."""
        return self.loss.pivot_table(index="domain", columns="experts", values="bits_per_byte", sort=False)

    def specific_tokens_table(self, layer: int, top: int = 8) -> str:
        """Text: per expert, the ids most specific to it at `layer`, with their top-1 share and count."""
        s = self.specific_tokens[(self.specific_tokens.layer == layer) & (self.specific_tokens["rank"] < top)]
        lines = []
        for expert, rows in s.groupby("expert", sort=False):
            items = "  ".join(f"{tok!r} {share:.0%} ({n})" for tok, share, n in
                              zip(rows.token, rows.share, rows.occurrences))
            lines.append(f"{expert:>12}: {items}")
        return "\n".join(lines)

    # ------------------------------------------------------------------ files
    def save(self, directory) -> None:
        """Every table as Parquet plus report.json, each written atomically (report.json last)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name in TABLES:
            tmp = directory / f"{name}.parquet.tmp"
            getattr(self, name).to_parquet(tmp, index=False)
            os.replace(tmp, directory / f"{name}.parquet")
        _write_atomic(directory / "report.json", json.dumps(self.report, indent=1).encode())

    @classmethod
    def load(cls, directory) -> "CorpusResult":
        """A result written by `save` (Parquet and JSON only: nothing executable is read)."""
        directory = Path(directory)
        if not (directory / "report.json").is_file():
            raise CorpusError(f"{directory}: no finished corpus analysis (report.json is written last)")
        tables = {name: pd.read_parquet(directory / f"{name}.parquet") for name in TABLES}
        return cls(**tables, report=json.loads((directory / "report.json").read_text()))


def _vocabulary_tables(vocab: torch.Tensor, names: list[str], tokenizer, config: CorpusConfig):
    L, V, E = vocab.shape
    occurrences = vocab.sum(dim=2)  # (L, V)
    layer, token_id, expert = (vocab > 0).nonzero(as_tuple=True)
    counts = vocab[layer, token_id, expert]
    total = occurrences[layer, token_id]
    top_expert = vocab.argmax(dim=2)  # (L, V) ties: the lowest index
    ids = sorted(set(token_id.tolist()))
    text = dict(zip(ids, tokenizer.token_strings(ids))) if ids else {}
    table = pd.DataFrame({"layer": layer.numpy(), "token_id": token_id.numpy(),
                          "token": [text[i] for i in token_id.tolist()],
                          "expert": [names[e] for e in expert.tolist()], "tokens": counts.numpy(),
                          "occurrences": total.numpy(), "share": (counts.double() / total.double()).numpy(),
                          "is_top": (top_expert[layer, token_id] == expert).numpy()})
    top = table[table.is_top & (table.occurrences >= config.min_token_count)]
    top = top.sort_values(["layer", "expert", "share", "occurrences", "token_id"],
                          ascending=[True, True, False, False, True], kind="stable")
    top = top.groupby(["layer", "expert"], sort=False).head(config.top_tokens).copy()
    top["rank"] = top.groupby(["layer", "expert"]).cumcount()
    order = {n: i for i, n in enumerate(names)}
    top = top.sort_values(["layer", "expert", "rank"], key=lambda c: c.map(order) if c.name == "expert" else c)
    specific = top[["layer", "expert", "rank", "token_id", "token", "occurrences", "share"]].reset_index(drop=True)
    return table, specific


def _loss_table(t: dict, spec: Spec, names: list[str], domains: list[str]) -> pd.DataFrame:
    rows = []
    for r, label in enumerate(["all experts"] + [f"without {n}" for n in names]):
        if r and (r - 1) not in spec.opt_out:
            continue
        for d, domain in enumerate(domains):
            nats, n_bytes = float(t["nats"][r, d]), int(t["bytes"][d])
            bpb = nats / math.log(2) / n_bytes if n_bytes else float("nan")
            rows.append({"domain": domain, "experts": label, "removed": names[r - 1] if r else None,
                         "predicted_tokens": int(t["predicted"][d]), "bytes": n_bytes, "nats": nats,
                         "bits_per_byte": bpb})
    loss = pd.DataFrame(rows)
    base = loss[loss.removed.isna()].set_index("domain").bits_per_byte
    loss["delta_bits_per_byte"] = loss.bits_per_byte - loss.domain.map(base)
    return loss

