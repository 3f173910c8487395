"""SPANN: head centroids in memory, posting lists on disk (Chen et al., NeurIPS 2021),
updated in place the SPFresh way (LIRE: split, reassign, merge; versions for staleness).

- Heads: leaves of a balanced hierarchical k-means over a training sample, searched in
  memory with faiss (flat, or an inverted file over the heads past `head_flat_max`).
- Closure replication: a vector goes to up to `replicas` heads within (1 + eps1) of its
  nearest head's distance, skipping heads that the RNG rule says lie in the direction of
  one already chosen (a head closer to a chosen head than to the vector). The rule's
  factor is tried on the training sample at build (index/spann_tune.py): how much
  replication pays depends on the data.
- Query-aware pruning: probe the heads within (1 + eps2) of the nearest head's distance,
  at most `max_lists`.
- Posting entries carry (id, version); an entry whose version is not the id's current
  one is stale and skipped; deletes are tombstones. Both are dropped when a posting is
  rewritten (split, merge, compaction).
- Bulk adds after `train` are staged in a scratch LMDB (bounded memory) and sealed into
  final posting lists at the first search or save; later adds update postings in place.
- Tenants (index/spann_tenants.py): each list's tenants are kept in memory, so a search as
  a tenant probes the nearest lists that hold its (or public) vectors and reads no other;
  the scan filters entries exactly.
- Binary codes (index/spann_codes.py, `codes="binary"`): lists hold BEBR codes instead of
  floats, scanned by SDC; the best k x oversample are reranked with float vectors read by
  id from the `vectors` database beside the postings.

Crashes (index/spann_state.py): the head table, the per-id versions and tombstones and the
counters live in LMDB beside the lists and change in the same transaction as the lists they
describe, so a reopened index always matches its lists. The per-list tenant summaries are
derived from the lists and recomputed by `recover` after a crash. Writes acknowledged by a
datastore shard but not yet applied here are replayed from the shard's change log
(datastore/indexing.py): a kill costs the work since the last save, not a rebuild.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import weakref
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from index import heap, spann_tune
from index import postings as codec
from index.base import (
    MISSING_ID,
    IndexStats,
    Metric,
    SearchParams,
    SearchResult,
    check_dim_metric,
    check_ids,
    check_vectors,
    distinct_top,
)
from index.kmeans import balanced_kmeans, hierarchical_heads, squared_distances
from index.postings import Posting
from index.spann_build import BulkBuild, remove_dirs
from index.spann_codes import BinaryRows, FloatRows, candidates_wanted, rerank
from index.spann_config import SpannConfig
from index.spann_heads import HeadIndex, refine_heads
from index.spann_persist import POSTINGS_DIR, Persistence
from index.spann_state import SpannState
from index.spann_tenants import TenantMap
from index.storage import VECTORS_DB, BlobStore, LmdbBlobStore, ReadStats, VectorStore, scratch_store

log = logging.getLogger(__name__)


class SpannIndex(BulkBuild, Persistence):
    """The SPANN memory/disk index over a BlobStore of posting lists."""

    kind = "spann"
    uses_storage = True
    config_class = SpannConfig

    def __init__(self, dim: int, metric: Metric = "ip", storage: BlobStore | None = None, **config) -> None:
        check_dim_metric(dim, metric)
        self.dim, self.metric = dim, metric
        self.config = SpannConfig(**config)
        self._scratch: Path | None = None
        if storage is None:  # standalone use (tests, benchmarks): a private LMDB
            storage, self._scratch = scratch_store(self, "spann-", POSTINGS_DIR)
        self.store = storage
        # durable head table and versions beside the lists (none over a non-LMDB store)
        self.state = SpannState(storage) if isinstance(storage, LmdbBlobStore) else None
        #: loaded from a save that kept heads and versions in files: LMDB holds none of them yet
        self._state_unwritten = False
        self.heads = HeadIndex(dim, self.config.head_flat_max, self.config.head_nprobe, spherical=metric == "ip")
        self.max_posting = self.config.max_posting
        self._versions: dict[int, int] = {}
        self._deleted: set[int] = set()
        self.tenants = TenantMap()
        # list entries: floats now, or codes once the binarizer is trained (at the seal)
        self.rows: FloatRows | BinaryRows | None = FloatRows(dim, self.config.vector_dtype, metric)
        self.floats: VectorStore | None = None
        self._writes_floats = False
        if self.config.codes == "binary":
            if not isinstance(storage, LmdbBlobStore):
                raise ValueError("codes='binary' needs an LMDB posting store (its vectors database holds the rerank floats)")
            self.rows = None
            # a private environment: the index keeps the floats; a shard's: the datastore does
            self.floats = VectorStore(storage.sibling(VECTORS_DB), dim)
            self._writes_floats = storage.owned
        self._count = 0
        self._lock = threading.RLock()
        self._filter_cache: tuple | None = None
        # bulk phase: raw rows wait in a scratch LMDB until the seal
        self._sample: np.ndarray | None = None
        self._raw: LmdbBlobStore | None = None
        self._raw_seq = 0
        self._staged_ids: list[np.ndarray] = []
        self._spills: list[Path] = []
        weakref.finalize(self, remove_dirs, self._spills)  # a build's spills, if it never sealed
        self._sealed = True

    def __len__(self) -> int:
        return self._count

    # -- training and bulk build ----------------------------------------------------------------

    def train(self, sample: np.ndarray) -> None:
        """Keep a training sample and empty the store. Heads are chosen when the bulk adds
        that follow are sealed, once their count is known (about head_ratio x count)."""
        sample = check_vectors(sample, self.dim, "sample")
        if len(sample) > self.config.train_sample:  # the fancy index is already a private copy
            rng = np.random.default_rng(self.config.seed)
            sample = sample[np.sort(rng.choice(len(sample), self.config.train_sample, replace=False))]
        else:
            sample = sample.copy()  # the caller's array (or a view of it): keep our own
        with self._lock:
            self._drop_spills()
            self._sample = sample
            self.heads.reset(np.zeros((0, self.dim), np.float32))
            self.store.clear()
            if self.state is not None:
                self.state.clear()
            if self._writes_floats:
                self.floats.store.clear()
            self._versions, self._deleted, self.tenants, self._count = {}, set(), TenantMap(), 0
            self._staged_ids = []
            if self.config.codes == "binary":
                self.rows = None
            self._filter_cache = None
            self._sealed = False

    def _choose_heads(self, sample: np.ndarray, total: int) -> None:
        heads_wanted = max(1, round(self.config.head_ratio * total))
        most = max(1, len(sample) // self.config.sample_per_head)
        if heads_wanted > most:
            log.info("spann: %d heads from %d training vectors (head_ratio asks %d; raise train_sample for more)",
                     most, len(sample), heads_wanted)
            heads_wanted = most
        # a leaf of the tree holds about leaf_size / 1.6 points on average (measured), so aim above
        leaf = max(1, math.ceil(1.6 * len(sample) / heads_wanted))
        heads = hierarchical_heads(sample, leaf, branching=self.config.branching,
                                   slack=self.config.balance_slack, seed=self.config.seed)
        if self.config.refine_iters and 1 < len(heads) < len(sample):
            heads = refine_heads(sample, heads, self.config.refine_iters, self.config.seed)
        self.heads.reset(heads)
        if self.config.rng_factor is None:
            choice = spann_tune.choose_rng_factor(sample, total, self.heads.count, self.metric, self.config.max_lists,
                                                  self.heads.search, self._assign, self.config.seed)
            self.config = dataclasses.replace(self.config, rng_factor=choice.factor)
        if not self.config.max_posting:
            mean_list = total * min(self.config.replicas, 3) / self.heads.count
            self.max_posting = max(16, int(4 * mean_list))

    def _assign(self, vectors: np.ndarray, rng_factor: float | None = None) -> list[np.ndarray]:
        """Heads of each vector: closure replication filtered by the RNG rule (the config's
        factor unless one is given)."""
        cfg = self.config
        factor = rng_factor or cfg.rng_factor or spann_tune.FALLBACK
        out: list[np.ndarray] = []
        cand = min(self.heads.count, max(cfg.replicas * 2, 8))
        for start in range(0, len(vectors), 1024):
            x = vectors[start:start + 1024]
            d, ids = self.heads.search(x, cand)
            ok = (ids >= 0) & (np.sqrt(np.maximum(d, 0)) <= (1 + cfg.closure_epsilon) * np.sqrt(np.maximum(d[:, :1], 0)))
            ok[:, 0] = ids[:, 0] >= 0
            hv = self.heads.vectors[np.maximum(ids, 0)]  # (b, c, dim)
            # squared distances between each vector's candidate heads, from their Gram matrix
            # (differences of every pair cost ~5x more: (b, c, dim) temporaries per candidate)
            norms = np.einsum("bcd,bcd->bc", hv, hv)
            apart = norms[:, :, None] + norms[:, None, :] - 2.0 * np.matmul(hv, hv.transpose(0, 2, 1))
            chosen = np.zeros_like(ok)
            chosen[:, 0] = ok[:, 0]
            counts = chosen[:, 0].astype(np.int64)
            for j in range(1, ids.shape[1]):
                live = ok[:, j] & (counts < cfg.replicas)
                if not live.any():
                    continue
                between = apart[:, :j, j]  # (b, j): chosen heads to head j
                blocked = (chosen[:, :j] & (factor * between < d[:, j:j + 1])).any(1)
                chosen[:, j] = live & ~blocked
                counts += chosen[:, j]
            out.extend(ids[r][chosen[r]] for r in range(len(x)))
        return out

    def add(self, ids: np.ndarray, vectors: np.ndarray, tenants: Sequence[Iterable[str]] | None = None) -> None:
        vectors = check_vectors(vectors, self.dim)
        ids = check_ids(ids, len(vectors))
        if tenants is not None and len(tenants) != len(ids):
            raise ValueError(f"tenants must have one entry per id ({len(ids)}), got {len(tenants)}")
        with self._lock:
            if self._writes_floats:
                self.floats.put(ids, vectors)
            if tenants is not None:
                self.tenants.set(ids.tolist(), tenants)
            if self._sealed and self.heads.count == 0:  # an empty index: this add is a bulk build
                self._sample = None
                self._sealed = False
            if self._sealed:
                self._insert(ids, vectors)
            else:
                self._stage(ids, vectors)

    @property
    def _width(self) -> int:
        """Elements per list entry row (dim for floats, bits x words for codes)."""
        return self.rows.width if self.rows is not None else self.dim

    def _commit(self, lists: dict[int, bytes] | None = None, list_deletes: Sequence[int] = (),
                heads: dict[int, np.ndarray] | None = None, head_deletes: Sequence[int] = (),
                versions: dict[int, tuple[int, bool]] | None = None, version_deletes: Sequence[int] = ()) -> None:
        """Lists with the heads, versions and counters that describe them, in one transaction."""
        if self.state is None:
            self.store.write(lists or {}, list_deletes)
            return
        if self._state_unwritten:  # loaded from an older save: write the whole state first
            self._state_unwritten = False
            live = np.flatnonzero(self.heads.alive)
            all_versions = {i: (v, i in self._deleted) for i, v in self._versions.items()}
            all_versions.update({i: (self._versions.get(i, 0), True) for i in self._deleted})
            self.state.clear()
            self.state.commit({"count": self._count, "max_posting": self.max_posting},
                              heads=dict(zip(live.tolist(), self.heads.vectors[live])), versions=all_versions)
        self.state.commit({"count": self._count, "max_posting": self.max_posting}, lists, list_deletes,
                          heads, head_deletes, versions, version_deletes)

    def _floats_of(self, p: Posting) -> tuple[Posting, np.ndarray]:
        """(p, its float32 vectors): from the entries themselves, or read by id for codes
        (entries whose vector is gone are dropped: their passage was deleted)."""
        if self.rows is None or self.rows.exact:
            return p, p.vectors.astype(np.float32)
        found, vecs = self.floats.get(p.ids)
        if not found.all():
            return p.take(found), vecs[found]
        return p, vecs

    def read_stats(self) -> ReadStats:
        """Blobs and bytes read so far from the posting lists and (binary codes) the vectors."""
        got = self.store.read_stats()
        return got + self.floats.store.read_stats() if self.floats is not None else got

    # -- search ---------------------------------------------------------------------------------

    def _current_versions(self, ids: np.ndarray) -> np.ndarray:
        if not self._versions:
            return np.zeros(len(ids), np.uint16)
        if self._filter_cache is None:
            keys = np.fromiter(self._versions.keys(), np.int64, len(self._versions))
            vals = np.fromiter(self._versions.values(), np.int64, len(self._versions))
            order = np.argsort(keys)
            self._filter_cache = (keys[order], vals[order].astype(np.uint16))
        keys, vals = self._filter_cache
        pos = np.minimum(np.searchsorted(keys, ids), len(keys) - 1)
        return np.where(keys[pos] == ids, vals[pos], 0).astype(np.uint16)

    def _valid(self, p: Posting) -> np.ndarray:
        ok = p.versions == self._current_versions(p.ids)
        if self._deleted:
            ok &= ~np.isin(p.ids, np.fromiter(self._deleted, np.int64, len(self._deleted)))
        return ok

    #: A tenant-restricted probe goes past eps2 (never past the cap) until its lists hold this
    #: many entries the tenant sees per result wanted (replicas included).
    TENANT_ENTRIES_PER_RESULT = 8

    def probe_lists(self, queries: np.ndarray, params: SearchParams | None = None,
                    tenant: str | None = None, k: int = 0) -> list[np.ndarray]:
        """Heads each query probes after query-aware pruning (nearest first).

        When some vectors are restricted, only heads whose lists hold a vector `tenant` may
        see are candidates: pruning and the cap then count among those, so a small tenant
        gets its own nearest lists rather than the nearest lists overall, filtered empty.
        With `k`, such a probe also takes lists beyond eps2 until they hold about
        TENANT_ENTRIES_PER_RESULT x k of the tenant's entries: a scattered tenant's nearest
        vectors can lie well beyond the nearest of its lists."""
        eps = self.config.prune_epsilon if params is None or params.prune_epsilon is None else params.prune_epsilon
        cap = self.config.max_lists if params is None or params.nprobe is None else params.nprobe
        subset = self._tenant_heads(tenant)
        if subset is None:
            d, ids = self.heads.search(queries, cap)
        elif not len(subset):
            return [np.zeros(0, np.int64) for _ in range(len(queries))]
        else:
            d, ids = self.heads.search_subset(queries, cap, subset)
        dist = np.sqrt(np.maximum(d, 0))
        keep = (ids >= 0) & (dist <= (1 + eps) * np.maximum(dist[:, :1], 1e-6))
        keep[:, 0] = ids[:, 0] >= 0
        if subset is not None and k:
            counts = self.tenants.visible_counts(tenant, ids)
            before = np.cumsum(counts, axis=1) - counts  # entries in the nearer lists
            keep |= (ids >= 0) & (before < self.TENANT_ENTRIES_PER_RESULT * k)
        return [ids[r][keep[r]] for r in range(len(ids))]

    def _tenant_heads(self, tenant: str | None) -> np.ndarray | None:
        """Live heads whose lists may hold a vector `tenant` sees; None when that is all heads."""
        if not self.tenants:
            return None
        heads = self.tenants.postings_for(tenant)
        heads = heads[self.heads.alive[heads]] if len(heads) else heads
        return None if len(heads) >= self.heads.count else heads

    def search(self, queries: np.ndarray, k: int, tenant: str | None = None, params: SearchParams | None = None,
               allowed_ids: np.ndarray | None = None) -> SearchResult:
        queries = check_vectors(queries, self.dim, "queries")
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        out = SearchResult.empty(len(queries), k)
        with self._lock:
            self._seal()
            if self.heads.count == 0 or len(queries) == 0:
                return out
            if allowed_ids is not None:
                allowed_ids = np.unique(np.asarray(allowed_ids, np.int64))
            wanted = k
            if not self.rows.exact:
                oversample = self.config.oversample if params is None or params.oversample is None \
                    else params.oversample
                wanted = candidates_wanted(k, oversample)
            lists = self.probe_lists(queries, params, tenant, k)
            for chunk in self._chunks(lists):
                if self.rows.exact:
                    self._scan(queries[chunk], wanted, lists[chunk], tenant, allowed_ids, out.ids[chunk],
                               out.scores[chunk])
                    continue
                cand = SearchResult.empty(len(queries[chunk]), wanted)
                self._scan(queries[chunk], wanted, lists[chunk], tenant, allowed_ids, cand.ids, cand.scores)
                rerank(queries[chunk], cand.ids, self.floats, self.metric, out.ids[chunk], out.scores[chunk])
        if len(queries) > 1:  # a batch's score tables: give the heap back (index/heap.py)
            heap.trim()
        return out

    #: Queries scanned together: their distinct lists are read once and each scored against
    #: all the chunk's queries that probe it. A chunk holds at most QUERY_CHUNK queries, lists
    #: of about CHUNK_BYTES (asked of the disk at once when cold), and a score table of about
    #: TABLE_CELLS (queries x entries of a query's lists; 12 bytes a cell, and as much again
    #: while the top k is taken). A larger table shares more lists but is memory the process
    #: keeps: at 4M cells, glove-50's search grew the heap by ~100 MB, more than its floats.
    QUERY_CHUNK = 1024
    CHUNK_BYTES = 128 << 20
    TABLE_CELLS = 1 << 19

    def _chunks(self, lists: list[np.ndarray]) -> Iterable[slice]:
        """Consecutive query slices within the three bounds above (at the mean list size)."""
        if len(lists) <= 1:  # a single query (the common case): no need to size the lists
            yield slice(0, len(lists))
            return
        per_list = max(1, self.store.disk_bytes() // max(1, self.heads.count))
        entries = max(1, per_list // (10 + self.rows.row_bytes))
        most = max(1, self.CHUNK_BYTES // per_list)
        start, seen, widest = 0, set(), 0
        for q, heads in enumerate(lists):
            hs = heads.tolist()
            widest = max(widest, len(hs))
            if q > start and (q - start >= self.QUERY_CHUNK or len(seen.union(hs)) > most
                              or (q - start + 1) * widest * entries > self.TABLE_CELLS):
                yield slice(start, q)
                start, seen, widest = q, set(), len(hs)
            seen.update(hs)
        if start < len(lists):
            yield slice(start, len(lists))

    def _scan(self, queries: np.ndarray, k: int, lists: list[np.ndarray], tenant: str | None,
              allowed_ids: np.ndarray | None, out_ids: np.ndarray, out_scores: np.ndarray) -> None:
        """Score each query's probed lists, skipping stale, deleted and invisible entries,
        and write its best k distinct ids (exact scores for floats, SDC scores for codes).

        List-major: each distinct list of the chunk is read once (one transaction) and scored
        against every query of the chunk that probes it in one matrix product, into a
        (queries, entries) score table; the top k distinct ids of all rows are then taken at
        once. Per-query Python work would cost more than the scoring itself."""
        counts = np.fromiter(map(len, lists), np.int64, len(lists))
        if not counts.sum():
            return
        pair_q = np.repeat(np.arange(len(lists)), counts)  # (query, list) pairs, query-major
        distinct, pair_list = np.unique(np.concatenate(lists), return_inverse=True)
        prepared = self.rows.prepare(queries)
        deleted = np.fromiter(self._deleted, np.int64, len(self._deleted)) if self._deleted else None
        with self.store.viewing() as read:
            entries = [self._visible(blob, deleted, tenant, allowed_ids) for blob in read(distinct.tolist())]
            if len(lists) == 1:  # one query: its lists' scores side by side, no table to fill
                kept = [e for e in entries if len(e[0])]
                if not kept:
                    return
                ids = np.concatenate([e[0] for e in kept])[None]
                scores = np.concatenate([self.rows.score(prepared, rows)[0] for _, rows in kept])[None]
                top_ids, top_scores = distinct_top(ids, scores, k, self.config.replicas + 1)
                out_ids[:, :top_ids.shape[1]] = top_ids
                out_scores[:, :top_ids.shape[1]] = top_scores
                return
            sizes = np.fromiter((len(e[0]) for e in entries), np.int64, len(entries))
            pair_n = sizes[pair_list]
            # a pair's column in its query's row: the entries of the query's earlier lists
            per_query = np.bincount(pair_q, pair_n, len(lists)).astype(np.int64)
            pair_col = np.cumsum(pair_n) - pair_n - np.repeat(np.cumsum(per_query) - per_query, counts)
            width = int(per_query.max())
            if not width:
                return
            scores = np.full((len(lists), width), -np.inf, np.float32)
            ids = np.full((len(lists), width), MISSING_ID, np.int64)
            by_list = np.argsort(pair_list, kind="stable")
            listed = pair_list[by_list]
            starts = np.flatnonzero(np.r_[True, listed[1:] != listed[:-1]])
            qs_all, cols_all = pair_q[by_list].tolist(), pair_col[by_list].tolist()
            for s, e, li in zip(starts.tolist(), np.r_[starts[1:], len(listed)].tolist(), listed[starts].tolist()):
                list_ids, rows = entries[li]  # each distinct list scored once
                n = len(list_ids)
                if not n:
                    continue
                if e - s == 1:  # probed by one query of the chunk (the usual case): straight into its row
                    q, c = qs_all[s], cols_all[s]
                    self.rows.score_into(prepared[q], rows, scores[q, c:c + n])
                    ids[q, c:c + n] = list_ids
                    continue
                block = self.rows.score(prepared[qs_all[s:e]], rows)
                for j, (q, c) in enumerate(zip(qs_all[s:e], cols_all[s:e])):
                    scores[q, c:c + n] = block[j]  # slices: cheaper than one fancy scatter
                    ids[q, c:c + n] = list_ids
        top_ids, top_scores = distinct_top(ids, scores, k, self.config.replicas + 1)
        out_ids[:, :top_ids.shape[1]] = top_ids
        out_scores[:, :top_ids.shape[1]] = top_scores

    def _visible(self, blob: memoryview | None, deleted: np.ndarray | None, tenant: str | None,
                 allowed_ids: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """(ids, rows) of a list's entries a search may return: current versions, not deleted,
        visible to the tenant and allowed; the list's own arrays (zero-copy) when all are."""
        if blob is None:
            return np.zeros(0, np.int64), np.zeros((0, self._width), self.rows.dtype)
        p = codec.decode(blob, self._width)
        ok = p.versions == self._current_versions(p.ids) if self._versions else None
        for mask in (~np.isin(p.ids, deleted) if deleted is not None else None,
                     self.tenants.visible_mask(p.ids, tenant),
                     np.isin(p.ids, allowed_ids) if allowed_ids is not None else None):
            if mask is not None:
                ok = mask if ok is None else ok & mask
        if ok is not None and not ok.all():
            return p.ids[ok], p.vectors[ok]
        return p.ids, codec.aligned(p.vectors)  # copied only if misaligned (blobs from before padding)

    # -- updates (SPFresh LIRE) -----------------------------------------------------------------

    def _bump(self, ids: np.ndarray) -> np.ndarray:
        """New versions for ids (re)inserted: earlier replicas become stale."""
        out = np.empty(len(ids), np.uint16)
        for n, i in enumerate(ids.tolist()):
            v = self._versions.get(i, 0) % 65535 + 1
            self._versions[i] = v
            out[n] = v
            self._deleted.discard(i)
        self._filter_cache = None
        return out

    def _insert(self, ids: np.ndarray, vectors: np.ndarray, depth: int = 0) -> None:
        versions = self._bump(ids)
        self._count += len(ids)
        heads = self._assign(vectors)
        by_head: dict[int, list[int]] = {}
        for row, hs in enumerate(heads):
            for h in hs.tolist():
                by_head.setdefault(h, []).append(row)
        keys = sorted(by_head)
        current = dict(zip(keys, self.store.get_many(keys)))
        entries = self.rows.encode(vectors)
        puts, oversized = {}, []
        for h in keys:
            rows = np.asarray(by_head[h])
            new = Posting(ids[rows], versions[rows], entries[rows])
            blob = current[h]
            p = codec.decode(blob, self._width).concat(new) if blob is not None else new
            puts[h] = codec.encode(p, self.config.compress)
            self.tenants.note_posting(h, p.ids[self._valid(p)])
            if len(p) > self.max_posting:
                oversized.append(h)
        self._commit(puts, versions={i: (v, False) for i, v in zip(ids.tolist(), versions.tolist())})
        for h in oversized:
            if self.heads.alive[h]:
                self._split(h, depth)

    def _split(self, head: int, depth: int) -> None:
        (blob,) = self.store.get_many([head])
        p = codec.decode(blob, self._width)
        p, vecs = self._floats_of(p.take(self._valid(p)))
        if len(p) <= self.max_posting or depth > 4 or len(p) < 2:
            self._commit({head: codec.encode(p, self.config.compress)})
            self.tenants.note_posting(head, p.ids)
            return
        centroids, assign = balanced_kmeans(vecs, 2, slack=1.2, seed=self.config.seed + head)
        old_centroid = self.heads.vectors[head].copy()
        self.heads.remove(head)
        new_heads = self.heads.add(centroids)
        puts = {int(h): codec.encode(p.take(assign == c), self.config.compress) for c, h in enumerate(new_heads)}
        self._commit(puts, [head], heads={int(h): c for h, c in zip(new_heads, centroids)}, head_deletes=[head])
        self.tenants.forget_posting(head)
        for c, h in enumerate(new_heads):
            self.tenants.note_posting(int(h), p.ids[assign == c])
        # LIRE reassignment: the split list's vectors whose nearest head is now elsewhere, and
        # vectors of neighbouring lists that are closer to a new head than to their own.
        move_ids, move_vecs = [], []
        _, nearest = self.heads.search(vecs, 1)
        stray = ~np.isin(nearest[:, 0], new_heads)
        move_ids.append(p.ids[stray])
        move_vecs.append(vecs[stray])
        _, near = self.heads.search(old_centroid[None, :], 9)
        neighbours = [int(h) for h in near[0] if h >= 0 and h not in new_heads]
        for h, nb in zip(neighbours, self.store.get_many(neighbours)):
            if nb is None:
                continue
            q = codec.decode(nb, self._width)
            q, qv = self._floats_of(q.take(self._valid(q)))
            if not len(q):
                continue
            own = squared_distances(qv, self.heads.vectors[h:h + 1])[:, 0]
            to_new = squared_distances(qv, self.heads.vectors[new_heads]).min(1)
            closer = to_new < own
            move_ids.append(q.ids[closer])
            move_vecs.append(qv[closer])
        ids = np.concatenate(move_ids)
        if len(ids):
            ids, first = np.unique(ids, return_index=True)
            vecs_all = np.concatenate(move_vecs)[first]
            self._count -= len(ids)  # _insert counts them again
            self._insert(ids, vecs_all, depth + 1)

    def remove(self, ids: np.ndarray) -> int:
        """Tombstone ids; their entries are dropped when their lists are next rewritten."""
        ids = np.asarray(ids, np.int64).ravel()
        with self._lock:
            new = [i for i in ids.tolist() if i not in self._deleted]
            if not new:
                return 0
            self._deleted.update(new)
            self.tenants.drop(new)
            if self._writes_floats:
                self.floats.delete(new)
            self._count = max(0, self._count - len(new))
            self._commit(versions={i: (self._versions.get(i, 0), True) for i in new})
        return len(new)

    def compact(self) -> None:
        """Merge tiny lists into their neighbours (their vectors are reinserted), then rewrite
        every list without stale or deleted entries and reset versions: afterwards every
        stored entry is current and no tombstone is needed. Not one transaction: a datastore
        compacts through datastore.indexing.compact_index, which rebuilds after a crash."""
        with self._lock:
            self._seal()
            orphan_ids, orphan_vecs = [], []
            for h in self.store.keys():
                if self.heads.count <= 1:
                    break
                p = codec.decode(self.store.get_many([h])[0], self._width)
                p = p.take(self._valid(p))
                if len(p) < self.config.min_posting:
                    p, vecs = self._floats_of(p)
                    self.heads.remove(h)
                    self._commit(list_deletes=[h], head_deletes=[h])
                    self.tenants.forget_posting(h)
                    orphan_ids.append(p.ids)
                    orphan_vecs.append(vecs)
            if orphan_ids and len(ids := np.concatenate(orphan_ids)):
                ids, first = np.unique(ids, return_index=True)
                self._count -= len(ids)
                self._insert(ids, np.concatenate(orphan_vecs)[first])
            for h in self.store.keys():
                p = codec.decode(self.store.get_many([h])[0], self._width)
                p = p.take(self._valid(p))
                self.store.write({h: codec.encode(Posting(p.ids, np.zeros(len(p), np.uint16), p.vectors),
                                                  self.config.compress)})
                self.tenants.note_posting(h, p.ids)
            self._versions, self._deleted, self._filter_cache = {}, set(), None
            if self.state is not None:  # every entry is at version 0 now: no record is needed
                self.state.versions.clear()

    def stats(self) -> IndexStats:
        codes = self.rows.memory_bytes() if isinstance(self.rows, BinaryRows) else 0
        memory = (self.heads.memory_bytes() + 40 * (len(self._versions) + len(self._deleted))
                  + self.tenants.memory_bytes() + codes)
        saved = getattr(self, "_saved_dir", None)
        disk = self.store.disk_bytes() + (sum(f.stat().st_size for f in Path(saved).glob("spann.*")) if saved else 0)
        if self._writes_floats:
            disk += self.floats.store.disk_bytes()
        reads = self.read_stats()
        return IndexStats(self.kind, self._count, self.dim, memory, disk,
                          {"heads": self.heads.count, "max_posting": self.max_posting, "rng_factor": self.config.rng_factor,
                           "stale_versions": len(self._versions), "tombstones": len(self._deleted),
                           "codes": self.config.codes, "entry_bytes": 10 + (self.rows.row_bytes if self.rows else 0),
                           "reads": reads.reads, "bytes_read": reads.bytes})

