"""The small storage interface disk indexes write through: blobs keyed by uint64.

The datastore hands an index its shard's LMDB `postings` database, so postings live beside
the passages; benchmarks and tests use a private LMDB environment in a directory.

Every store counts the blobs and bytes its reads return (`read_stats`), so tests and
benchmarks can measure what a search reads from disk without instrumenting the index.
"""

from __future__ import annotations

import struct
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import ContextManager, Protocol

import lmdb
import numpy as np

_KEY = struct.Struct(">Q")  # big-endian uint64: the same keys as datastore.records.key
#: The shard database that holds each passage's full-precision vector (id -> float16/32 bytes).
VECTORS_DB = "vectors"


@dataclass(frozen=True)
class ReadStats:
    """Blobs read and their bytes (values as stored, before any decompression)."""

    reads: int = 0
    bytes: int = 0

    def __sub__(self, other: ReadStats) -> ReadStats:
        return ReadStats(self.reads - other.reads, self.bytes - other.bytes)

    def __add__(self, other: ReadStats) -> ReadStats:
        return ReadStats(self.reads + other.reads, self.bytes + other.bytes)


class _ReadCounter:
    """Thread-safe running totals behind `read_stats` (reads run on a fetch pool too)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reads = 0
        self._bytes = 0

    def count(self, blobs: Sequence[bytes | memoryview | None]) -> None:
        n = sum(len(b) for b in blobs if b is not None)
        with self._lock:
            self._reads += sum(b is not None for b in blobs)
            self._bytes += n

    def snapshot(self) -> ReadStats:
        with self._lock:
            return ReadStats(self._reads, self._bytes)


class BlobStore(Protocol):
    def get_many(self, keys: Sequence[int]) -> list[bytes | None]: ...

    def viewing(self, threads: int = 1) -> ContextManager[Callable[[Sequence[int]], list[memoryview | None]]]:
        """Reads for one search: inside the context, a function giving the blobs of keys.

        With threads > 1 the keys are split over a pool, each part read in its own
        transaction, so cold reads wait on the disk in parallel (mdb_get faults the whole
        value in); with 1, zero-copy views valid until the context exits."""

    def write(self, puts: dict[int, bytes], deletes: Iterable[int] = ()) -> None: ...

    def items(self) -> Iterator[tuple[int, bytes]]: ...

    def keys(self) -> list[int]: ...

    def clear(self) -> None: ...

    def disk_bytes(self) -> int: ...

    def read_stats(self) -> ReadStats:
        """Totals of the reads made through get_many and viewing since the store was opened."""


class LmdbBlobStore:
    """Blobs in one LMDB database; `write` is one transaction (readers never see half of it)."""

    def __init__(self, env: lmdb.Environment, db, path: Path | None = None, owned: bool = False) -> None:
        self.env, self.db, self.path, self._owned = env, db, path, owned
        self._counter = _ReadCounter()

    @property
    def owned(self) -> bool:
        """True for a private environment (the index keeps everything in it); False for a
        shard's, whose other databases (passages, vectors) the datastore keeps."""
        return self._owned

    def sibling(self, name: str) -> LmdbBlobStore:
        """Another named database of the same environment (created when absent and writable).
        It shares the environment, so a write to both can be one transaction (`write_both`)."""
        return LmdbBlobStore(self.env, self.env.open_db(name.encode()), self.path, owned=False)

    def read_stats(self) -> ReadStats:
        return self._counter.snapshot()

    @classmethod
    def open(cls, directory: Path, map_size: int = 1 << 30) -> LmdbBlobStore:
        """A private environment in `directory` (created when absent)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        env = lmdb.open(str(directory), map_size=map_size, max_dbs=8, readahead=False, max_readers=512)
        return cls(env, env.open_db(b"postings"), directory, owned=True)

    def get_many(self, keys: Sequence[int]) -> list[bytes | None]:
        with self.env.begin(buffers=True) as txn:
            out = [None if (v := txn.get(_KEY.pack(int(k)), db=self.db)) is None else bytes(v) for k in keys]
        self._counter.count(out)
        return out

    @contextmanager
    def viewing(self, threads: int = 1) -> Iterator[Callable[[Sequence[int]], list[memoryview | bytes | None]]]:
        if threads <= 1:
            with self.env.begin(buffers=True) as txn:
                def read_one_txn(keys: Sequence[int]) -> list[memoryview | None]:
                    got = [txn.get(_KEY.pack(int(k)), db=self.db) for k in keys]
                    self._counter.count(got)
                    return got

                yield read_one_txn
            return
        pool = self._fetch_pool(threads)

        def part(keys: Sequence[int]) -> list[bytes | None]:
            with self.env.begin() as txn:
                got = [txn.get(_KEY.pack(int(k)), db=self.db) for k in keys]
            self._counter.count(got)
            return got

        def read(keys: Sequence[int]) -> list[bytes | None]:
            keys = list(keys)
            if len(keys) < 2 * threads:
                return part(keys)
            out: list[bytes | None] = [None] * len(keys)
            for j, got in enumerate(pool.map(part, [keys[j::threads] for j in range(threads)])):
                out[j::threads] = got
            return out

        yield read

    def _fetch_pool(self, threads: int) -> ThreadPoolExecutor:
        pool = getattr(self, "_pool", None)
        if pool is None or pool._max_workers != threads:
            self._pool = pool = ThreadPoolExecutor(threads, thread_name_prefix="posting-fetch")
        return pool

    def write(self, puts: dict[int, bytes], deletes: Iterable[int] = ()) -> None:
        self.write_many([(self, puts, list(deletes))])

    def write_many(self, parts: Sequence[tuple[LmdbBlobStore, dict[int, bytes], Sequence[int]]]) -> None:
        """(store, puts, deletes) of stores sharing this environment, in one transaction."""
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    for store, puts, deletes in parts:
                        if store.env is not self.env:
                            raise ValueError("write_many needs stores of one LMDB environment")
                        for k in deletes:
                            txn.delete(_KEY.pack(int(k)), db=store.db)
                        for k, v in puts.items():
                            txn.put(_KEY.pack(int(k)), v, db=store.db)
                return
            except lmdb.MapFullError:
                self.env.set_mapsize(self.env.info()["map_size"] * 2)

    def items(self) -> Iterator[tuple[int, bytes]]:
        with self.env.begin(buffers=True) as txn:
            for k, v in txn.cursor(db=self.db):
                yield _KEY.unpack(bytes(k))[0], bytes(v)

    def keys(self) -> list[int]:
        with self.env.begin() as txn:
            return [_KEY.unpack(k)[0] for k in txn.cursor(db=self.db).iternext(keys=True, values=False)]

    def clear(self) -> None:
        with self.env.begin(write=True) as txn:
            txn.drop(self.db, delete=False)

    def disk_bytes(self) -> int:
        with self.env.begin() as txn:
            st = txn.stat(self.db)
        return (st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"]) * st["psize"]

    def close(self) -> None:
        if self._owned:
            self.env.close()


class VectorStore:
    """Full-precision vectors by id in a blob store: value = the vector's float32 or float16
    bytes, optionally followed by a CRC-32 of key and value (told apart by length), as the
    shard's `vectors` database holds them. Disk indexes that keep only codes read their
    rerank vectors here. A record whose checksum fails raises ValueError naming the id."""

    def __init__(self, store: LmdbBlobStore, dim: int) -> None:
        self.store, self.dim = store, dim

    def put(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        vectors = np.ascontiguousarray(vectors, np.float32)
        self.store.write({int(i): v.tobytes() for i, v in zip(np.asarray(ids).tolist(), vectors)})

    def delete(self, ids: Iterable[int]) -> None:
        self.store.write({}, deletes=[int(i) for i in ids])

    def get(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(found bool (n,), float32 (n, dim)); rows not found are zeros."""
        ids = np.asarray(ids, np.int64)
        out = np.zeros((len(ids), self.dim), np.float32)
        found = np.zeros(len(ids), bool)
        sizes = {4 * self.dim: (np.float32, False), 2 * self.dim: (np.float16, False),
                 4 * self.dim + 4: (np.float32, True), 2 * self.dim + 4: (np.float16, True)}
        with self.store.viewing() as read:
            for r, blob in enumerate(read(ids.tolist())):
                if blob is None or len(blob) not in sizes:
                    continue
                dtype, sealed = sizes[len(blob)]
                if sealed:
                    body, crc = blob[:-4], struct.unpack(">I", blob[-4:])[0]
                    if zlib.crc32(body, zlib.crc32(_KEY.pack(int(ids[r])))) != crc:
                        raise ValueError(f"the vector record of id {int(ids[r])} fails its checksum")
                    blob = body
                out[r] = np.frombuffer(blob, dtype)
                found[r] = True
        return found, out
