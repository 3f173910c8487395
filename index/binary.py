"""BEBR binary index: learned multi-bit codes in RAM, SDC scan, full-precision rerank.

- Codes: a recurrent binarizer (index/binarizer.py) trained on a sample of the vectors turns
  each vector into m dims x u bits; all codes sit in RAM, plane-major (index/sdc.py).
- Scan: Symmetric Distance Calculation, the query binarized too and scored by popcounts,
  over all codes (`ivf_lists` 0) or over the lists of an IVF whose nearest `nprobe` lists a
  query probes (centroids from balanced k-means on the floats).
- Rerank: the top k x oversample candidates are rescored with full-precision vectors read
  from a BlobStore (`FloatStore`), so codes decide what is read, floats decide the order.
- Versions: a binarizer trained compatibly for another embedding model can be attached;
  its queries (`SearchParams.query_model` naming that model, or `search_as`) search these
  codes. The stored floats belong to the index's own model, so a raw float score of another
  model's query against them means nothing. A compatible binarizer is a translator into this
  model's space followed by a copy of this index's binarizer, so the query is translated
  (its reconstruction as an own-model vector), binarized by our binarizer (the same codes
  the compatible binarizer makes) and reranked with the stored floats against the
  translation, exactly like an own-model query. A compatible binarizer without a translator
  (none made by this code, but loadable) ranks by SDC alone.
- One binarizer per datastore: `use_binarizer` makes an index adopt a binarizer trained
  elsewhere (on a sample across all shards), re-encoding its codes from the stored floats,
  so every shard's codes come from the same model and a compatible binarizer fits them all.

Tenant visibility and id filters restrict the rows scanned, never the results afterwards.
"""

from __future__ import annotations

import json
import math
import shutil
import threading
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING

import faiss
import numpy as np

from index import sdc
from index.base import (
    MISSING_ID,
    IndexStats,
    Metric,
    SearchParams,
    SearchResult,
    check_dim_metric,
    check_ids,
    check_vectors,
)
from index.binarizer_config import BinarizerConfig
from index.kmeans import balanced_kmeans
from index.storage import BlobStore, LmdbBlobStore, scratch_store

if TYPE_CHECKING:  # torch loads only when a binary index trains or opens
    from index.binarizer import Binarizer

FORMAT_VERSION = 1
STATE_FILE = "binary.json"
ARRAYS_FILE = "binary.npz"
MODEL_FILE = "binarizer.pt"
VECTORS_DIR = "vectors"
#: Bytes of int32 scores one scan step holds: bounds memory whatever the batch size.
SCAN_BYTES = 8 << 20
#: Floats one rerank step reads and gathers.
RERANK_FLOATS = 1 << 20
WRITE_BATCH = 65_536
#: Rows per IVF centroid used to train the coarse quantizer.
KMEANS_ROWS_PER_LIST = 64


@dataclass(frozen=True)
class BinaryConfig(BinarizerConfig):
    """The binarizer's shape and training settings (BinarizerConfig) and the index's own."""

    #: Default SearchParams.oversample: candidates reranked per result.
    oversample: float = 8.0
    #: IVF lists over the codes; 0 scans every code.
    ivf_lists: int = 0
    #: Default SearchParams.nprobe when ivf_lists > 0.
    nprobe: int = 16
    #: The embedding model version the codes are made for (recorded in the model file).
    embedding_version: str = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        checks = {"oversample": math.isfinite(self.oversample) and self.oversample >= 1,
                  "ivf_lists": self.ivf_lists >= 0, "nprobe": self.nprobe >= 1,
                  "embedding_version": isinstance(self.embedding_version, str)}
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"BinaryConfig: invalid {', '.join(f'{k}={getattr(self, k)!r}' for k in bad)}")

    def binarizer_config(self) -> BinarizerConfig:
        return BinarizerConfig(**{f.name: getattr(self, f.name) for f in fields(BinarizerConfig)})


class FloatStore:
    """Full-precision vectors for rerank, in a BlobStore: key = id (uint64), value = the
    vector's float32 bytes (4 x dim, native order). That is all a store must hold, so the
    datastore can hand a shard's LMDB database and the standalone index a private one."""

    def __init__(self, store: BlobStore, dim: int) -> None:
        self.store, self.dim = store, dim

    def put(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        vectors = np.ascontiguousarray(vectors, np.float32)
        for start in range(0, len(ids), WRITE_BATCH):
            part = slice(start, start + WRITE_BATCH)
            self.store.write({int(i): v.tobytes() for i, v in zip(ids[part].tolist(), vectors[part])})

    def delete(self, ids: Iterable[int]) -> None:
        self.store.write({}, deletes=[int(i) for i in ids])

    def get(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(found bool (n,), vectors float32 (n, dim)); rows not found are zeros."""
        width = 4 * self.dim
        with self.store.viewing() as read:
            blobs = read(np.asarray(ids, np.int64).tolist())
            found = np.fromiter((b is not None and len(b) == width for b in blobs), bool, len(blobs))
            zero = bytes(width)
            raw = b"".join(b if ok else zero for b, ok in zip(blobs, found))
        return found, np.frombuffer(raw, np.float32).reshape(len(blobs), self.dim)

    def clear(self) -> None:
        self.store.clear()


def rerank(queries: np.ndarray, candidates: np.ndarray, vectors: FloatStore, metric: Metric, k: int) -> SearchResult:
    """Top-k of each query's candidate ids (Q, n; MISSING_ID pads) by exact float scores.

    Queries go in chunks that read at most RERANK_FLOATS floats, so a large batch with a
    large oversample never holds all its candidates' vectors at once."""
    out = SearchResult.empty(len(queries), k)
    chunk = max(1, RERANK_FLOATS // max(1, candidates.shape[1] * vectors.dim))
    for start in range(0, len(queries), chunk):
        rows = slice(start, start + chunk)
        cand = candidates[rows]
        valid = cand != MISSING_ID
        if not valid.any():
            continue
        uniq, inverse = np.unique(cand[valid], return_inverse=True)
        found, floats = vectors.get(uniq)
        pos = np.zeros(cand.shape, np.int64)
        pos[valid] = inverse
        v, q = floats[pos], queries[rows]
        if metric == "ip":
            scores = np.einsum("qnd,qd->qn", v, q)
        else:
            scores = -((v - q[:, None, :]) ** 2).sum(-1)
        scores = np.where(valid & found[pos], scores, -np.inf).astype(np.float32)
        top = sdc.top_n(scores, k)
        best = np.take_along_axis(scores, top, 1)
        keep = np.isfinite(best)
        out.ids[rows, :top.shape[1]] = np.where(keep, np.take_along_axis(cand, top, 1), MISSING_ID)
        out.scores[rows, :top.shape[1]] = np.where(keep, best, -np.inf)
    return out


class BinaryIndex:
    """Binary codes in RAM over a FloatStore of rerank vectors (a private LMDB when no storage)."""

    kind = "binary"
    uses_storage = True
    config_class = BinaryConfig

    def __init__(self, dim: int, metric: Metric = "ip", storage: BlobStore | None = None, **config) -> None:
        check_dim_metric(dim, metric)
        self.dim, self.metric = dim, metric
        self.config = BinaryConfig(**config)
        self.m, _ = self.config.binarizer_config().dims_for(dim)
        self.words = sdc.words_for(self.m)
        self._scratch: Path | None = None
        if storage is None:  # standalone use (tests, benchmarks): a private LMDB
            storage, self._scratch = scratch_store(self, "binary-", VECTORS_DIR)
        self.vectors = FloatStore(storage, dim)
        self.binarizer: Binarizer | None = None
        self.query_binarizers: dict[str, Binarizer] = {}
        self._lock = threading.RLock()
        self._saved_dir: Path | None = None
        self._reset()

    def _reset(self) -> None:
        self._ids = np.zeros(0, np.int64)
        self._codes = np.zeros((self.config.bits, self.words, 0), np.uint64)  # plane-major (u, W, n)
        self._lists = np.zeros(0, np.int32)
        self._centroids: np.ndarray | None = None
        self._centroid_codes: np.ndarray | None = None
        self._quantizer = None
        self._tenants: dict[int, frozenset[str]] = {}
        self._changed()

    def _changed(self) -> None:
        self._visible_cache: dict[str | None, np.ndarray | None] = {}
        self._ivf: tuple[np.ndarray, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def code_bytes(self) -> int:
        """Bytes of one vector's code."""
        return self.config.bits * self.words * 8

    # -- training and updates -------------------------------------------------------------------

    def train(self, sample: np.ndarray) -> None:
        """Train the binarizer (and the IVF centroids) on `sample`; empties the index. An empty
        sample defers training to the first add, which then trains on what it adds."""
        sample = check_vectors(sample, self.dim, "sample")
        with self._lock:
            self._reset()
            self.vectors.clear()
            self.binarizer = None
            if len(sample):
                self._fit(sample)

    def _fit(self, sample: np.ndarray) -> None:
        from index.binarizer import Binarizer

        cfg = self.config
        self.binarizer = Binarizer(self.dim, cfg.binarizer_config(), cfg.embedding_version).fit(sample, self.metric)
        if cfg.ivf_lists:
            lists = min(cfg.ivf_lists, len(sample))
            rows = min(len(sample), KMEANS_ROWS_PER_LIST * lists)
            pick = np.random.default_rng(cfg.seed).choice(len(sample), rows, replace=False) if rows < len(sample) \
                else np.arange(len(sample))
            self._centroids, _ = balanced_kmeans(sample[np.sort(pick)], lists, seed=cfg.seed)
            self._build_quantizer()

    def _build_quantizer(self) -> None:
        self._quantizer = faiss.IndexFlatL2(self.dim)
        self._quantizer.add(self._centroids)
        self._centroid_codes = sdc.to_planes(self.binarizer.encode(self._centroids))

    def add(self, ids: np.ndarray, vectors: np.ndarray, tenants: Sequence[Iterable[str]] | None = None) -> None:
        vectors = check_vectors(vectors, self.dim)
        ids = check_ids(ids, len(vectors))
        if tenants is not None and len(tenants) != len(ids):
            raise ValueError(f"tenants must have one entry per id ({len(ids)}), got {len(tenants)}")
        if len(ids) and ids.min() < 0:
            raise ValueError("ids must be non-negative")
        if not np.isfinite(vectors).all():
            raise ValueError("vectors hold NaN or infinite values")
        # one row per id: a later row of the same id replaces an earlier one
        _, last = np.unique(ids[::-1], return_index=True)
        keep = np.sort(len(ids) - 1 - last)
        if len(keep) < len(ids):
            ids, vectors = ids[keep], vectors[keep]
            tenants = None if tenants is None else [tenants[i] for i in keep.tolist()]
        if not len(ids):
            return
        with self._lock:
            if self.binarizer is None:
                self._fit(vectors[:self.config.train_sample])
            self._drop_rows(np.isin(self._ids, ids))  # re-adding an id replaces it
            codes = sdc.to_planes(self.binarizer.encode(vectors))
            self._codes = np.concatenate([self._codes, codes], axis=2)
            self._ids = np.concatenate([self._ids, ids])
            if self._quantizer is not None:
                _, nearest = self._quantizer.search(vectors, 1)
                self._lists = np.concatenate([self._lists, nearest[:, 0].astype(np.int32)])
            self.vectors.put(ids, vectors)
            for i, ts in zip(ids.tolist(), tenants if tenants is not None else [()] * len(ids)):
                ts = frozenset(ts)
                if ts:
                    self._tenants[i] = ts
                else:
                    self._tenants.pop(i, None)
            self._changed()

    def _drop_rows(self, mask: np.ndarray) -> None:
        if not mask.any():
            return
        keep = ~mask
        self._codes = np.ascontiguousarray(self._codes[:, :, keep])
        self._ids = self._ids[keep]
        if len(self._lists):
            self._lists = self._lists[keep]
        self._changed()

    def remove(self, ids: np.ndarray) -> int:
        ids = np.asarray(ids, np.int64).ravel()
        with self._lock:
            mask = np.isin(self._ids, ids)
            gone = self._ids[mask]
            self._drop_rows(mask)
            for i in gone.tolist():
                self._tenants.pop(i, None)
            if len(gone):
                self.vectors.delete(gone.tolist())
            return len(gone)

    def use_binarizer(self, binarizer: Binarizer, sample: np.ndarray | None = None) -> bool:
        """Adopt `binarizer` (trained elsewhere, e.g. once for the whole datastore) instead of
        training one; codes already held are re-encoded from the stored floats. IVF centroids
        are trained on `sample` when the index has none yet (else kept: they live in float
        space). Query binarizers trained against the previous binarizer are dropped. Returns
        whether anything changed (False when `binarizer` makes the codes held already)."""
        if binarizer.dim != self.dim or (binarizer.m, binarizer.bits) != (self.m, self.config.bits):
            raise ValueError(f"binarizer makes {binarizer.m}x{binarizer.bits} codes of {binarizer.dim}-d vectors; "
                             f"this index holds {self.m}x{self.config.bits} codes of {self.dim}-d ones")
        with self._lock:
            fingerprint = binarizer.fingerprint()
            if self.binarizer is not None and self.binarizer.fingerprint() == fingerprint:
                return False
            if not len(self._ids):  # an empty index adopting a binarizer: as after train(), no stale floats
                self.vectors.clear()
            self.binarizer = binarizer
            self.query_binarizers = {v: b for v, b in self.query_binarizers.items()
                                     if b.compatible_with == (binarizer.embedding_version, fingerprint)}
            if self.config.ivf_lists and self._centroids is None and sample is not None and len(sample):
                sample = check_vectors(sample, self.dim, "sample")
                lists = min(self.config.ivf_lists, len(sample))
                self._centroids, _ = balanced_kmeans(sample[:KMEANS_ROWS_PER_LIST * lists], lists,
                                                     seed=self.config.seed)
                self._build_quantizer()
                self._lists = np.zeros(0, np.int32)
                if len(self._ids):
                    self._lists = self._assign_all()
            elif self._centroids is not None:
                self._build_quantizer()
            self._codes = self._encode_stored()
            self._changed()
            return True

    def _stored_batches(self) -> Iterable[tuple[slice, np.ndarray]]:
        """(rows, float vectors) of every held id, read back from the FloatStore in batches."""
        step = max(1, RERANK_FLOATS // self.dim)
        for start in range(0, len(self._ids), step):
            rows = slice(start, start + step)
            found, vectors = self.vectors.get(self._ids[rows])
            if not found.all():
                raise ValueError(f"{int((~found).sum())} ids have no stored float vector to re-encode")
            yield rows, vectors

    def _encode_stored(self) -> np.ndarray:
        codes = np.empty((self.config.bits, self.words, len(self._ids)), np.uint64)
        for rows, vectors in self._stored_batches():
            codes[:, :, rows] = sdc.to_planes(self.binarizer.encode(vectors))
        return codes

    def _assign_all(self) -> np.ndarray:
        lists = np.empty(len(self._ids), np.int32)
        for rows, vectors in self._stored_batches():
            lists[rows] = self._quantizer.search(vectors, 1)[1][:, 0]
        return lists

    def attach_query_binarizer(self, binarizer: Binarizer) -> None:
        """Accept queries of another embedding version: `binarizer` must have been trained with
        `fit_compatible` against this index's binarizer."""
        with self._lock:
            if self.binarizer is None:
                raise ValueError("train the index before attaching a query binarizer")
            own = (self.binarizer.embedding_version, self.binarizer.fingerprint())
            if binarizer.compatible_with != own:
                raise ValueError(f"binarizer for {binarizer.embedding_version!r} was trained against "
                                 f"{binarizer.compatible_with}, not this index's codes {own}")
            self.query_binarizers[binarizer.embedding_version] = binarizer

    # -- search ---------------------------------------------------------------------------------

    def search(self, queries: np.ndarray, k: int, tenant: str | None = None, params: SearchParams | None = None,
               allowed_ids: np.ndarray | None = None) -> SearchResult:
        """SDC top k x oversample by codes, then the top k of those by float score; queries of
        another model (`params.query_model` naming an attached query binarizer) by SDC alone."""
        version = params.query_model if params is not None else None
        if version is not None and version in self.query_binarizers:
            return self.search_as(version, queries, k, tenant, params, allowed_ids)
        if version is not None and version != self.own_version and self.own_version:
            raise ValueError(f"no query binarizer for embedding version {version!r}; have "
                             f"{sorted([self.own_version, *self.query_binarizers])}")
        queries = check_vectors(queries, self.dim, "queries")
        n = self._candidates(k, params)
        with self._lock:
            if not len(self) or not len(queries):
                return SearchResult.empty(len(queries), k)
            codes = self.binarizer.encode(queries)
            probes = self._probe(params, floats=queries) if self._quantizer is not None else None
            rows, _ = self._scan(codes, n, self._visible(tenant, allowed_ids), probes)
            candidates = np.where(rows >= 0, self._ids[np.maximum(rows, 0)], MISSING_ID)
            return rerank(queries, candidates, self.vectors, self.metric, k)

    def search_codes(self, codes: np.ndarray, k: int, tenant: str | None = None, params: SearchParams | None = None,
                     allowed_ids: np.ndarray | None = None) -> SearchResult:
        """Top-k by SDC alone (no rerank) for (Q, bits, words) codes of this index's binarizer or
        of a compatible one; scores are the decoded codes' inner products."""
        if codes.ndim != 3 or codes.shape[1:] != (self.config.bits, self.words) or codes.dtype != np.uint64:
            raise ValueError(f"codes must be uint64 (Q, {self.config.bits}, {self.words}), got {codes.dtype} "
                             f"{codes.shape}")
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        with self._lock:
            out = SearchResult.empty(len(codes), k)
            if not len(self) or not len(codes):
                return out
            probes = self._probe(params, codes=codes) if self._quantizer is not None else None
            rows, scores = self._scan(codes, k, self._visible(tenant, allowed_ids), probes)
            out.ids[:, :rows.shape[1]] = np.where(rows >= 0, self._ids[np.maximum(rows, 0)], MISSING_ID)
            out.scores[:, :rows.shape[1]] = np.where(rows >= 0, scores / sdc.score_scale(self.config.bits), -np.inf)
            return out

    def search_as(self, version: str, queries: np.ndarray, k: int, tenant: str | None = None,
                  params: SearchParams | None = None, allowed_ids: np.ndarray | None = None) -> SearchResult:
        """Search with queries embedded by model `version`: the index's own version reranks as
        `search` does; an attached compatible version ranks by codes alone."""
        own = self.own_version
        binarizer = self.query_binarizers.get(version)
        if binarizer is None:
            if version == own:
                return self.search(queries, k, tenant, None if params is None else replace(params, query_model=None),
                                   allowed_ids)
            raise ValueError(f"no query binarizer for embedding version {version!r}; have "
                             f"{sorted([own, *self.query_binarizers])}")
        queries = check_vectors(queries, binarizer.dim, "queries")
        if binarizer.translates:  # its codes are ours of the translation: rerank that like our own query
            own_params = None if params is None else replace(params, query_model=None)
            return self.search(binarizer.translate(queries), k, tenant, own_params, allowed_ids)
        return self.search_codes(binarizer.encode(queries), k, tenant, params, allowed_ids)

    @property
    def own_version(self) -> str:
        """The embedding model version of the vectors this index holds ("" when unnamed)."""
        return self.binarizer.embedding_version if self.binarizer is not None else self.config.embedding_version

    def _candidates(self, k: int, params: SearchParams | None) -> int:
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        oversample = self.config.oversample if params is None or params.oversample is None else params.oversample
        if not (math.isfinite(oversample) and oversample >= 1):
            raise ValueError(f"oversample must be >= 1, got {oversample}")
        return max(k, math.ceil(k * oversample))

    def _visible(self, tenant: str | None, allowed_ids: np.ndarray | None) -> np.ndarray | None:
        """Rows the caller may see (None: all)."""
        mask = None
        if self._tenants:
            if tenant not in self._visible_cache:
                if len(self._visible_cache) > 64:
                    self._visible_cache.clear()
                hidden = [i for i, ts in self._tenants.items() if tenant is None or tenant not in ts]
                self._visible_cache[tenant] = ~np.isin(self._ids, np.asarray(hidden, np.int64)) if hidden else None
            mask = self._visible_cache[tenant]
        if allowed_ids is not None:
            allowed = np.isin(self._ids, np.asarray(allowed_ids, np.int64))
            mask = allowed if mask is None else mask & allowed
        return mask

    def _probe(self, params: SearchParams | None, floats: np.ndarray | None = None,
               codes: np.ndarray | None = None) -> np.ndarray:
        """(Q, nprobe) lists to scan: nearest centroids by float distance, or by SDC of the
        centroids' codes when only codes are at hand (queries of another model version)."""
        nprobe = self.config.nprobe if params is None or params.nprobe is None else params.nprobe
        if nprobe < 1:
            raise ValueError(f"nprobe must be >= 1, got {nprobe}")
        nprobe = min(nprobe, len(self._centroids))
        if floats is not None:
            return self._quantizer.search(floats, nprobe)[1]
        return sdc.top_n(sdc.sdc_int(codes, self._centroid_codes, self.m), nprobe)

    def _inverted_lists(self) -> tuple[np.ndarray, np.ndarray]:
        if self._ivf is None:
            order = np.argsort(self._lists, kind="stable")
            offsets = np.searchsorted(self._lists[order], np.arange(len(self._centroids) + 1))
            self._ivf = (order, offsets)
        return self._ivf

    def _scan(self, codes: np.ndarray, n: int, visible: np.ndarray | None,
              probes: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """(rows (Q, n) padded with -1, integer SDC scores (Q, n)) of the best visible rows."""
        rows_out = np.full((len(codes), n), -1, np.int64)
        scores_out = np.zeros((len(codes), n), np.int64)
        if probes is None:
            rows = np.flatnonzero(visible) if visible is not None else None
            planes = self._codes if rows is None else self._codes[:, :, rows]
            if not planes.shape[2]:
                return rows_out, scores_out
            chunk = max(1, SCAN_BYTES // (4 * planes.shape[2]))
            for start in range(0, len(codes), chunk):
                part = slice(start, start + chunk)
                scores = sdc.sdc_int(codes[part], planes, self.m)
                top = sdc.top_n(scores, n)
                rows_out[part, :top.shape[1]] = top if rows is None else rows[top]
                scores_out[part, :top.shape[1]] = np.take_along_axis(scores, top, 1)
            return rows_out, scores_out
        order, offsets = self._inverted_lists()
        for q, lists in enumerate(probes):
            rows = np.concatenate([order[offsets[c]:offsets[c + 1]] for c in lists.tolist() if c >= 0])
            if visible is not None:
                rows = rows[visible[rows]]
            if not len(rows):
                continue
            scores = sdc.sdc_int(codes[q:q + 1], self._codes[:, :, rows], self.m)
            top = sdc.top_n(scores, n)
            rows_out[q, :top.shape[1]] = rows[top[0]]
            scores_out[q, :top.shape[1]] = scores[0, top[0]]
        return rows_out, scores_out

    # -- persistence ----------------------------------------------------------------------------

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with self._lock:
            arrays = {"ids": self._ids, "codes": self._codes, "lists": self._lists}
            if self._centroids is not None:
                arrays["centroids"] = self._centroids
            tmp = directory / (ARRAYS_FILE + ".tmp.npz")
            np.savez(tmp, **arrays)
            tmp.replace(directory / ARRAYS_FILE)
            query_files = {}
            if self.binarizer is not None:
                self.binarizer.save(directory / MODEL_FILE)
                for n, (version, b) in enumerate(sorted(self.query_binarizers.items())):
                    query_files[version] = f"query-{n}.pt"
                    b.save(directory / query_files[version])
            state = {"format_version": FORMAT_VERSION, "dim": self.dim, "metric": self.metric,
                     "config": asdict(self.config), "trained": self.binarizer is not None,
                     "query_binarizers": query_files,
                     "tenants": {str(i): sorted(t) for i, t in self._tenants.items()}}
            tmp = directory / (STATE_FILE + ".tmp")
            tmp.write_text(json.dumps(state))
            tmp.replace(directory / STATE_FILE)
            store = self.vectors.store
            if isinstance(store, LmdbBlobStore) and store._owned:
                target = directory / VECTORS_DIR
                if store.path is None or target.resolve() != Path(store.path).resolve():
                    shutil.rmtree(target, ignore_errors=True)
                    target.mkdir(parents=True)
                    store.env.copy(str(target), compact=True)
            self._saved_dir = directory

    @classmethod
    def load(cls, directory: Path, storage: BlobStore | None = None) -> BinaryIndex:
        from index.binarizer import Binarizer

        directory = Path(directory)
        state = json.loads((directory / STATE_FILE).read_text())
        if state.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{directory}: binary index format {state.get('format_version')} is not supported "
                             f"(this build reads {FORMAT_VERSION})")
        if storage is None:
            storage = LmdbBlobStore.open(directory / VECTORS_DIR)
        index = cls(state["dim"], state["metric"], storage=storage, **state["config"])
        with np.load(directory / ARRAYS_FILE) as arrays:
            index._ids, index._codes, index._lists = arrays["ids"], arrays["codes"], arrays["lists"]
            if "centroids" in arrays:
                index._centroids = arrays["centroids"]
        if state["trained"]:
            index.binarizer = Binarizer.load(directory / MODEL_FILE)
            index.query_binarizers = {v: Binarizer.load(directory / f) for v, f in state["query_binarizers"].items()}
            if index._centroids is not None:
                index._build_quantizer()
        index._tenants = {int(i): frozenset(t) for i, t in state["tenants"].items()}
        index._saved_dir = directory
        return index

    def stats(self) -> IndexStats:
        model = 0 if self.binarizer is None else sum(p.numel() * 4 for p in self.binarizer.model.parameters())
        ivf = 0 if self._centroids is None else self._centroids.nbytes + self._lists.nbytes + 8 * len(self._lists)
        memory = (self._codes.nbytes + self._ids.nbytes + ivf + model
                  + sum(64 + 32 * len(t) for t in self._tenants.values()))
        saved = self._saved_dir
        files = sum(f.stat().st_size for f in Path(saved).glob("*") if f.is_file()) if saved else 0
        return IndexStats(self.kind, len(self), self.dim, memory, self.vectors.store.disk_bytes() + files,
                          {"bits": self.config.bits, "code_dims": self.m, "code_bytes": self.code_bytes,
                           "model_bytes": model,
                           "binarizer": "" if self.binarizer is None else self.binarizer.fingerprint(),
                           # which start won on held-out data, and whether training beat it ("start": no)
                           "binarizer_start": "" if self.binarizer is None
                           else str(self.binarizer.train_stats.get("start", "")),
                           "binarizer_kept": "" if self.binarizer is None
                           else str(self.binarizer.train_stats.get("kept", "")),
                           "ivf_lists": 0 if self._centroids is None else len(self._centroids),
                           "embedding_version": self.config.embedding_version,
                           "query_versions": sorted(self.query_binarizers)})
