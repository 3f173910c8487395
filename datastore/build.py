"""`datastore build`: read -> chunk -> dedup -> embed -> shard -> write -> index.

Resumable by construction: reading, chunking, dedup and id assignment are deterministic
and cheap, so a rerun replays them and skips the passages whose id is already committed
in its shard; only the missing ones are embedded and written. Each batch is one LMDB
transaction per shard, so a SIGKILL leaves whole batches only.

The three stages overlap: a thread prepares batches (read, chunk, dedup), the caller's
thread runs the encoder (torch releases the GIL), and a thread writes to LMDB.
"""

from __future__ import annotations

import platform
import queue
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from datastore import __version__
from datastore.chunking import ChunkConfig, chunk_words
from datastore.control import ControlStore
from datastore.dedup import DedupConfig, Deduplicator
from datastore.encoder import DEFAULT_MODEL, Encoder
from datastore.errors import AlreadyExists, InvalidArgument, NotFound
from datastore.indexing import build_shard
from datastore.manifest import (
    MANIFEST,
    ChunkingInfo,
    DedupInfo,
    IndexInfo,
    Manifest,
    ModelInfo,
    new_datastore_id,
    shard_dir,
)
from datastore.progress import BuildProgress
from datastore.readers import ReadStats, check_inputs, count_documents, iter_documents
from datastore.records import VECTOR_DTYPES, Passage
from datastore.shard import Shard
from datastore.sharding import shard_of
from index import INDEX_KINDS
from index.registry import validate_params


@dataclass
class BuildConfig:
    inputs: list[str]
    out: Path
    model: str = DEFAULT_MODEL
    chunk: ChunkConfig = field(default_factory=ChunkConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    shards: int = 1
    vector_dtype: Literal["float16", "float32"] = "float16"
    index_kind: str = "flat"
    metric: Literal["ip", "l2"] = "ip"
    index_params: dict[str, Any] = field(default_factory=dict)
    #: Precomputed vectors (.npy, one row per input record, in order): no encoder, no chunking.
    embeddings: Path | None = None
    batch_passages: int = 256
    skip_bad_lines: bool = False
    limit_docs: int | None = None
    seed: int = 0
    device: str | None = None
    progress: bool = True
    #: Ray cluster address ("local" starts one in-process): embed on an actor pool there.
    ray: str | None = None
    embed_actors: int = 1
    gpus_per_actor: float = 0.0
    #: Batches sent to Ray Data at once (one actor pool per window).
    ray_window: int = 256

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if self.shards < 1:
            raise InvalidArgument.field("shards", f"must be >= 1, got {self.shards}")
        if self.vector_dtype not in VECTOR_DTYPES:
            raise InvalidArgument.field("vector_dtype", f"must be one of {sorted(VECTOR_DTYPES)}")
        if self.index_kind not in INDEX_KINDS:
            raise InvalidArgument.field("index", f"unknown kind {self.index_kind!r}; known: {sorted(INDEX_KINDS)}")
        try:
            validate_params(self.index_kind, self.index_params)
        except ValueError as e:
            raise InvalidArgument.field("index_params", str(e)) from None
        if self.metric not in ("ip", "l2"):
            raise InvalidArgument.field("metric", f"must be 'ip' or 'l2', got {self.metric!r}")
        if self.batch_passages < 1:
            raise InvalidArgument.field("batch_passages", "must be >= 1")
        if self.embed_actors < 1:
            raise InvalidArgument.field("embed_actors", "must be >= 1")
        if self.gpus_per_actor < 0:
            raise InvalidArgument.field("gpus_per_actor", "must be >= 0")
        if self.limit_docs is not None and self.limit_docs < 1:
            raise InvalidArgument.field("limit_docs", "must be >= 1")


@dataclass
class BuildSummary:
    out: str
    documents: int = 0
    passages: int = 0
    exact_duplicates: int = 0
    near_duplicates: int = 0
    bad_lines: int = 0
    resumed_passages: int = 0
    embedded: int = 0
    shards: int = 0
    #: Model (or embeddings file) loading, kept out of `seconds` and the rates.
    load_seconds: float = 0.0
    seconds: float = 0.0
    encoder_seconds: float = 0.0
    index_seconds: float = 0.0
    already_built: bool = False

    @property
    def passages_per_s(self) -> float:
        return self.embedded / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["passages_per_s"] = round(self.passages_per_s, 2)
        return d


@dataclass
class _Batch:
    passages: list[Passage]
    rows: list[int]  # rows of the precomputed embeddings, when given
    todo: np.ndarray  # bool mask: not yet committed
    docs_done: int  # documents fully consumed when this batch is complete


def _new_manifest(cfg: BuildConfig, dim: int, revision: str) -> Manifest:
    return Manifest(
        model=ModelInfo(name=cfg.model, dim=dim, normalize=True, revision=revision),
        chunking=ChunkingInfo(cfg.chunk.words, cfg.chunk.overlap),
        dedup=DedupInfo(cfg.dedup.exact, cfg.dedup.near, cfg.dedup.threshold, cfg.dedup.ngram, cfg.dedup.num_perm),
        index=IndexInfo(cfg.index_kind, cfg.metric, dict(cfg.index_params)),
        num_shards=cfg.shards,
        vector_dtype=cfg.vector_dtype,
        datastore_id=new_datastore_id(),
        provenance={
            "inputs": [_describe_input(s) for s in cfg.inputs]
            + ([_describe_input(str(cfg.embeddings))] if cfg.embeddings else []),
            "limit_docs": cfg.limit_docs, "skip_bad_lines": cfg.skip_bad_lines, "seed": cfg.seed,
            "tool_version": __version__, "host": platform.node(), "python": platform.python_version(),
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
    )


def _describe_input(spec: str) -> dict[str, Any]:
    p = Path(spec)
    if p.is_file():
        st = p.stat()
        return {"path": str(p.resolve()), "bytes": st.st_size, "mtime": int(st.st_mtime)}
    return {"path": str(p.resolve()) if p.exists() else spec}


def _check_out_dir(cfg: BuildConfig, manifest: Manifest) -> Manifest | None:
    """The existing manifest when DIR holds this same build (to resume or reuse), None when
    DIR is free; AlreadyExists when it holds anything else."""
    if (cfg.out / MANIFEST).exists():
        existing = Manifest.load(cfg.out)
        key, other = manifest.build_key(), existing.build_key()
        if key == other:
            return existing
        diff = sorted(k for k in key if key[k] != other.get(k))
        if not existing.complete:
            raise AlreadyExists(f"{cfg.out} holds an interrupted build whose settings or inputs differ "
                                f"(in: {', '.join(diff)})",
                                hint="rerun with the original settings and inputs, or delete the directory")
        raise AlreadyExists(f"{cfg.out} holds another datastore (differs in: {', '.join(diff)})",
                            hint="choose another --out directory, or delete that one")
    # a manifest temp file alone is what a build killed while writing its first manifest leaves
    if cfg.out.exists() and any(p.name != MANIFEST + ".tmp" for p in cfg.out.iterdir()):
        raise AlreadyExists(f"{cfg.out} is not empty and holds no datastore",
                            hint="choose a new or empty --out directory")
    return None


def _passages(cfg: BuildConfig, stats: ReadStats, dedup: Deduplicator,
              num_rows: int | None) -> Iterator[tuple[Passage, int, int]]:
    """(passage, embeddings row or -1, documents consumed so far), deduplicated, with ids."""
    next_id = 0
    for doc in iter_documents(cfg.inputs, stats, cfg.skip_bad_lines, cfg.limit_docs):
        row = stats.documents + stats.bad_lines - 1  # records seen, skipped ones included
        if cfg.embeddings is not None:
            if num_rows is not None and row >= num_rows:
                raise InvalidArgument(f"{doc.origin}: more records than rows in {cfg.embeddings} ({num_rows})",
                                      hint="give one embedding row per input record")
            chunks = [doc.text]  # precomputed vectors fix the passages: one per record
        else:
            chunks = chunk_words(doc.text, cfg.chunk)
        for n, text in enumerate(chunks):
            if not text.strip() or not dedup.check(next_id, text):
                continue
            meta = dict(doc.metadata)
            if doc.doc_id is not None:
                meta["doc_id"] = doc.doc_id
            if len(chunks) > 1:
                meta["chunk"] = str(n)
            yield Passage(next_id, text, doc.title, doc.source, doc.tenants, meta), row, stats.documents
            next_id += 1


def _batches(cfg: BuildConfig, passages: Iterator[tuple[Passage, int, int]],
             shards: list[Shard]) -> Iterator[_Batch]:
    buf: list[tuple[Passage, int, int]] = []

    def flush() -> _Batch:
        ps = [p for p, _, _ in buf]
        ids = np.array([p.id for p in ps], np.int64)
        where = shard_of(ids, len(shards))
        todo = np.ones(len(ps), bool)
        for s, shard in enumerate(shards):
            sel = np.flatnonzero(where == s)
            if len(sel):
                todo[sel] = ~shard.contains(ids[sel])
        return _Batch(ps, [r for _, r, _ in buf], todo, buf[-1][2])

    for item in passages:
        buf.append(item)
        if len(buf) == cfg.batch_passages:
            yield flush()
            buf = []
    if buf:
        yield flush()


def _prefetch(it: Iterator, depth: int = 4) -> Iterator:
    """Run `it` in a background thread, `depth` items ahead; re-raise its errors here."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def run() -> None:
        try:
            for x in it:
                if stop.is_set():
                    return
                q.put(x)
            q.put(done)
        except BaseException as e:  # handed to the consumer
            q.put(e)

    t = threading.Thread(target=run, name="build-prepare", daemon=True)
    t.start()
    try:
        while True:
            x = q.get()
            if x is done:
                return
            if isinstance(x, BaseException):
                raise x
            yield x
    finally:
        stop.set()


def _windows(batches: Iterator[_Batch], size: int) -> Iterator[list[_Batch]]:
    window: list[_Batch] = []
    for b in batches:
        window.append(b)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


def _embedder(cfg: BuildConfig, encoder: Encoder | None, vectors_in: np.ndarray | None
              ) -> tuple[Callable[[list[_Batch]], list[np.ndarray]], int]:
    """(function giving the vectors of each batch's uncommitted passages, batches per call)."""
    def todo(b: _Batch) -> np.ndarray:
        return np.flatnonzero(b.todo)

    if vectors_in is not None:
        def precomputed(batches: list[_Batch]) -> list[np.ndarray]:
            out = []
            for b in batches:
                vecs = np.asarray(vectors_in[[b.rows[i] for i in todo(b)]], dtype=np.float32)
                _check_finite(vecs, cfg.embeddings)
                out.append(vecs)
            return out
        return precomputed, 1
    if encoder is not None:
        return (lambda batches: [encoder.encode([b.passages[i].embedding_input() for i in todo(b)])
                                 for b in batches]), 1
    from datastore.ray_build import RayEmbedder
    ray_embed = RayEmbedder(cfg.model, cfg.embed_actors, cfg.gpus_per_actor, cfg.device)
    return (lambda batches: ray_embed([[b.passages[i].embedding_input() for i in todo(b)] for b in batches]),
            cfg.ray_window)


def _write(shards: list[Shard], passages: list[Passage], vectors: np.ndarray) -> None:
    ids = np.array([p.id for p in passages], np.int64)
    where = shard_of(ids, len(shards))
    for s, shard in enumerate(shards):
        sel = np.flatnonzero(where == s)
        if len(sel):
            shard.put([passages[i] for i in sel], vectors[sel])


def build(cfg: BuildConfig, encoder_factory: Callable[[], Encoder] | None = None) -> BuildSummary:
    """Build (or resume, or reuse) the datastore that `cfg` describes."""
    t0 = time.perf_counter()
    check_inputs(cfg.inputs)
    manifest = _new_manifest(cfg, 0, "")
    existing = _check_out_dir(cfg, manifest)
    summary = BuildSummary(out=str(cfg.out), shards=cfg.shards)
    if existing is not None and existing.complete:  # reuse at once: no model load
        c = existing.counts
        summary.documents, summary.passages = c.get("documents", 0), c.get("passages", 0)
        summary.already_built = True
        return summary
    vectors_in: np.ndarray | None = None
    encoder: Encoder | None = None
    if cfg.embeddings is not None:
        vectors_in = _load_embeddings(Path(cfg.embeddings))
        manifest.model.dim, manifest.model.revision = int(vectors_in.shape[1]), "precomputed"
    elif cfg.ray is None:
        encoder = (encoder_factory or (lambda: Encoder(cfg.model, device=cfg.device)))()
        manifest.model.dim, manifest.model.revision = encoder.dim, encoder.revision
    else:
        from datastore.ray_build import init_ray, model_info
        init_ray(cfg.ray)
        manifest.model.dim, manifest.model.revision = model_info(cfg.model)
    summary.load_seconds = time.perf_counter() - t0
    dim = manifest.model.dim
    if vectors_in is not None and (records := count_documents(cfg.inputs)) != len(vectors_in):
        raise InvalidArgument(f"{len(vectors_in)} embedding rows for {records} records",
                              hint="give one embedding row per input record, in the same order")
    total_docs = count_documents(cfg.inputs, cfg.limit_docs)
    if existing is not None:
        manifest.provenance["started_at"] = existing.provenance.get("started_at")
        manifest.datastore_id = existing.datastore_id  # the shards are stamped with it
    created_dir = not cfg.out.exists()
    cfg.out.mkdir(parents=True, exist_ok=True)
    manifest.save(cfg.out)
    shards = [Shard(cfg.out / shard_dir(i), i, dim, cfg.vector_dtype, create=True) for i in range(cfg.shards)]
    stats = ReadStats()
    dedup = Deduplicator(cfg.dedup)
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="build-write")
    pending: list[Future] = []
    embed, window = _embedder(cfg, encoder, vectors_in)
    t_embed = 0.0
    tenants: set[str] = set()
    try:
        with BuildProgress(total_docs, enabled=cfg.progress) as progress:
            source = _passages(cfg, stats, dedup, None if vectors_in is None else len(vectors_in))
            for batches in _windows(_prefetch(_batches(cfg, source, shards)), window):
                t = time.perf_counter()
                vectors = embed(batches)
                t_embed += time.perf_counter() - t
                for batch, vecs in zip(batches, vectors):
                    tenants.update(t for p in batch.passages for t in p.tenants)
                    todo = np.flatnonzero(batch.todo)
                    summary.passages += len(batch.passages)
                    summary.resumed_passages += len(batch.passages) - len(todo)
                    if len(todo):
                        summary.embedded += len(todo)
                        while len(pending) >= 2:  # bound memory: at most two batches in flight
                            pending.pop(0).result()
                        pending.append(writer.submit(_write, shards, [batch.passages[i] for i in todo], vecs))
                    progress.update(batch.docs_done, summary.passages, len(todo))
            for f in pending:
                f.result()
            progress.update(stats.documents, summary.passages, 0)
    except BaseException:
        writer.shutdown(wait=True)
        if existing is None and sum(len(s) for s in shards) == 0:
            _remove_new_build(cfg.out, shards, created_dir)  # nothing committed: leave no trace
        raise
    finally:
        writer.shutdown(wait=True)
        for shard in shards:
            shard.close()
    control = ControlStore(cfg.out)  # the tenants the inputs name become registered tenants
    try:
        control.add_tenants(tenants)
    finally:
        control.close()
    t_index = time.perf_counter()
    _train_shared_binarizer(cfg, manifest)
    if cfg.ray is None:
        for i in range(cfg.shards):
            build_shard(cfg.out, i, cfg.seed)
    else:
        from datastore.ray_build import build_shards_on_ray
        build_shards_on_ray(cfg.out, cfg.shards, cfg.seed)
    summary.index_seconds = time.perf_counter() - t_index

    summary.documents = stats.documents
    summary.bad_lines = stats.bad_lines
    summary.exact_duplicates = dedup.exact_dropped
    summary.near_duplicates = dedup.near_dropped
    summary.seconds = time.perf_counter() - t0 - summary.load_seconds
    summary.encoder_seconds = encoder.timing.seconds if encoder else (t_embed if cfg.ray is not None else 0.0)
    manifest.counts = {"documents": stats.documents, "passages": summary.passages,
                       "exact_duplicates": dedup.exact_dropped, "near_duplicates": dedup.near_dropped,
                       "bad_lines": stats.bad_lines}
    manifest.provenance["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    manifest.complete = True
    manifest.save(cfg.out)
    return summary


def _remove_new_build(out: Path, shards: list[Shard], created_dir: bool) -> None:
    """Undo a build that failed before committing anything, so a fixed rerun starts clean."""
    for shard in shards:
        shard.close()
        shutil.rmtree(shard.path, ignore_errors=True)
    (out / MANIFEST).unlink(missing_ok=True)
    if created_dir:
        shutil.rmtree(out, ignore_errors=True)


def _load_embeddings(path: Path) -> np.ndarray:
    if not path.exists():
        raise NotFound(f"embeddings file {path} does not exist", resource_type="file", resource_name=str(path))
    try:
        vectors = np.load(path, mmap_mode="r")
    except ValueError as e:
        raise InvalidArgument(f"{path}: not a .npy array: {e}") from e
    if vectors.ndim != 2 or not np.issubdtype(vectors.dtype, np.floating):
        raise InvalidArgument(f"{path}: expected a float (n, dim) array, got {vectors.dtype} {vectors.shape}")
    return vectors


def _check_finite(vecs: np.ndarray, path: Path | None) -> None:
    if not np.isfinite(vecs).all():
        raise InvalidArgument(f"{path}: embeddings hold NaN or inf values")


def _train_shared_binarizer(cfg: BuildConfig, manifest: Manifest) -> None:
    """Binary codes: one binarizer for the whole datastore, trained on a sample across all
    shards before the shards are indexed, so queries binarize once and a compatible model is
    trained once (datastore/compat.py). Kept when a resumed build already recorded one (it
    is trained only after every passage was committed)."""
    from datastore import compat

    if not hasattr(INDEX_KINDS[manifest.index.kind], "use_binarizer") or compat.own_record(manifest) is not None:
        return
    shards = [Shard(cfg.out / d, i, manifest.model.dim, manifest.vector_dtype) for i, d in enumerate(manifest.shard_dirs)]
    try:
        compat.train_shared_binarizer(cfg.out, manifest, shards, cfg.seed)
    finally:
        for shard in shards:
            shard.close()
    manifest.save(cfg.out)

