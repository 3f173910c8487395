"""The embedded datastore: open a built directory and search, fetch, upsert, delete.

The gRPC service is a thin layer over this class, so embedded use and served use share
every rule: validation, tenant visibility, merge across shards, durability (an upsert
returns once its LMDB transaction is committed with sync; indexes follow in memory and
are saved on close, or rebuilt from LMDB on the next open after a crash).
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from datastore import compat
from datastore.control import ControlStore, check_tenant_name
from datastore.encoder import Encoder
from datastore.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from datastore.indexing import drop_commit, index_dir, open_index, save_index
from datastore.integrity import write_failed_for_space
from datastore.manifest import Manifest
from datastore.records import MAX_ID, Hit, Passage
from datastore.shard import Shard
from datastore.sharding import merge_topk, shard_of
from index import SearchParams, SearchResult, VectorIndex
from index.base import dir_size

log = logging.getLogger(__name__)

Query = str | np.ndarray
#: The tenant set of a passage whose last grant was revoked: visible to no tenant (an empty
#: set would make it public, which revoking must never do).
NO_ONE = "_none"


@dataclass(frozen=True)
class Limits:
    """Request limits, enforced the same way embedded and served."""

    max_k: int = 10_000
    max_batch: int = 4_096
    max_upsert_batch: int = 65_536
    #: Chars of one query or passage text (and of a title, source, metadata key or value).
    max_text_chars: int = 1_000_000
    #: Rows one search may ask the indexes for: queries times the largest of k, nprobe,
    #: ef_search and k * oversample (each sizes a (queries, n) array inside the index).
    max_hits: int = 1_000_000
    #: Metadata entries of one passage or filter, and tenants of one passage.
    max_metadata_entries: int = 1_024
    max_tenants_per_passage: int = 1_024
    #: The largest id a caller may choose: ids above it stay free for the server to assign
    #: (new ids count up from the largest stored one, so one upsert at 2^63 - 1 would
    #: otherwise leave no id for any later passage).
    max_explicit_id: int = 2**62 - 1


def check_search_size(k: int, n_queries: int, params: SearchParams | None, limits: Limits) -> None:
    """ResourceExhausted when a search would make the indexes build arrays larger than
    limits.max_hits rows (k, nprobe, ef_search or the binary rerank pool, per query)."""
    widths = {"k": k}
    if params is not None:
        knobs = (("nprobe", params.nprobe), ("ef_search", params.ef_search))
        widths.update({f"params.{n}": v for n, v in knobs if v is not None})
        if params.oversample is not None and np.isfinite(params.oversample):
            widths["k * params.oversample"] = float(k) * params.oversample
    for name, width in widths.items():
        if width * max(n_queries, 1) > limits.max_hits:
            raise ResourceExhausted(f"{name} = {width:g} for {n_queries} queries asks for more than "
                                    f"{limits.max_hits} results", subject="search size",
                                    hint="send fewer queries per call or a smaller k / nprobe")


@dataclass(frozen=True)
class ShardInfo:
    shard_id: int
    passages: int
    disk_bytes: int
    index_memory_bytes: int
    index_disk_bytes: int


@dataclass(frozen=True)
class DatastoreStats:
    passages: int
    dim: int
    model: str
    index_kind: str
    metric: str
    shards: list[ShardInfo] = field(default_factory=list)
    #: Shards of the whole datastore (`shards` lists the ones open here).
    num_shards: int = 0


def check_query_vectors(vectors: np.ndarray, dim: int, name: str = "vector") -> np.ndarray:
    """float32 (n, dim) C-contiguous, or InvalidArgument naming the field."""
    vectors = np.asarray(vectors)
    if vectors.ndim == 1:
        vectors = vectors[None, :]
    if vectors.ndim != 2 or vectors.shape[1] != dim:
        raise InvalidArgument.field(name, f"dimension must be {dim}, got {vectors.shape[-1]}")
    if not np.issubdtype(vectors.dtype, np.number):
        raise InvalidArgument.field(name, f"must be numeric, got {vectors.dtype}")
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if not np.isfinite(vectors).all():
        raise InvalidArgument.field(name, "holds NaN or inf")
    return vectors


def check_ids(ids: Sequence[int], name: str = "ids") -> None:
    """InvalidArgument unless every id is an integer in [0, 2^63) (ids travel as int64; the
    wire type is uint64, so a caller can send larger ones)."""
    for i in ids:
        if not isinstance(i, (int, np.integer)) or not 0 <= int(i) <= MAX_ID:
            raise InvalidArgument.field(name, f"id {i} is not an integer in [0, 2^63)")


def embed_queries(queries: Sequence[Query], dim: int, limits: Limits,
                  encoder: Callable[[], Encoder]) -> np.ndarray:
    """Texts embedded in one batch, vectors checked; rows in request order."""
    if len(queries) == 0:
        raise InvalidArgument.field("queries", "the batch is empty")
    if len(queries) > limits.max_batch:
        raise ResourceExhausted(f"queries: {len(queries)} in one batch, at most {limits.max_batch}",
                                subject="batch size")
    out = np.empty((len(queries), dim), np.float32)
    texts, text_rows = [], []
    for i, q in enumerate(queries):
        if isinstance(q, str):
            if not q.strip():
                raise InvalidArgument.field(f"queries[{i}]", "empty query text")
            if len(q) > limits.max_text_chars:
                raise ResourceExhausted(f"queries[{i}]: text of {len(q)} chars, at most {limits.max_text_chars}",
                                        subject="text size")
            texts.append(q)
            text_rows.append(i)
        else:
            out[i] = check_query_vectors(np.asarray(q), dim, f"queries[{i}]")[0]
    if texts:
        out[text_rows] = encoder().encode(texts)
    return out


def _set_omp_threads(n: int) -> None:
    import faiss

    faiss.omp_set_num_threads(n)


class Datastore:
    """A built datastore directory, opened for queries and updates (one process at a time)."""

    def __init__(self, directory: Path | str, *, limits: Limits = Limits(),
                 encoder_factory: Callable[[str], Encoder] | None = None,
                 shard_ids: Sequence[int] | None = None) -> None:
        """`shard_ids` opens only those shards (a shard server of a larger datastore)."""
        self.directory = Path(directory)
        self.manifest = Manifest.load(self.directory)
        if not self.manifest.complete:
            raise FailedPrecondition(f"{self.directory}: the build did not finish",
                                     hint="rerun the same `datastore build` command to resume it")
        self.limits = limits
        self.dim = self.manifest.model.dim
        self._encoder_factory = encoder_factory or (lambda name: Encoder(name))
        self._encoder: Encoder | None = None
        self._encoder_lock = threading.Lock()
        n = self.manifest.num_shards
        self.shard_ids = sorted(set(shard_ids)) if shard_ids is not None else list(range(n))
        bad = [i for i in self.shard_ids if not 0 <= i < n]
        if bad or not self.shard_ids:
            raise InvalidArgument.field("shards", f"{bad or 'none'}: the datastore has shards 0..{n - 1}")
        self._slot = {sid: slot for slot, sid in enumerate(self.shard_ids)}
        self.shards: list[Shard] = []
        try:  # a damaged file raises part way: close what opened, so a retry in this process works
            for i in self.shard_ids:
                self.shards.append(Shard(self.directory / self.manifest.shard_dirs[i], i, self.dim,
                                         self.manifest.vector_dtype))
            self.indexes: list[VectorIndex] = [open_index(s, self.manifest.index) for s in self.shards]
            # binary codes: one binarizer for every shard, and the query binarizers of compat_models
            compat.attach(self.directory, self.manifest, self.shards, self.indexes, save=save_index)
            self.control = ControlStore(self.directory)
        except BaseException:
            for s in self.shards:
                s.close()
            self.shards = []
            raise
        # faiss indexes are not safe to mutate while searched: one lock per shard
        self._locks = [threading.Lock() for _ in self.shards]
        self._dirty = [False for _ in self.shards]
        #: slots whose in-memory index missed a committed write (see _update_index): never saved
        self._unsaved = [False for _ in self.shards]
        workers = max(1, min(len(self.shards), 8))
        # OpenMP's thread count is per thread: without this each search thread would start a
        # team of nproc threads and several shards searched at once would oversubscribe the
        # cores. Split what this thread may use (`serve` sets 1 through OMP_NUM_THREADS).
        import faiss

        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="shard-search",
                                        initializer=_set_omp_threads,
                                        initargs=(max(1, faiss.omp_get_max_threads() // workers),))
        self._next_id = max(s.next_id for s in self.shards)  # ids at or above are free here
        self._id_lock = threading.Lock()
        self._filter_cache: dict[tuple[int, int, tuple], np.ndarray] = {}
        self._query_encoders: dict[str, Encoder] = {}

    # -- lifecycle ------------------------------------------------------------------------------

    def __enter__(self) -> "Datastore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def flush(self) -> None:
        """Save indexes changed since the last save (LMDB already holds every write)."""
        for i, shard in enumerate(self.shards):
            with self._locks[i]:
                if self._dirty[i] and not self._unsaved[i]:
                    save_index(shard, self.indexes[i])
                    self._dirty[i] = False

    def _update_index(self, slot: int, change: Callable[[VectorIndex], None]) -> None:
        """Apply `change` to a slot's index after its shard committed (call under the slot lock).

        If the change fails, the in-memory index no longer mirrors LMDB: the saved index is
        marked not current (the next open rebuilds it from LMDB, which holds the write) and
        this slot is never saved again in this process, so no save can record the gap. The
        error reaches the caller (RESOURCE_EXHAUSTED when the disk is full)."""
        try:
            change(self.indexes[slot])
            self._dirty[slot] = True
        except Exception as e:
            shard = self.shards[slot]
            self._unsaved[slot] = True
            try:
                drop_commit(shard)
            except OSError:
                log.exception("shard %d: could not mark its saved index stale", shard.shard_id)
            log.error("shard %d: index update failed after the commit (%s); the index is rebuilt from LMDB "
                      "on the next open", shard.shard_id, e)
            if write_failed_for_space(e, shard.path):
                raise ResourceExhausted(f"shard {shard.shard_id}: disk full at {shard.path} while updating its index",
                                        subject="disk", hint="free disk space; the passages were stored") from e
            raise

    def autoflush(self, interval: float) -> None:
        """Save changed indexes every `interval` seconds from a background thread, so a crash
        costs at most that much index work to redo (LMDB already holds every write)."""
        self._stop_flush = threading.Event()

        def run() -> None:
            while not self._stop_flush.wait(interval):
                self.flush()

        threading.Thread(target=run, name="index-autoflush", daemon=True).start()

    def close(self) -> None:
        if not self.shards:
            return
        if hasattr(self, "_stop_flush"):
            self._stop_flush.set()
        try:
            self.flush()
        finally:  # a flush on a full disk must not leave the shards open
            self._pool.shutdown(wait=True)
            for s in self.shards:
                s.close()
            self.control.close()
            self.shards = []

    @property
    def encoder(self) -> Encoder:
        with self._encoder_lock:
            if self._encoder is None:
                enc = self._encoder_factory(self.manifest.model.name)
                if enc.dim != self.dim:
                    raise FailedPrecondition(f"model {self.manifest.model.name} makes {enc.dim}-d vectors but the "
                                             f"datastore holds {self.dim}-d ones")
                self._encoder = enc
            return self._encoder

    # -- validation -----------------------------------------------------------------------------

    def _check_k(self, k: int) -> None:
        if not isinstance(k, (int, np.integer)) or not 1 <= k <= self.limits.max_k:
            raise InvalidArgument.field("k", f"must be between 1 and {self.limits.max_k}, got {k}")

    def _check_params(self, params: SearchParams | None) -> None:
        if params is None:
            return
        if params.query_model is not None and params.query_model != self.manifest.model.name:
            known = [m["name"] for m in self.manifest.compat_models]
            if params.query_model not in known:
                raise InvalidArgument.field("params.query_model",
                                            f"this datastore answers queries of {[self.manifest.model.name, *known]}, "
                                            f"not {params.query_model!r}")
        for name, value, low in (("nprobe", params.nprobe, 1), ("ef_search", params.ef_search, 1),
                                 ("candidate_budget", params.candidate_budget, 1),
                                 ("prune_epsilon", params.prune_epsilon, 0.0), ("oversample", params.oversample, 1.0)):
            if value is not None and not (np.isfinite(value) and value >= low):
                raise InvalidArgument.field(f"params.{name}", f"must be >= {low}, got {value}")

    def check_vectors(self, vectors: np.ndarray, name: str = "vector") -> np.ndarray:
        return check_query_vectors(vectors, self.dim, name)

    def embed_queries(self, queries: Sequence[Query], params: SearchParams | None = None) -> np.ndarray:
        """Texts embedded by the model `params.query_model` names (the datastore's by default)."""
        record = compat.query_model(self.manifest, params)
        if record is None:
            return embed_queries(queries, self.dim, self.limits, lambda: self.encoder)
        return embed_queries(queries, int(record["dim"]), self.limits, lambda: self._query_encoder(record["name"]))

    def _query_encoder(self, name: str) -> Encoder:
        with self._encoder_lock:
            if name not in self._query_encoders:
                self._query_encoders[name] = compat.make_encoder(name)
            return self._query_encoders[name]

    # -- queries --------------------------------------------------------------------------------

    def search_vectors(self, vectors: np.ndarray, k: int, tenant: str | None = None,
                       metadata_filter: dict[str, str] | None = None,
                       params: SearchParams | None = None) -> SearchResult:
        """Merged top-k over all shards for float32 (Q, dim) queries."""
        self._check_k(k)
        self._check_params(params)
        self._check_tenants([tenant] if tenant is not None else [])
        vectors = check_query_vectors(vectors, compat.query_dim(self.manifest, params), "queries")
        check_search_size(k, len(vectors), params, self.limits)
        if metadata_filter and len(metadata_filter) > self.limits.max_metadata_entries:
            raise ResourceExhausted(f"metadata_filter: {len(metadata_filter)} entries, at most "
                                    f"{self.limits.max_metadata_entries}", subject="filter size")

        def one(i: int) -> SearchResult:
            allowed = self._filter_ids(i, metadata_filter) if metadata_filter else None
            with self._locks[i]:
                return self.indexes[i].search(vectors, k, tenant=tenant, params=params, allowed_ids=allowed)

        parts = list(self._pool.map(one, range(len(self.shards))))
        return merge_topk(parts, k)

    def search(self, queries: Sequence[Query], k: int = 10, tenant: str | None = None,
               metadata_filter: dict[str, str] | None = None, params: SearchParams | None = None,
               include_text: bool = True) -> list[list[Hit]]:
        """Top-k hits per query (text or vector), with passages (text when `include_text`)."""
        self._check_k(k)
        check_search_size(k, len(queries), params, self.limits)  # before embedding a huge batch
        self._check_params(params)
        result = self.search_vectors(self.embed_queries(queries, params), k, tenant, metadata_filter, params)
        found = {p.id: p for p in self._fetch(np.unique(result.ids[result.ids >= 0]).tolist()) if p is not None}
        hits = []
        for q in range(result.num_queries):
            row = []
            for pid, score in result.row(q):
                p = found.get(pid)
                if p is None:  # deleted between search and fetch
                    continue
                if not include_text:
                    p = Passage(p.id, "", p.title, p.source, p.tenants, p.metadata)
                row.append(Hit(pid, score, p))
            hits.append(row)
        return hits

    def search_with_coverage(self, queries: Sequence[Query], k: int = 10, tenant: str | None = None,
                             metadata_filter: dict[str, str] | None = None, params: SearchParams | None = None,
                             include_text: bool = True, timeout: float | None = None
                             ) -> tuple[list[list[Hit]], list[int]]:
        """search() and the shards that did not answer: none in-process (the router's
        counterpart can lose shards). `timeout` matters only across a network."""
        return self.search(queries, k, tenant, metadata_filter, params, include_text), []

    def _route(self, ids: np.ndarray) -> tuple[list[tuple[int, np.ndarray]], np.ndarray]:
        """([(slot, positions of ids in that served shard)], positions of ids served elsewhere)."""
        where = shard_of(ids, self.manifest.num_shards)
        groups = [(slot, np.flatnonzero(where == sid)) for sid, slot in self._slot.items()]
        elsewhere = np.flatnonzero(~np.isin(where, self.shard_ids))
        return [(slot, sel) for slot, sel in groups if len(sel)], elsewhere

    def _fetch(self, ids: Sequence[int]) -> list[Passage | None]:
        """Passages by id, grouped per shard, in the order asked (None: not here)."""
        ids = [int(i) for i in ids]
        out: list[Passage | None] = [None] * len(ids)
        if not ids:
            return out
        groups, _ = self._route(np.asarray(ids, np.int64))
        for slot, sel in groups:
            for j, p in zip(sel, self.shards[slot].get([ids[j] for j in sel])):
                out[j] = p
        return out

    def get_passages(self, ids: Sequence[int], tenant: str | None = None) -> list[Passage]:
        """Passages by id; NotFound names ids that do not exist or that `tenant` may not see."""
        if len(ids) == 0:
            raise InvalidArgument.field("ids", "no ids given")
        if len(ids) > self.limits.max_upsert_batch:
            raise ResourceExhausted(f"ids: {len(ids)} in one call, at most {self.limits.max_upsert_batch}",
                                    subject="batch size")
        self._check_ids(ids)
        got = self._fetch(ids)
        missing = [int(i) for i, p in zip(ids, got) if p is None or not p.visible_to(tenant)]
        if missing:
            raise NotFound(f"no passage with id {', '.join(map(str, missing[:10]))}"
                           + (f" and {len(missing) - 10} more" if len(missing) > 10 else ""),
                           resource_type="passage", resource_name=",".join(map(str, missing[:10])))
        return got  # type: ignore[return-value]

    def _filter_ids(self, shard_no: int, metadata_filter: dict[str, str]) -> np.ndarray:
        """Ids of the shard whose metadata holds every (key, value) of the filter (cached per
        write sequence, so a write invalidates it)."""
        shard = self.shards[shard_no]
        cache_key = (shard_no, shard.seq, tuple(sorted(metadata_filter.items())))
        ids = self._filter_cache.get(cache_key)
        if ids is None:
            ids = np.array([p.id for p in shard.iter_passages()
                            if all(p.metadata.get(k) == v for k, v in metadata_filter.items())], np.int64)
            if len(self._filter_cache) > 256:
                self._filter_cache.clear()
            self._filter_cache[cache_key] = ids
        return ids

    # -- updates --------------------------------------------------------------------------------

    def _check_ids(self, ids: Sequence[int]) -> None:
        check_ids(ids)

    def upsert(self, passages: Sequence[Passage], vectors: np.ndarray | None = None) -> list[int]:
        """Store passages (new ids for those with id < 0), embedding texts without a vector.

        Returns the ids once every shard's transaction is committed."""
        if len(passages) == 0:
            raise InvalidArgument.field("passages", "nothing to upsert")
        if len(passages) > self.limits.max_upsert_batch:
            raise ResourceExhausted(f"{len(passages)} passages in one upsert, at most "
                                    f"{self.limits.max_upsert_batch}", subject="batch size")
        for n, p in enumerate(passages):
            if not isinstance(p.text, str) or (vectors is None and not p.text.strip()):
                raise InvalidArgument.field(f"passages[{n}].text", "must be non-empty text (or send a vector)")
            self._check_passage_size(n, p)
            if p.id >= 0:
                self._check_ids([p.id])
                if p.id > self.limits.max_explicit_id:
                    raise InvalidArgument.field(f"passages[{n}].id",
                                                f"{p.id} is above {self.limits.max_explicit_id}, the largest "
                                                "id a caller may choose (leave it unset)")
        self._check_tenants({t for p in passages for t in p.tenants})
        if vectors is not None:
            vectors = self.check_vectors(vectors, "vectors")
            if len(vectors) != len(passages):
                raise InvalidArgument.field("vectors", f"{len(vectors)} vectors for {len(passages)} passages")
        else:
            vectors = self.encoder.encode([p.embedding_input() for p in passages])
        given = np.array([p.id for p in passages if p.id >= 0], np.int64)
        if len(np.unique(given)) != len(given):
            raise InvalidArgument.field("passages", "the same id appears twice in one upsert")
        _, elsewhere = self._route(given)
        if len(elsewhere):
            raise InvalidArgument.field("passages", f"id {int(given[elsewhere[0]])} belongs to shard "
                                        f"{int(shard_of(given[elsewhere[0]], self.manifest.num_shards))}, "
                                        f"not served here (shards {self.shard_ids})")
        with self._id_lock:
            fresh = iter(self._allocate(sum(p.id < 0 for p in passages)))
            stored = [p if p.id >= 0 else Passage(next(fresh), p.text, p.title, p.source, p.tenants, p.metadata)
                      for p in passages]
            self._next_id = max(self._next_id, max(p.id for p in stored) + 1)
        ids = np.array([p.id for p in stored], np.int64)
        groups, _ = self._route(ids)
        for slot, sel in groups:
            with self._locks[slot]:
                self.shards[slot].put([stored[i] for i in sel], vectors[sel])
                self._update_index(slot, lambda index: index.add(ids[sel], vectors[sel],
                                                                 [stored[i].tenants for i in sel]))
        return ids.tolist()

    def _check_passage_size(self, n: int, p: Passage) -> None:
        lim = self.limits
        fields = [("text", p.text), ("title", p.title), ("source", p.source)]
        fields += [(f"metadata[{k[:40]!r}]", v) for k, v in p.metadata.items()]
        fields += [("metadata key", k) for k in p.metadata]
        for name, value in fields:
            if len(value) > lim.max_text_chars:
                raise ResourceExhausted(f"passages[{n}].{name}: {len(value)} chars, "
                                        f"at most {lim.max_text_chars}", subject="text size")
        for name, count, most in (("metadata", len(p.metadata), lim.max_metadata_entries),
                                  ("tenants", len(p.tenants), lim.max_tenants_per_passage)):
            if count > most:
                raise ResourceExhausted(f"passages[{n}].{name}: {count} entries, at most {most}",
                                        subject=f"{name} size")

    def _allocate(self, n: int) -> list[int]:
        """The next n free ids that belong to shards served here (all ids when all are), so
        shard servers of one datastore never hand out the same id."""
        out: list[int] = []
        start = self._next_id
        if start + 2 * n * self.manifest.num_shards + 64 > MAX_ID:
            raise ResourceExhausted(f"no free ids above {start - 1} for {n} new passages", subject="id space",
                                    hint="give the passages explicit ids below the largest stored one")
        while len(out) < n:
            block = np.arange(start, start + max(64, 2 * (n - len(out)) * self.manifest.num_shards), dtype=np.int64)
            mine = block[np.isin(shard_of(block, self.manifest.num_shards), self.shard_ids)]
            out.extend(mine[:n - len(out)].tolist())
            start = int(block[-1]) + 1
        return out

    def delete(self, ids: Sequence[int]) -> int:
        """Delete passages by id; ids that do not exist are ignored. Returns how many went."""
        if len(ids) == 0:
            raise InvalidArgument.field("ids", "no ids given")
        self._check_ids(ids)
        arr = np.asarray([int(i) for i in ids], np.int64)
        groups, _ = self._route(arr)  # ids of shards served elsewhere are not here: nothing to do
        deleted = 0
        for slot, sel in groups:
            with self._locks[slot]:
                gone = self.shards[slot].delete(arr[sel].tolist())
                if gone:
                    self._update_index(slot, lambda index: index.remove(np.asarray(gone, np.int64)))
                deleted += len(gone)
        return deleted

    # -- tenants --------------------------------------------------------------------------------

    def _check_tenants(self, names) -> None:
        for name in names:
            check_tenant_name(name)
            if not self.control.has_tenant(name):
                raise NotFound(f"no tenant {name}", resource_type="tenant", resource_name=name,
                               hint="create it first (CreateTenant)")

    def list_tenants(self) -> list[str]:
        return self.control.tenants()

    def create_tenant(self, name: str) -> None:
        self.control.add_tenants([check_tenant_name(name, "name")], exist_ok=False)

    def drop_tenant(self, name: str) -> tuple[int, int]:
        """Remove a tenant: passages only it could see are deleted, the others lose its grant,
        and its keys go. Returns (deleted, updated)."""
        self._check_tenants([name])
        only, shared = [], []
        for shard in self.shards:
            for p in shard.iter_passages():
                if name in p.tenants:
                    (only if p.tenants == (name,) else shared).append(p.id)
        if only:
            self.delete(only)
        self._set_access(shared, name, grant=False)
        self.control.remove_tenant(name)
        return len(only), len(shared)

    def grant(self, ids: Sequence[int], tenant: str) -> int:
        """Make passages visible to `tenant` too; returns how many changed."""
        return self._access(ids, tenant, grant=True)

    def revoke(self, ids: Sequence[int], tenant: str) -> int:
        """Take `tenant`'s access away (a passage with no tenant left becomes public only if
        it was public before: revoking the last grant deletes nothing and leaves it to no one
        but admins)."""
        return self._access(ids, tenant, grant=False)

    def _access(self, ids: Sequence[int], tenant: str, grant: bool) -> int:
        if len(ids) == 0:
            raise InvalidArgument.field("ids", "no ids given")
        self._check_ids(ids)
        self._check_tenants([tenant])
        got = self._fetch(ids)
        missing = [int(i) for i, p in zip(ids, got) if p is None]
        if missing:
            raise NotFound(f"no passage with id {', '.join(map(str, missing[:10]))}", resource_type="passage",
                           resource_name=",".join(map(str, missing[:10])))
        return self._set_access([int(i) for i in ids], tenant, grant)

    def _set_access(self, ids: list[int], tenant: str, grant: bool) -> int:
        changed = 0
        arr = np.asarray(ids, np.int64)
        groups, _ = self._route(arr)
        for slot, sel in groups:
            with self._locks[slot]:
                shard = self.shards[slot]
                passages = shard.get(arr[sel].tolist())
                updated = []
                for p in passages:
                    ts = set(p.tenants)
                    new = ts | {tenant} if grant else ts - {tenant}
                    if new != ts:
                        if not new:
                            new = {NO_ONE}
                        updated.append(Passage(p.id, p.text, p.title, p.source, tuple(sorted(new)), p.metadata))
                if not updated:
                    continue
                up_ids = np.array([p.id for p in updated], np.int64)
                vectors = shard.get_vectors(up_ids.tolist())
                shard.put(updated, vectors)
                def change(index: VectorIndex) -> None:
                    index.remove(up_ids)
                    index.add(up_ids, vectors, [p.tenants for p in updated])

                self._update_index(slot, change)
                changed += len(updated)
        return changed

    # -- stats ----------------------------------------------------------------------------------

    def stats(self) -> DatastoreStats:
        infos = []
        for slot, shard in enumerate(self.shards):
            st = self.indexes[slot].stats()
            infos.append(ShardInfo(shard.shard_id, len(shard), shard.disk_bytes(), st.memory_bytes,
                                   dir_size(index_dir(shard))))
        m = self.manifest
        return DatastoreStats(sum(i.passages for i in infos), self.dim, m.model.name, m.index.kind, m.index.metric,
                              infos, m.num_shards)


def open_datastore(directory: Path | str, **kwargs) -> Datastore:
    """Open a datastore directory; NotFound if it holds none."""
    directory = Path(directory)
    if not directory.is_dir():
        raise NotFound(f"{directory} does not exist", resource_type="datastore", resource_name=str(directory),
                       hint="build one with `datastore build INPUT --out DIR`")
    return Datastore(directory, **kwargs)
