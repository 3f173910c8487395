"""Multi-tenant peers: the two ways systems serve tenants today, and a graph with a filter.

- per-tenant-ivf: one faiss index per tenant (IVF-Flat with sqrt(n) lists, exact flat below
  `flat_below` vectors): fast, but every grant stores the vector again.
- shared-ivf-filter: one faiss IVF-Flat over all vectors; a tenant's search carries an
  IDSelectorBitmap of what it may see, set from a sparse per-tenant bitmap at each call, so
  memory stays that of the shared index.
- hnswlib-filter: one hnswlib graph; the search filter is a per-call boolean mask of the
  tenant's rows.
- milvus-lite-filter: one Milvus Lite collection with an ARRAY<INT64> `tenants` field; a
  search carries the filter expression `array_contains_any(tenants, [t, -1])` (-1: public),
  which Milvus Lite evaluates into a row mask handed to its index, as a Milvus application would.

Public base vectors (no tenant) are visible to every tenant: the per-tenant peer keeps
them in one more index whose results are merged; the filtering peers add them to the mask.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from bench.adapter import Adapter, pad_ids, require
from bench.peers import _faiss
from bench.peers_db import _INSERT_BATCH, MilvusLite

TENANTS_FILE = "tenants.npz"
#: Key of the public vectors' group in the per-tenant files.
PUBLIC = ""


def tenant_rows(tenants: list[list[str]] | None, n: int) -> dict[str, np.ndarray]:
    """Sorted row numbers per tenant name, public rows under PUBLIC."""
    groups: dict[str, list[int]] = {}
    for row, names in enumerate(tenants if tenants is not None else [[]] * n):
        for name in (names or [PUBLIC]):
            groups.setdefault(name, []).append(row)
    return {name: np.asarray(rows, np.int64) for name, rows in groups.items()}


def save_groups(path: Path, groups: dict[str, np.ndarray]) -> None:
    names = sorted(groups)
    sizes = np.asarray([len(groups[t]) for t in names], np.int64)
    rows = np.concatenate([groups[t] for t in names]) if names else np.zeros(0, np.int64)
    np.savez(path, names=np.asarray(json.dumps(names)), sizes=sizes, rows=rows)


def load_groups(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        names = json.loads(str(z["names"]))
        return dict(zip(names, np.split(z["rows"], np.cumsum(z["sizes"])[:-1])))


def merge_top_k(parts: list[tuple[np.ndarray, np.ndarray]], k: int, metric: str) -> np.ndarray:
    """Ids (Q, k) of the best k over several (distances, ids) results of the same queries."""
    dist = np.hstack([d for d, _ in parts])
    ids = np.hstack([i for _, i in parts])
    better = -dist if metric == "ip" else dist
    better = np.where(ids < 0, np.inf, better)
    order = np.argsort(better, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(ids, order, 1)


class PerTenantIVF(Adapter):
    """One faiss index per tenant, all serialised into one file."""

    name = "per-tenant-ivf"
    build_keys = ("flat_below",)
    search_keys = ("nprobe",)
    supports_tenants = True
    file_name = "tenant_indexes.npz"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._indexes: dict[str, Any] = {}

    @classmethod
    def check_available(cls) -> None:
        _faiss()

    def _new(self, x: np.ndarray, flat_below: int):
        faiss = _faiss()
        metric = faiss.METRIC_INNER_PRODUCT if self.metric == "ip" else faiss.METRIC_L2
        flat = faiss.IndexFlatIP(self.dim) if self.metric == "ip" else faiss.IndexFlatL2(self.dim)
        if len(x) < flat_below:
            return faiss.IndexIDMap(flat)
        # sqrt(n) lists, at most n / 39 of them: faiss's k-means wants 39 points per centroid
        nlist = max(1, min(round(np.sqrt(len(x))), len(x) // 39))
        index = faiss.IndexIVFFlat(flat, self.dim, nlist, metric)
        index.own_fields = True
        flat.this.disown()  # the IVF index frees its quantizer
        index.train(x)
        return index

    def build(self, base: np.ndarray, params: dict[str, Any], tenants: list[list[str]] | None = None) -> None:
        faiss = _faiss()
        flat_below = int(params.get("flat_below", 1000))
        blobs = {}
        for name, rows in tenant_rows(tenants, len(base)).items():
            x = np.ascontiguousarray(base[rows], np.float32)
            index = self._new(x, flat_below)
            index.add_with_ids(x, rows)
            blobs[name] = faiss.serialize_index(index)
        self.workdir.mkdir(parents=True, exist_ok=True)
        names = sorted(blobs)
        np.savez(self.workdir / self.file_name, names=np.asarray(json.dumps(names)),
                 **{f"i{i}": blobs[name] for i, name in enumerate(names)})

    def load(self, params: dict[str, Any]) -> None:
        faiss = _faiss()
        with np.load(self.workdir / self.file_name) as z:  # one tenant's bytes in memory at a time
            names = json.loads(str(z["names"]))
            self._indexes = {name: faiss.deserialize_index(z[f"i{i}"]) for i, name in enumerate(names)}

    def search(self, queries: np.ndarray, k: int, params: dict[str, Any],
               tenant: str | None = None) -> np.ndarray:
        faiss = _faiss()
        ivf_params = faiss.SearchParametersIVF(nprobe=int(params.get("nprobe", 8)))
        parts = []
        for name in {PUBLIC, tenant} - {None}:
            index = self._indexes.get(name)
            if index is not None:
                is_ivf = isinstance(index, faiss.IndexIVF)
                parts.append(index.search(queries, k, params=ivf_params if is_ivf else None))
        if not parts:
            return np.full((len(queries), k), -1, np.int64)
        return parts[0][1].astype(np.int64) if len(parts) == 1 else merge_top_k(parts, k, self.metric)

    def close(self) -> None:
        self._indexes = {}

    def index_files(self) -> list[Path]:
        return [self.workdir / self.file_name]


class _FilteredShared(Adapter):
    """One shared index over all rows plus each tenant's sorted rows, to filter with."""

    supports_tenants = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._groups: dict[str, np.ndarray] = {}
        self._n = 0

    def _save_tenants(self, base: np.ndarray, tenants: list[list[str]] | None) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        save_groups(self.workdir / TENANTS_FILE, tenant_rows(tenants, len(base)))

    def _load_tenants(self, n: int) -> None:
        self._groups = load_groups(self.workdir / TENANTS_FILE)
        self._n = n

    def _visible(self, tenant: str | None) -> list[np.ndarray]:
        return [self._groups[t] for t in {PUBLIC, tenant} - {None} if t in self._groups]


class SharedIVFFilter(_FilteredShared):
    name = "shared-ivf-filter"
    build_keys = ("nlist",)
    search_keys = ("nprobe",)
    file_name = "shared.faiss"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._index = None
        self._bitmap = np.zeros(0, np.uint8)
        self._sparse: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    @classmethod
    def check_available(cls) -> None:
        _faiss()

    def build(self, base: np.ndarray, params: dict[str, Any], tenants: list[list[str]] | None = None) -> None:
        faiss = _faiss()
        quantizer = faiss.IndexFlatIP(self.dim) if self.metric == "ip" else faiss.IndexFlatL2(self.dim)
        metric = faiss.METRIC_INNER_PRODUCT if self.metric == "ip" else faiss.METRIC_L2
        index = faiss.IndexIVFFlat(quantizer, self.dim, int(params.get("nlist", 1024)), metric)
        index.own_fields = True
        quantizer.this.disown()
        index.train(base)
        index.add(base)
        self._save_tenants(base, tenants)
        faiss.write_index(index, str(self.workdir / self.file_name))

    def load(self, params: dict[str, Any]) -> None:
        self._index = _faiss().read_index(str(self.workdir / self.file_name))
        self._load_tenants(self._index.ntotal)
        self._bitmap = np.zeros((self._n + 7) // 8, np.uint8)
        # A tenant's bitmap, kept sparse: the bytes it sets, and their values.
        for name, rows in self._groups.items():
            byte, first = np.unique(rows >> 3, return_index=True)
            bits = np.bitwise_or.reduceat((1 << (rows & 7)).astype(np.uint8), first) if len(rows) else rows
            self._sparse[name] = (byte, bits.astype(np.uint8))

    def search(self, queries: np.ndarray, k: int, params: dict[str, Any],
               tenant: str | None = None) -> np.ndarray:
        faiss = _faiss()
        self._bitmap[:] = 0
        for t in {PUBLIC, tenant} - {None}:
            if t in self._sparse:
                byte, bits = self._sparse[t]
                self._bitmap[byte] |= bits
        sel = faiss.IDSelectorBitmap(self._n, faiss.swig_ptr(self._bitmap))
        sp = faiss.SearchParametersIVF(nprobe=int(params.get("nprobe", 16)), sel=sel)
        _, ids = self._index.search(queries, k, params=sp)
        return ids.astype(np.int64, copy=False)

    def close(self) -> None:
        self._index = None

    def index_files(self) -> list[Path]:
        return [self.workdir / self.file_name, self.workdir / TENANTS_FILE]


class HnswlibFilter(_FilteredShared):
    name = "hnswlib-filter"
    build_keys = ("M", "ef_construction")
    search_keys = ("ef",)
    file_name = "index.hnsw"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._index = None
        self._mask = np.zeros(0, bool)

    @classmethod
    def check_available(cls) -> None:
        require("hnswlib", "pip install hnswlib")

    def build(self, base: np.ndarray, params: dict[str, Any], tenants: list[list[str]] | None = None) -> None:
        hnswlib = require("hnswlib", "pip install hnswlib")
        index = hnswlib.Index(space=self.metric, dim=self.dim)
        index.init_index(max_elements=len(base), M=int(params.get("M", 16)),
                         ef_construction=int(params.get("ef_construction", 100)), random_seed=100)
        index.add_items(base, np.arange(len(base)), num_threads=self.threads)
        self._save_tenants(base, tenants)
        index.save_index(str(self.workdir / self.file_name))

    def load(self, params: dict[str, Any]) -> None:
        hnswlib = require("hnswlib", "pip install hnswlib")
        self._index = hnswlib.Index(space=self.metric, dim=self.dim)
        self._index.load_index(str(self.workdir / self.file_name))
        self._index.set_num_threads(self.threads)
        self._load_tenants(self._index.get_current_count())
        self._mask = np.zeros(self._n, bool)

    def search(self, queries: np.ndarray, k: int, params: dict[str, Any],
               tenant: str | None = None) -> np.ndarray:
        visible = self._visible(tenant)
        kk = min(k, sum(len(v) for v in visible))
        if not kk:
            return np.full((len(queries), k), -1, np.int64)
        self._mask[:] = False
        for rows in visible:
            self._mask[rows] = True
        self._index.set_ef(max(kk, int(params.get("ef", 64))))
        labels, _ = self._index.knn_query(queries, k=kk, num_threads=self.threads,
                                          filter=self._mask.__getitem__)
        return pad_ids(labels.tolist(), k)

    def close(self) -> None:
        self._index = None

    def index_files(self) -> list[Path]:
        return [self.workdir / self.file_name, self.workdir / TENANTS_FILE]


class MilvusLiteFilter(MilvusLite):
    """Milvus Lite with tenants as an array field and a filter expression per search."""

    name = "milvus-lite-filter"
    supports_tenants = True
    codes_file = "tenant_codes.json"
    #: Code of "visible to every tenant" in the tenants array.
    PUBLIC_CODE = -1

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._codes: dict[str, int] = {}

    def build(self, base: np.ndarray, params: dict[str, Any], tenants: list[list[str]] | None = None) -> None:
        ml, db = self._open_db()
        names = sorted({t for ts in tenants or [] for t in ts})
        codes = {name: i for i, name in enumerate(names)}
        width = max([len(ts) for ts in tenants or []] + [1])
        try:
            schema = ml.CollectionSchema(fields=[
                ml.FieldSchema(name="id", dtype=ml.DataType.INT64, is_primary=True),
                ml.FieldSchema(name="vec", dtype=ml.DataType.FLOAT_VECTOR, dim=self.dim),
                ml.FieldSchema(name="tenants", dtype=ml.DataType.ARRAY, element_type=ml.DataType.INT64,
                               max_capacity=width)])
            col = db.create_collection(self.collection, schema)
            for start in range(0, len(base), _INSERT_BATCH):
                chunk = base[start:start + _INSERT_BATCH].tolist()  # it validates lists, not arrays
                col.insert([{"id": start + i, "vec": v,
                             "tenants": [codes[t] for t in tenants[start + i]] or [self.PUBLIC_CODE]
                             if tenants is not None else [self.PUBLIC_CODE]} for i, v in enumerate(chunk)])
            col.flush()
            index_type = str(params.get("index_type", "IVF_FLAT")).upper()
            build = {k: int(params[k]) for k in ("nlist", "M", "efConstruction") if k in params}
            col.create_index("vec", {"index_type": index_type, "metric_type": "IP" if self.metric == "ip" else "L2",
                                     "params": build})
            col.load()
        finally:
            db.close()
        (self.workdir / self.codes_file).write_text(json.dumps(codes))

    def load(self, params: dict[str, Any]) -> None:
        super().load(params)
        self._codes = json.loads((self.workdir / self.codes_file).read_text())

    def search(self, queries: np.ndarray, k: int, params: dict[str, Any], tenant: str | None = None) -> np.ndarray:
        sp = {key: int(params[key]) for key in ("nprobe", "ef") if key in params}
        code = self._codes.get(tenant) if tenant is not None else None
        expr = (f"array_contains(tenants, {self.PUBLIC_CODE})" if code is None
                else f"array_contains_any(tenants, [{code}, {self.PUBLIC_CODE}])")
        hits = self._col.search(queries.tolist(), top_k=k, search_params=sp, expr=expr, output_fields=[])
        return pad_ids([[h["id"] for h in row] for row in hits], k)


TENANT_PEERS: tuple[type[Adapter], ...] = (PerTenantIVF, SharedIVFFilter, HnswlibFilter, MilvusLiteFilter)
