"""The small storage interface disk indexes write through: blobs keyed by uint64.

The datastore hands an index its shard's LMDB `postings` database, so postings live beside
the passages; benchmarks and tests use a private LMDB environment in a directory.

Every store counts the blobs and bytes its reads return (`read_stats`), so tests and
benchmarks can measure what a search reads from disk without instrumenting the index.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import weakref
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import ContextManager, Protocol

import lmdb
import numpy as np

log = logging.getLogger(__name__)
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
        """Reads in one transaction: small values are zero-copy views of the map; values of
        DIRECT_READ_BYTES or more are read from the file in one I/O each (`threads` of them at
        once), because the environment maps without readahead and a cold large value would
        otherwise arrive one 4 KiB page fault at a time."""
        files = self._file_reader()
        pool = self._fetch_pool(threads) if threads > 1 else None
        with self.env.begin(buffers=True) as txn:
            def read(keys: Sequence[int]) -> list[memoryview | bytes | None]:
                got = [txn.get(_KEY.pack(int(k)), db=self.db) for k in keys]
                if files is not None:
                    big = [j for j, v in enumerate(got) if v is not None and len(v) >= DIRECT_READ_BYTES]
                    if pool is not None and len(big) > 1:
                        for j, v in zip(big, pool.map(files.read, [got[j] for j in big])):
                            got[j] = v
                    else:
                        for j in big:
                            got[j] = files.read(got[j])
                self._counter.count(got)
                return got

            yield read

    def _file_reader(self) -> _FileReader | None:
        reader = getattr(self, "_files", False)
        if reader is False:
            self._files = reader = _FileReader.open(self.env)
        return reader

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
        files = getattr(self, "_files", None)
        if files:
            files.close()
        if self._owned:
            self.env.close()


#: LMDB values at least this large are read with pread (one I/O) rather than through the map.
DIRECT_READ_BYTES = 16 << 10


class _FileReader:
    """Reads values of an open LMDB environment from its data file with pread.

    Why: the environments open without readahead (a B-tree lookup then reads only the pages
    it needs), so a cold posting list of 700 KB read through the map costs ~175 page faults
    of 4 KiB, one disk round trip each (~8 ms here); one pread asks for all of it at once
    (~0.5 ms). A value's file offset is its address minus the map's base, which LMDB does
    not report: it is found in /proc/self/maps (Linux), and each read checks its first bytes
    against the map, so a wrong base can only cost a fall back to the map, never wrong data."""

    def __init__(self, fd: int, inode: int) -> None:
        self.fd, self.inode = fd, inode
        self.disabled = False
        self.base, self.end = 0, 0
        self._closer = weakref.finalize(self, os.close, fd)

    @classmethod
    def open(cls, env: lmdb.Environment) -> _FileReader | None:
        """A reader for env's data file, or None where the map cannot be located (not Linux)."""
        path = Path(env.path())
        path = path / "data.mdb" if path.is_dir() else path
        if not Path("/proc/self/maps").exists() or not path.is_file():
            return None
        fd = os.open(path, os.O_RDONLY)
        st = os.fstat(fd)
        if hasattr(os, "posix_fadvise"):  # read what is asked, no more (values are whole I/Os already)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        return cls(fd, st.st_ino)

    def _locate(self, addr: int) -> None:
        """The address range of the mapping of this file, at offset 0, that holds addr (one
        process may map the file twice: a writer's and a reader's environment)."""
        self.base = self.end = 0
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 6 and int(parts[2], 16) == 0 and int(parts[4]) == self.inode:
                    start, end = (int(x, 16) for x in parts[0].split("-"))
                    if start <= addr < end:
                        self.base, self.end = start, end
                        return

    def read(self, view: memoryview) -> memoryview:
        """The bytes of `view` (a value in the map), read from the file; `view` itself when
        its place in the file cannot be found."""
        if self.disabled:
            return view
        addr = np.frombuffer(view, np.uint8).ctypes.data
        if not self.base <= addr < self.end:  # first read, or the map moved (a resize)
            self._locate(addr)
            if not self.base <= addr < self.end:
                self.disabled = True  # not found: reading through the map from now on
                return view
        buf = np.empty(len(view), np.uint8)
        done = os.preadv(self.fd, [buf], addr - self.base)
        head = min(16, len(view))
        if done != len(view) or buf[:head].tobytes() != bytes(view[:head]):  # the map's page is cached now
            log.warning("storage: a value read from the data file does not match the map; reading through the map")
            self.disabled = True
            return view
        return memoryview(buf)

    def close(self) -> None:
        self._closer()


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
