"""SPANN: head centroids in memory, posting lists on disk (Chen et al., NeurIPS 2021),
updated in place the SPFresh way (LIRE: split, reassign, merge; versions for staleness).

- Heads: leaves of a balanced hierarchical k-means over a training sample, searched in
  memory with faiss (flat, or HNSW past `hnsw_threshold` heads).
- Closure replication: a vector goes to up to `replicas` heads within (1 + eps1) of its
  nearest head's distance, skipping heads that the RNG rule says lie in the direction of
  one already chosen (a head closer to a chosen head than to the vector).
- Query-aware pruning: probe the heads within (1 + eps2) of the nearest head's distance,
  at most `max_lists`.
- Posting entries carry (id, version); an entry whose version is not the id's current
  one is stale and skipped; deletes are tombstones. Both are dropped when a posting is
  rewritten (split, merge, compaction).
- Bulk adds after `train` are staged in a scratch LMDB (bounded memory) and sealed into
  final posting lists at the first search or save; later adds update postings in place.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Literal, Sequence

import numpy as np

from index import postings as codec
from index.base import (MISSING_ID, IndexStats, Metric, SearchParams, SearchResult, check_dim_metric, check_ids,
                        check_vectors)
from index.kmeans import balanced_kmeans, hierarchical_heads, squared_distances
from index.postings import Posting
from index.spann_heads import HeadIndex
from index.storage import BlobStore, LmdbBlobStore

STATE_FILE = "spann.json"
ARRAYS_FILE = "spann.npz"
POSTINGS_DIR = "postings"


@dataclass(frozen=True)
class SpannConfig:
    """Build and search settings; the defaults work from thousands to millions of vectors."""

    #: Heads as a share of vectors; each head's list then holds ~replication/head_ratio entries.
    #: (SPTAG starts from 0.2; on GloVe-50, 0.01 gave the best recall per query time.)
    head_ratio: float = 0.01
    branching: int = 16
    balance_slack: float = 1.3
    #: Closure replication: at most this many heads per vector (SPANN: 8).
    replicas: int = 8
    #: eps1: replicate to heads within (1 + eps1) x the nearest head's distance.
    closure_epsilon: float = 0.5
    #: RNG rule: skip head h if rng_factor * dist(h, chosen)^2 < dist(x, h)^2. 1.0 is the strict
    #: rule; 2.0 (measured on GloVe-50) replicates ~3x and reaches recall 0.95 with half the lists.
    rng_factor: float = 2.0
    #: eps2 default: probe heads within (1 + eps2) x the nearest head's distance.
    prune_epsilon: float = 0.6
    #: Hard cap on lists probed per query (SearchParams.nprobe overrides).
    max_lists: int = 48
    #: Longest list; longer ones are split (0 = 4x the mean list length at build).
    max_posting: int = 0
    #: Shorter lists are merged into their neighbours at compaction.
    min_posting: int = 4
    #: float32 by default: converting float16 lists at query time costs more than reading 2x bytes.
    vector_dtype: Literal["float16", "float32"] = "float32"
    compress: bool = False
    #: Threads reading a query's lists. 1 (zero-copy, in the caller's thread) is fastest on a
    #: warm cache; 4 halved cold single-query latency on GloVe-50 but cost 2x when warm.
    fetch_threads: int = 1
    train_sample: int = 200_000
    hnsw_threshold: int = 20_000
    hnsw_m: int = 32
    #: Bulk adds are staged in memory up to this many bytes before spilling to scratch LMDB.
    stage_bytes: int = 256 << 20
    seed: int = 0

    def __post_init__(self) -> None:
        checks = {
            "head_ratio": 0 < self.head_ratio <= 1, "branching": self.branching >= 2,
            "balance_slack": self.balance_slack >= 1, "replicas": self.replicas >= 1,
            "closure_epsilon": self.closure_epsilon >= 0, "rng_factor": self.rng_factor > 0,
            "prune_epsilon": self.prune_epsilon >= 0, "max_lists": self.max_lists >= 1,
            "max_posting": self.max_posting >= 0, "min_posting": self.min_posting >= 0,
            "vector_dtype": self.vector_dtype in ("float16", "float32"), "train_sample": self.train_sample >= 1,
            "fetch_threads": self.fetch_threads >= 1,
            "hnsw_threshold": self.hnsw_threshold >= 1, "hnsw_m": self.hnsw_m >= 4, "stage_bytes": self.stage_bytes > 0,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"SpannConfig: invalid {', '.join(f'{k}={getattr(self, k)!r}' for k in bad)}")


class SpannIndex:
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
            self._scratch = Path(tempfile.mkdtemp(prefix="spann-"))
            storage = LmdbBlobStore.open(self._scratch / POSTINGS_DIR)
        self.store = storage
        self.heads = HeadIndex(dim, self.config.hnsw_threshold, self.config.hnsw_m)
        self.max_posting = self.config.max_posting
        self._versions: dict[int, int] = {}
        self._deleted: set[int] = set()
        self._tenants: dict[int, frozenset[str]] = {}
        self._count = 0
        self._lock = threading.RLock()
        self._filter_cache: tuple | None = None
        # bulk phase: raw rows wait in a scratch LMDB until the seal
        self._sample: np.ndarray | None = None
        self._raw: LmdbBlobStore | None = None
        self._raw_seq = 0
        self._spills: list[Path] = []
        self._sealed = True

    def __len__(self) -> int:
        return self._count

    # -- training and bulk build ----------------------------------------------------------------

    def train(self, sample: np.ndarray) -> None:
        """Keep a training sample and empty the store. Heads are chosen when the bulk adds
        that follow are sealed, once their count is known (about head_ratio x count)."""
        sample = check_vectors(sample, self.dim, "sample")
        if len(sample) > self.config.train_sample:
            rng = np.random.default_rng(self.config.seed)
            sample = sample[np.sort(rng.choice(len(sample), self.config.train_sample, replace=False))]
        with self._lock:
            self._drop_spills()
            self._sample = sample.copy()
            self.heads.reset(np.zeros((0, self.dim), np.float32))
            self.store.clear()
            self._versions, self._deleted, self._tenants, self._count = {}, set(), {}, 0
            self._filter_cache = None
            self._sealed = False

    def _choose_heads(self, sample: np.ndarray, total: int) -> None:
        heads_wanted = max(1, round(self.config.head_ratio * total))
        # a leaf of the tree holds about leaf_size / 1.6 points on average (measured), so aim above
        leaf = max(1, math.ceil(1.6 * len(sample) / heads_wanted))
        self.heads.reset(hierarchical_heads(sample, leaf, branching=self.config.branching,
                                            slack=self.config.balance_slack, seed=self.config.seed))
        if not self.config.max_posting:
            mean_list = total * min(self.config.replicas, 3) / self.heads.count
            self.max_posting = max(16, int(4 * mean_list))

    def _assign(self, vectors: np.ndarray) -> list[np.ndarray]:
        """Heads of each vector: closure replication filtered by the RNG rule."""
        cfg = self.config
        out: list[np.ndarray] = []
        cand = min(self.heads.count, max(cfg.replicas * 2, 8))
        for start in range(0, len(vectors), 1024):
            x = vectors[start:start + 1024]
            d, ids = self.heads.search(x, cand)
            ok = (ids >= 0) & (np.sqrt(np.maximum(d, 0)) <= (1 + cfg.closure_epsilon) * np.sqrt(np.maximum(d[:, :1], 0)))
            ok[:, 0] = ids[:, 0] >= 0
            hv = self.heads.vectors[np.maximum(ids, 0)]  # (b, c, dim)
            chosen = np.zeros_like(ok)
            chosen[:, 0] = ok[:, 0]
            counts = chosen[:, 0].astype(np.int64)
            for j in range(1, ids.shape[1]):
                live = ok[:, j] & (counts < cfg.replicas)
                if not live.any():
                    continue
                between = ((hv[:, :j] - hv[:, j:j + 1]) ** 2).sum(-1)  # (b, j): chosen heads to head j
                blocked = (chosen[:, :j] & (cfg.rng_factor * between < d[:, j:j + 1])).any(1)
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
            if tenants is not None:
                for i, ts in zip(ids.tolist(), tenants):
                    ts = frozenset(ts)
                    if ts:
                        self._tenants[i] = ts
                    else:
                        self._tenants.pop(i, None)
            if self._sealed and self.heads.count == 0:  # an empty index: this add is a bulk build
                self._sample = None
                self._sealed = False
            if self._sealed:
                self._insert(ids, vectors)
            else:
                self._stage(ids, vectors)

    #: Rows per staged blob: bounds the memory of a bulk build whatever the size of one add.
    STAGE_ROWS = 65_536

    def _spill_store(self, name: str) -> LmdbBlobStore:
        """A scratch LMDB beside the posting store (in the shard directory when there is one)."""
        base = getattr(self.store, "path", None)
        d = Path(tempfile.mkdtemp(prefix=f"spann-{name}-", dir=base if base and Path(base).is_dir() else None))
        self._spills.append(d)
        return LmdbBlobStore.open(d)

    def _drop_spills(self) -> None:
        for d in self._spills:
            shutil.rmtree(d, ignore_errors=True)
        self._spills = []
        base = getattr(self.store, "path", None)
        if base and Path(base).is_dir():  # left behind by a build that was killed
            for d in Path(base).glob("spann-*-*"):
                shutil.rmtree(d, ignore_errors=True)

    def _stage(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Bulk phase: keep raw (id, vector) rows in a scratch LMDB until the seal."""
        if self._raw is None:
            self._raw = self._spill_store("raw")
        for start in range(0, len(ids), self.STAGE_ROWS):  # one blob at a time: memory stays flat
            part = slice(start, start + self.STAGE_ROWS)
            blob = codec.encode(Posting(ids[part], np.zeros(len(ids[part]), np.uint16), vectors[part]))
            self._raw.write({self._raw_seq: blob})
            self._raw_seq += 1
        self._count += len(ids)

    def _seal(self) -> None:
        """End the bulk phase: choose heads, assign every staged row to its heads, and write
        each list once (capped at max_posting, primaries kept). Memory stays bounded: rows
        stream from the raw spill, assignments gather in a second spill sorted by head."""
        if self._sealed:
            return
        self._sealed = True
        if self._raw is None:
            return
        sample = self._sample
        if sample is None or not len(sample):
            rows = []
            for _, blob in self._raw.items():
                rows.append(codec.decode(blob, self.dim).vectors)
                if sum(map(len, rows)) >= self.config.train_sample:
                    break
            sample = np.concatenate(rows)[:self.config.train_sample].astype(np.float32)
        self._choose_heads(sample, self._count)
        self._sample = None
        grouped = self._spill_store("grouped")
        pending: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        pending_bytes, seq = 0, 0
        for _, blob in self._raw.items():
            p = codec.decode(blob, self.dim)
            heads = self._assign(p.vectors)
            rep = np.fromiter((len(h) for h in heads), np.int64, len(heads))
            rows = np.repeat(np.arange(len(p)), rep)
            primary = np.zeros(len(rows), np.uint16)
            primary[np.concatenate([[0], np.cumsum(rep)[:-1]])] = 1  # the nearest head comes first
            vecs = p.vectors[rows].astype(self.config.vector_dtype)
            pending.append((np.concatenate(heads).astype(np.int64), p.ids[rows], primary, vecs))
            pending_bytes += vecs.nbytes
            if pending_bytes >= self.config.stage_bytes:
                self._spill_grouped(grouped, pending, seq)
                pending, pending_bytes, seq = [], 0, seq + 1
        self._spill_grouped(grouped, pending, seq)
        batch: dict[int, bytes] = {}
        head, parts = None, []
        for key, blob in grouped.items():  # keys sort by head, then by spill
            h = key >> 24
            if h != head and parts:
                batch[head] = self._finish_posting(head, parts)
                parts = []
                if len(batch) >= 512:
                    self.store.write(batch)
                    batch = {}
            head = h
            parts.append(codec.decode(blob, self.dim))
        if parts:
            batch[head] = self._finish_posting(head, parts)
        self.store.write(batch)
        for spill in (self._raw, grouped):
            spill.close()
        self._raw = None
        self._drop_spills()

    @staticmethod
    def _spill_grouped(grouped: LmdbBlobStore, pending: list, seq: int) -> None:
        if not pending:
            return
        heads, ids, prim, vecs = (np.concatenate(c) for c in zip(*pending))
        order = np.argsort(heads, kind="stable")
        heads, ids, prim, vecs = heads[order], ids[order], prim[order], vecs[order]
        bounds = np.flatnonzero(np.diff(heads)) + 1
        puts = {}
        for part in np.split(np.arange(len(heads)), bounds):
            puts[(int(heads[part[0]]) << 24) | seq] = codec.encode(Posting(ids[part], prim[part], vecs[part]))
        grouped.write(puts)

    def _finish_posting(self, head: int, parts: list[Posting]) -> bytes:
        p = parts[0]
        for q in parts[1:]:
            p = p.concat(q)
        if len(p) > self.max_posting:
            # keep every primary entry, then the closest replicas
            d = squared_distances(p.vectors.astype(np.float32), self.heads.vectors[head:head + 1])[:, 0]
            d[p.versions == 1] = -1.0
            keep = np.sort(np.argsort(d, kind="stable")[:max(self.max_posting, int((p.versions == 1).sum()))])
            p = p.take(keep)
        return codec.encode(Posting(p.ids, np.zeros(len(p), np.uint16), p.vectors), self.config.compress)

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

    def probe_lists(self, queries: np.ndarray, params: SearchParams | None = None) -> list[np.ndarray]:
        """Heads each query probes after query-aware pruning (nearest first)."""
        eps = self.config.prune_epsilon if params is None or params.prune_epsilon is None else params.prune_epsilon
        cap = self.config.max_lists if params is None or params.nprobe is None else params.nprobe
        d, ids = self.heads.search(queries, cap)
        dist = np.sqrt(np.maximum(d, 0))
        keep = (ids >= 0) & (dist <= (1 + eps) * np.maximum(dist[:, :1], 1e-6))
        keep[:, 0] = ids[:, 0] >= 0
        return [ids[r][keep[r]] for r in range(len(ids))]

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
            lists = self.probe_lists(queries, params)
            hidden = self._hidden_ids(tenant)
            for start in range(0, len(queries), self.QUERY_CHUNK):
                chunk = slice(start, start + self.QUERY_CHUNK)
                self._scan(queries[chunk], k, lists[chunk], hidden, allowed_ids, out.ids[chunk], out.scores[chunk])
        return out

    #: Queries scanned together: their lists are read and decoded once into one arena.
    QUERY_CHUNK = 256

    def _scan(self, queries: np.ndarray, k: int, lists: list[np.ndarray], hidden: np.ndarray | None,
              allowed_ids: np.ndarray | None, out_ids: np.ndarray, out_scores: np.ndarray) -> None:
        """Score each query's probed lists, skipping stale, deleted and hidden entries.

        The chunk's lists are read in one transaction and decoded once; each query then
        scores list by list (a matrix-vector product per list beats gathering the rows)."""
        wanted = np.unique(np.concatenate(lists))
        deleted = np.fromiter(self._deleted, np.int64, len(self._deleted)) if self._deleted else None
        limit = k * (self.config.replicas + 1)  # replicas share a score: this many hold k distinct ids
        with self.store.viewing(self.config.fetch_threads) as read:
            decoded: dict[int, tuple[np.ndarray, np.ndarray]] = {}
            blobs = read(wanted.tolist())
            for h, blob in zip(wanted.tolist(), blobs):
                if blob is None:
                    continue
                p = codec.decode(blob, self.dim)
                ok = p.versions == self._current_versions(p.ids) if self._versions else None
                for mask in (~np.isin(p.ids, deleted) if deleted is not None else None,
                             ~np.isin(p.ids, hidden) if hidden is not None else None,
                             np.isin(p.ids, allowed_ids) if allowed_ids is not None else None):
                    if mask is not None:
                        ok = mask if ok is None else ok & mask
                vecs = p.vectors.astype(np.float32, copy=False)
                if ok is not None and not ok.all():
                    decoded[h] = (p.ids[ok], vecs[ok])
                else:
                    decoded[h] = (p.ids, vecs)
            for q, heads in enumerate(lists):
                parts = [decoded[h] for h in heads.tolist() if h in decoded]
                if not parts:
                    continue
                ids = np.concatenate([i for i, _ in parts])
                if not len(ids):
                    continue
                if self.metric == "ip":
                    scores = np.concatenate([v @ queries[q] for _, v in parts])
                else:
                    scores = -np.concatenate([((v - queries[q]) ** 2).sum(1) for _, v in parts])
                m = min(len(ids), limit)
                cand = np.argpartition(-scores, m - 1)[:m] if m < len(ids) else np.arange(len(ids))
                cand = cand[np.argsort(-scores[cand], kind="stable")]
                _, first = np.unique(ids[cand], return_index=True)
                top = cand[np.sort(first)][:k]
                out_ids[q, :len(top)] = ids[top]
                out_scores[q, :len(top)] = scores[top]

    def _hidden_ids(self, tenant: str | None) -> np.ndarray | None:
        if not self._tenants:
            return None
        hidden = [i for i, ts in self._tenants.items() if tenant is None or tenant not in ts]
        return np.asarray(hidden, np.int64) if hidden else None

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
        puts, oversized = {}, []
        for h in keys:
            rows = np.asarray(by_head[h])
            new = Posting(ids[rows], versions[rows], vectors[rows].astype(self.config.vector_dtype))
            blob = current[h]
            p = codec.decode(blob, self.dim).concat(new) if blob is not None else new
            puts[h] = codec.encode(p, self.config.compress)
            if len(p) > self.max_posting:
                oversized.append(h)
        self.store.write(puts)
        for h in oversized:
            if self.heads.alive[h]:
                self._split(h, depth)

    def _split(self, head: int, depth: int) -> None:
        (blob,) = self.store.get_many([head])
        p = codec.decode(blob, self.dim)
        p = p.take(self._valid(p))
        if len(p) <= self.max_posting or depth > 4:
            self.store.write({head: codec.encode(p, self.config.compress)})
            return
        vecs = p.vectors.astype(np.float32)
        centroids, assign = balanced_kmeans(vecs, 2, slack=1.2, seed=self.config.seed + head)
        old_centroid = self.heads.vectors[head].copy()
        self.heads.remove(head)
        new_heads = self.heads.add(centroids)
        puts = {int(h): codec.encode(p.take(assign == c), self.config.compress) for c, h in enumerate(new_heads)}
        self.store.write(puts, deletes=[head])
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
            q = codec.decode(nb, self.dim)
            q = q.take(self._valid(q))
            if not len(q):
                continue
            qv = q.vectors.astype(np.float32)
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
            self._deleted.update(new)
            for i in new:
                self._tenants.pop(i, None)
            self._count = max(0, self._count - len(new))
        return len(new)

    def compact(self) -> None:
        """Merge tiny lists into their neighbours (their vectors are reinserted), then rewrite
        every list without stale or deleted entries and reset versions: afterwards every
        stored entry is current and no tombstone is needed."""
        with self._lock:
            self._seal()
            orphan_ids, orphan_vecs = [], []
            for h in self.store.keys():
                if self.heads.count <= 1:
                    break
                p = codec.decode(self.store.get_many([h])[0], self.dim)
                p = p.take(self._valid(p))
                if len(p) < self.config.min_posting:
                    self.heads.remove(h)
                    self.store.write({}, deletes=[h])
                    orphan_ids.append(p.ids)
                    orphan_vecs.append(p.vectors.astype(np.float32))
            if orphan_ids and len(ids := np.concatenate(orphan_ids)):
                ids, first = np.unique(ids, return_index=True)
                self._count -= len(ids)
                self._insert(ids, np.concatenate(orphan_vecs)[first])
            for h in self.store.keys():
                p = codec.decode(self.store.get_many([h])[0], self.dim)
                p = p.take(self._valid(p))
                self.store.write({h: codec.encode(Posting(p.ids, np.zeros(len(p), np.uint16), p.vectors),
                                                  self.config.compress)})
            self._versions, self._deleted, self._filter_cache = {}, set(), None

    # -- persistence ----------------------------------------------------------------------------

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with self._lock:
            self._seal()
            np.savez(directory / ARRAYS_FILE, heads=self.heads.vectors, alive=self.heads.alive,
                     version_ids=np.fromiter(self._versions.keys(), np.int64, len(self._versions)),
                     version_vals=np.fromiter(self._versions.values(), np.int64, len(self._versions)),
                     deleted=np.fromiter(self._deleted, np.int64, len(self._deleted)))
            state = {"dim": self.dim, "metric": self.metric, "config": asdict(self.config),
                     "max_posting": self.max_posting, "count": self._count,
                     "tenants": {str(i): sorted(t) for i, t in self._tenants.items()}}
            (directory / STATE_FILE).write_text(json.dumps(state))
            if isinstance(self.store, LmdbBlobStore) and self.store._owned:
                target = directory / POSTINGS_DIR
                if self.store.path is None or target.resolve() != Path(self.store.path).resolve():
                    shutil.rmtree(target, ignore_errors=True)
                    target.mkdir(parents=True)
                    self.store.env.copy(str(target), compact=True)
            self._saved_dir = directory

    @classmethod
    def load(cls, directory: Path, storage: BlobStore | None = None) -> "SpannIndex":
        directory = Path(directory)
        state = json.loads((directory / STATE_FILE).read_text())
        if storage is None:
            storage = LmdbBlobStore.open(directory / POSTINGS_DIR)
        index = cls(state["dim"], state["metric"], storage=storage, **state["config"])
        arrays = np.load(directory / ARRAYS_FILE)
        index.heads.reset(arrays["heads"], arrays["alive"])
        index._versions = dict(zip(arrays["version_ids"].tolist(), arrays["version_vals"].tolist()))
        index._deleted = set(arrays["deleted"].tolist())
        index._tenants = {int(i): frozenset(t) for i, t in state["tenants"].items()}
        index.max_posting = state["max_posting"]
        index._count = state["count"]
        index._saved_dir = directory
        return index

    def stats(self) -> IndexStats:
        tenants = sum(64 + 32 * len(t) for t in self._tenants.values())
        memory = self.heads.memory_bytes() + 40 * (len(self._versions) + len(self._deleted)) + tenants
        saved = getattr(self, "_saved_dir", None)
        disk = self.store.disk_bytes() + (sum(f.stat().st_size for f in Path(saved).glob("spann.*")) if saved else 0)
        return IndexStats(self.kind, self._count, self.dim, memory, disk,
                          {"heads": self.heads.count, "max_posting": self.max_posting,
                           "stale_versions": len(self._versions), "tombstones": len(self._deleted)})

    def __del__(self) -> None:
        for d in getattr(self, "_spills", ()):
            shutil.rmtree(d, ignore_errors=True)
        scratch = getattr(self, "_scratch", None)
        if scratch is not None:
            try:
                self.store.close()
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
