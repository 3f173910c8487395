"""The small storage interface disk indexes write through: blobs keyed by uint64.

The datastore hands an index its shard's LMDB `postings` database, so postings live beside
the passages; benchmarks and tests use a private LMDB environment in a directory.
"""

from __future__ import annotations

import struct
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Callable, ContextManager, Iterable, Iterator, Protocol, Sequence

import lmdb

_KEY = struct.Struct(">Q")


class BlobStore(Protocol):
    def get_many(self, keys: Sequence[int]) -> list[bytes | None]: ...

    def viewing(self, threads: int = 1) -> "ContextManager[Callable[[Sequence[int]], list[memoryview | None]]]":
        """Reads for one search: inside the context, a function giving the blobs of keys.

        With threads > 1 the keys are split over a pool, each part read in its own
        transaction, so cold reads wait on the disk in parallel (mdb_get faults the whole
        value in); with 1, zero-copy views valid until the context exits."""

    def write(self, puts: dict[int, bytes], deletes: Iterable[int] = ()) -> None: ...

    def items(self) -> Iterator[tuple[int, bytes]]: ...

    def keys(self) -> list[int]: ...

    def keys(self) -> list[int]:
        with self.env.begin() as txn:
            return [_KEY.unpack(k)[0] for k in txn.cursor(db=self.db).iternext(keys=True, values=False)]

    def clear(self) -> None: ...

    def disk_bytes(self) -> int: ...


class LmdbBlobStore:
    """Blobs in one LMDB database; `write` is one transaction (readers never see half of it)."""

    def __init__(self, env: lmdb.Environment, db, path: Path | None = None, owned: bool = False) -> None:
        self.env, self.db, self.path, self._owned = env, db, path, owned

    @classmethod
    def open(cls, directory: Path, map_size: int = 1 << 30) -> "LmdbBlobStore":
        """A private environment in `directory` (created when absent)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        env = lmdb.open(str(directory), map_size=map_size, max_dbs=2, readahead=False, max_readers=512)
        return cls(env, env.open_db(b"postings"), directory, owned=True)

    def get_many(self, keys: Sequence[int]) -> list[bytes | None]:
        with self.env.begin(buffers=True) as txn:
            return [None if (v := txn.get(_KEY.pack(int(k)), db=self.db)) is None else bytes(v) for k in keys]

    @contextmanager
    def viewing(self, threads: int = 1) -> Iterator[Callable[[Sequence[int]], list[memoryview | bytes | None]]]:
        if threads <= 1:
            with self.env.begin(buffers=True) as txn:
                yield lambda keys: [txn.get(_KEY.pack(int(k)), db=self.db) for k in keys]
            return
        pool = self._fetch_pool(threads)

        def part(keys: Sequence[int]) -> list[bytes | None]:
            with self.env.begin() as txn:
                return [txn.get(_KEY.pack(int(k)), db=self.db) for k in keys]

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
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    for k in deletes:
                        txn.delete(_KEY.pack(int(k)), db=self.db)
                    for k, v in puts.items():
                        txn.put(_KEY.pack(int(k)), v, db=self.db)
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
