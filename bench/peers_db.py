"""Adapters for the embedded vector databases: LanceDB (IVF_PQ, IVF_FLAT) and Milvus Lite.

They store rows (id + vector) in their own on-disk formats, so the adapters insert the
base as table rows and read ids back from result rows, as an application would.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bench.adapter import Adapter, pad_ids, require

_INSERT_BATCH = 50_000


class _LanceDB(Adapter):
    """A LanceDB table on local disk with one vector index; ids are a column."""

    index_type = ""
    build_keys = ("num_partitions",)
    search_keys = ("nprobes",)
    table = "vectors"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._tbl = None

    @classmethod
    def check_available(cls) -> None:
        require("lancedb", "pip install lancedb")

    def _distance(self) -> str:
        return "dot" if self.metric == "ip" else "l2"

    def _config(self, params: dict[str, Any], n: int):
        raise NotImplementedError

    def build(self, base: np.ndarray, params: dict[str, Any], tenants: list[list[str]] | None = None) -> None:
        lancedb = require("lancedb", "pip install lancedb")
        import pyarrow as pa

        db = lancedb.connect(str(self.workdir))

        def batches():
            for start in range(0, len(base), _INSERT_BATCH):
                chunk = np.ascontiguousarray(base[start:start + _INSERT_BATCH], np.float32)
                yield pa.record_batch([
                    pa.array(np.arange(start, start + len(chunk), dtype=np.int64)),
                    pa.FixedSizeListArray.from_arrays(pa.array(chunk.ravel()), self.dim)], names=["id", "vector"])

        schema = pa.schema([("id", pa.int64()), ("vector", pa.list_(pa.float32(), self.dim))])
        tbl = db.create_table(self.table, data=pa.RecordBatchReader.from_batches(schema, batches()))
        tbl.create_index("vector", config=self._config(params, len(base)))

    def load(self, params: dict[str, Any]) -> None:
        lancedb = require("lancedb", "pip install lancedb")
        self._tbl = lancedb.connect(str(self.workdir)).open_table(self.table)

    def _query(self, q, params: dict[str, Any]):
        return q.nprobes(int(params.get("nprobes", 20)))

    def search(self, queries: np.ndarray, k: int, params: dict[str, Any], tenant: str | None = None) -> np.ndarray:
        q = self._tbl.search(queries if len(queries) > 1 else queries[0]).distance_type(self._distance()).limit(k)
        # Naming _distance keeps lance from warning on every query (its auto-projection notice).
        res = self._query(q, params).select(["id", "_distance"]).to_arrow()
        ids = res.column("id").to_numpy()
        if len(queries) == 1:
            return pad_ids([ids.tolist()], k)
        # Multi-vector queries return one row per hit, tagged with the query's index.
        qi = res.column("query_index").to_numpy()
        rows: list[list[int]] = [[] for _ in range(len(queries))]
        for i, v in zip(qi.tolist(), ids.tolist()):
            rows[i].append(v)
        return pad_ids(rows, k)

    def close(self) -> None:
        self._tbl = None


class LanceIVFPQ(_LanceDB):
    name = "lancedb-ivfpq"
    build_keys = ("num_partitions", "num_sub_vectors")
    search_keys = ("nprobes", "refine_factor")

    def _config(self, params, n):
        from lancedb.index import IvfPq

        sub = int(params.get("num_sub_vectors", _divisor_near(self.dim, self.dim // 2)))
        return IvfPq(distance_type=self._distance(), num_partitions=int(params.get("num_partitions", 512)),
                     num_sub_vectors=sub)

    def _query(self, q, params):
        q = q.nprobes(int(params.get("nprobes", 20)))
        refine = int(params.get("refine_factor", 0))
        return q.refine_factor(refine) if refine else q  # refine re-ranks with full vectors


class LanceIVFFlat(_LanceDB):
    name = "lancedb-ivfflat"

    def _config(self, params, n):
        from lancedb.index import IvfFlat

        return IvfFlat(distance_type=self._distance(), num_partitions=int(params.get("num_partitions", 512)))


def _divisor_near(dim: int, target: int) -> int:
    """The divisor of dim closest to target (PQ sub-vectors must split dim evenly)."""
    divisors = [d for d in range(1, dim + 1) if dim % d == 0]
    return min(divisors, key=lambda d: (abs(d - target), -d))


class MilvusLite(Adapter):
    """Milvus Lite 3.x, its own embedded `MilvusLite` API (not pymilvus)."""

    name = "milvus-lite"
    build_keys = ("index_type", "nlist", "M", "efConstruction")
    search_keys = ("nprobe", "ef")
    collection = "vectors"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._db = None
        self._col = None

    @classmethod
    def check_available(cls) -> None:
        require("milvus_lite", "pip install milvus-lite")

    def _open_db(self):
        ml = require("milvus_lite", "pip install milvus-lite")
        return ml, ml.MilvusLite(str(self.workdir))

    def build(self, base: np.ndarray, params: dict[str, Any], tenants: list[list[str]] | None = None) -> None:
        ml, db = self._open_db()
        try:
            schema = ml.CollectionSchema(fields=[
                ml.FieldSchema(name="id", dtype=ml.DataType.INT64, is_primary=True),
                ml.FieldSchema(name="vec", dtype=ml.DataType.FLOAT_VECTOR, dim=self.dim)])
            col = db.create_collection(self.collection, schema)
            for start in range(0, len(base), _INSERT_BATCH):
                chunk = base[start:start + _INSERT_BATCH].tolist()  # it validates lists, not arrays
                col.insert([{"id": start + i, "vec": v} for i, v in enumerate(chunk)])
            col.flush()
            index_type = str(params.get("index_type", "IVF_FLAT")).upper()
            build = {k: int(params[k]) for k in ("nlist", "M", "efConstruction") if k in params}
            col.create_index("vec", {"index_type": index_type, "metric_type": "IP" if self.metric == "ip" else "L2",
                                     "params": build})
            col.load()  # builds and persists the per-segment index files
        finally:
            db.close()

    def load(self, params: dict[str, Any]) -> None:
        _, self._db = self._open_db()
        self._col = self._db.get_collection(self.collection)
        self._col.load()

    def search(self, queries: np.ndarray, k: int, params: dict[str, Any], tenant: str | None = None) -> np.ndarray:
        sp = {key: int(params[key]) for key in ("nprobe", "ef") if key in params}
        hits = self._col.search(queries.tolist(), top_k=k, search_params=sp, output_fields=[])
        return pad_ids([[h["id"] for h in row] for row in hits], k)

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
        self._db = self._col = None
