"""One shard: an LMDB environment with named databases for passages, vectors and meta.

Every write is one transaction (sync on commit, so an acknowledged write survives a
crash) that also bumps the shard's write sequence; indexes saved beside the shard record
the sequence they reflect, so a stale index is detected on open and rebuilt.
"""

from __future__ import annotations

import errno
import struct
import threading
from pathlib import Path
from typing import Callable, Iterator, Sequence, TypeVar

import lmdb
import numpy as np

from datastore.errors import FailedPrecondition, ResourceExhausted
from datastore.records import Passage, decode_vectors, encode_vector, key, key_id

DATABASES = ("passages", "vectors", "codes", "postings", "meta")
SEQ_KEY = b"seq"
NEXT_ID_KEY = b"next_id"
INITIAL_MAP_SIZE = 1 << 30
_U64 = struct.Struct(">Q")
T = TypeVar("T")


class Shard:
    """Passages and vectors of one shard; safe to read from many threads while one writes."""

    def __init__(self, path: Path, shard_id: int, dim: int, vector_dtype: str, *, create: bool = False,
                 readonly: bool = False) -> None:
        self.path = Path(path)
        self.shard_id = shard_id
        self.dim = dim
        self.vector_dtype = vector_dtype
        if not create and not (self.path / "data.mdb").exists():
            raise FailedPrecondition(f"shard {shard_id}: {self.path / 'data.mdb'} is missing",
                                     hint="the datastore is incomplete; rebuild it or restore the shard")
        self.path.mkdir(parents=True, exist_ok=True)
        try:
            self.env = lmdb.open(str(self.path), map_size=INITIAL_MAP_SIZE, max_dbs=len(DATABASES),
                                 max_readers=512, readonly=readonly, lock=not readonly, readahead=False)
        except lmdb.Error as e:
            raise FailedPrecondition(f"shard {shard_id}: cannot open LMDB at {self.path}: {e}") from e
        self.env.set_mapsize(max(INITIAL_MAP_SIZE, self.env.info()["map_size"]))
        self.db = {name: self.env.open_db(name.encode(), create=not readonly) for name in DATABASES}
        self._write_lock = threading.Lock()

    # -- writes ---------------------------------------------------------------------------------

    def _write(self, fn: Callable[[lmdb.Transaction], T]) -> T:
        """Run `fn` in one write transaction, growing the map when it fills."""
        with self._write_lock:
            while True:
                try:
                    with self.env.begin(write=True) as txn:
                        out = fn(txn)
                        seq = txn.get(SEQ_KEY, db=self.db["meta"])
                        txn.put(SEQ_KEY, _U64.pack((_U64.unpack(seq)[0] if seq else 0) + 1), db=self.db["meta"])
                        return out
                except lmdb.MapFullError:
                    self.env.set_mapsize(self.env.info()["map_size"] * 2)
                except lmdb.Error as e:
                    if getattr(e, "errno", None) == errno.ENOSPC or "No space left" in str(e):
                        raise ResourceExhausted(f"shard {self.shard_id}: disk full at {self.path}", subject="disk",
                                                hint="free disk space; nothing was written") from e
                    raise

    def put(self, passages: Sequence[Passage], vectors: np.ndarray) -> None:
        """Store passages and their vectors atomically (replacing ids that exist).

        The shard also remembers the highest id it ever held (+1), so deleted ids are never
        handed out again."""
        if len(passages) != len(vectors):
            raise ValueError(f"{len(passages)} passages but {len(vectors)} vectors")

        def fn(txn: lmdb.Transaction) -> None:
            for p, v in zip(passages, vectors):
                k = key(p.id)
                txn.put(k, p.encode(), db=self.db["passages"])
                txn.put(k, encode_vector(v, self.vector_dtype), db=self.db["vectors"])
            top = max(p.id for p in passages) + 1 if passages else 0
            old = txn.get(NEXT_ID_KEY, db=self.db["meta"])
            if old is None or _U64.unpack(old)[0] < top:
                txn.put(NEXT_ID_KEY, _U64.pack(top), db=self.db["meta"])

        self._write(fn)

    def delete(self, ids: Sequence[int]) -> list[int]:
        """Delete ids atomically; returns those that existed."""

        def fn(txn: lmdb.Transaction) -> list[int]:
            gone = []
            for i in ids:
                k = key(int(i))
                if txn.delete(k, db=self.db["passages"]):
                    txn.delete(k, db=self.db["vectors"])
                    txn.delete(k, db=self.db["codes"])
                    gone.append(int(i))
            return gone

        return self._write(fn)

    def put_meta(self, name: str, value: bytes) -> None:
        self._write(lambda txn: txn.put(name.encode(), value, db=self.db["meta"]))

    # -- reads ----------------------------------------------------------------------------------

    def get_meta(self, name: str) -> bytes | None:
        with self.env.begin() as txn:
            return txn.get(name.encode(), db=self.db["meta"])

    @property
    def seq(self) -> int:
        v = self.get_meta(SEQ_KEY.decode())
        return _U64.unpack(v)[0] if v else 0

    def get(self, ids: Sequence[int]) -> list[Passage | None]:
        with self.env.begin(buffers=True) as txn:
            out = []
            for i in ids:
                v = txn.get(key(int(i)), db=self.db["passages"])
                out.append(Passage.decode(int(i), bytes(v)) if v is not None else None)
            return out

    def contains(self, ids: Sequence[int]) -> np.ndarray:
        with self.env.begin() as txn:
            cur = txn.cursor(db=self.db["passages"])
            return np.array([cur.set_key(key(int(i))) for i in ids], dtype=bool)

    def get_vectors(self, ids: Sequence[int]) -> np.ndarray:
        with self.env.begin() as txn:
            blobs = [txn.get(key(int(i)), db=self.db["vectors"]) for i in ids]
        if any(b is None for b in blobs):
            missing = [int(i) for i, b in zip(ids, blobs) if b is None]
            raise KeyError(f"no vectors for ids {missing[:10]}")
        return decode_vectors(blobs, self.vector_dtype, self.dim)

    def __len__(self) -> int:
        with self.env.begin() as txn:
            return txn.stat(self.db["passages"])["entries"]

    @property
    def next_id(self) -> int:
        """One more than the highest id this shard ever stored (deleted ones included)."""
        v = self.get_meta(NEXT_ID_KEY.decode())
        return _U64.unpack(v)[0] if v else 0

    def iter_vectors(self, batch: int = 65536, with_tenants: bool = False
                     ) -> Iterator[tuple[np.ndarray, np.ndarray, list[tuple[str, ...]] | None]]:
        """(ids, float32 vectors, tenants or None) in id order, in batches: one read
        transaction, bounded memory."""
        with self.env.begin(buffers=True) as txn:
            ids: list[int] = []
            blobs: list[bytes] = []
            tenants: list[tuple[str, ...]] = []
            cur = txn.cursor(db=self.db["vectors"])
            for k, v in cur:
                k = bytes(k)
                ids.append(key_id(k))
                blobs.append(bytes(v))
                if with_tenants:
                    tenants.append(Passage.decode(0, bytes(txn.get(k, db=self.db["passages"]))).tenants)
                if len(ids) == batch:
                    yield (np.array(ids, np.int64), decode_vectors(blobs, self.vector_dtype, self.dim),
                           tenants if with_tenants else None)
                    ids, blobs, tenants = [], [], []
            if ids:
                yield (np.array(ids, np.int64), decode_vectors(blobs, self.vector_dtype, self.dim),
                       tenants if with_tenants else None)

    def iter_passages(self) -> Iterator[Passage]:
        with self.env.begin(buffers=True) as txn:
            for k, v in txn.cursor(db=self.db["passages"]):
                yield Passage.decode(key_id(bytes(k)), bytes(v))

    def blob_store(self, name: str = "postings"):
        """This shard's `name` database as an index BlobStore (writes there leave `seq` alone:
        the index records which `seq` it reflects)."""
        from index.storage import LmdbBlobStore
        return LmdbBlobStore(self.env, self.db[name], self.path)

    def disk_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.path.glob("*.mdb"))

    def close(self) -> None:
        self.env.close()  # idempotent in py-lmdb
