"""The small storage interface disk indexes write through: blobs keyed by uint64.

The datastore hands an index its shard's LMDB `postings` database, so postings live beside
the passages; benchmarks and tests use a private LMDB environment in a directory.

Every store counts the blobs and bytes its reads return (`read_stats`), so tests and
benchmarks can measure what a search reads from disk without instrumenting the index.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import struct
import tempfile
import threading
import weakref
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
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

    def viewing(self) -> ContextManager[Callable[[Sequence[int]], list[memoryview | None]]]:
        """Reads for one search: inside the context, a function giving the blobs of keys
        (zero-copy views, valid until the context exits)."""

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
    def open(cls, directory: Path, map_size: int = 1 << 36) -> LmdbBlobStore:
        """A private environment in `directory` (created when absent). The map reserves
        address space, not disk; it is large so that it seldom grows (growing remaps it
        under any reader's views)."""
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
    def viewing(self) -> Iterator[Callable[[Sequence[int]], list[memoryview | bytes | None]]]:
        """Zero-copy reads in one transaction (views valid inside the block).

        Why not `txn.get`: py-lmdb touches every page of a value before returning it, and the
        environments map without readahead (a B-tree lookup then reads no more than it
        needs), so a cold 300 KB posting list arrived as ~75 synchronous 4 KiB reads (~4 ms
        here, against 0.4 ms for one read of it all). Large values are therefore located
        from their B-tree node, asked of the kernel all at once (POSIX_FADV_WILLNEED: it
        reads each in a few large requests, concurrently), and viewed in the map."""
        direct = self._direct_values()
        with self.env.begin(buffers=True) as txn:
            cursor = txn.cursor(db=self.db)
            located = self._located_in(txn.id()) if direct is not None else None

            def read(keys: Sequence[int]) -> list[memoryview | bytes | None]:
                got: list[memoryview | bytes | None] = [None] * len(keys)
                far: list[tuple[int, int, int, int]] = []
                limit = direct.limit(self.env) if direct is not None else 0
                for j, k in enumerate(keys):
                    where = located.get(k) if located is not None else None
                    if where is not None:
                        far.append((j, *where))
                        continue
                    if not cursor.set_key(_KEY.pack(int(k))):
                        continue
                    where = direct.locate(cursor, limit) if direct is not None else None
                    if where is None:
                        got[j] = cursor.value()
                    else:
                        far.append((j, *where))
                        if located is not None and len(located) < self.LOCATED_MOST:
                            located[k] = where
                if far:
                    direct.prefetch([(offset, size) for _, offset, size, _ in far])
                    for j, _, size, address in far:
                        got[j] = direct.view(address, size)
                self._counter.count(got)
                return got

            yield read

    #: Values located in one snapshot are remembered (3 ints each) until a write commits.
    LOCATED_MOST = 1 << 18

    def _located_in(self, snapshot: int) -> dict[int, tuple[int, int, int]]:
        """Where values lie in the map as of the snapshot `snapshot` (a read transaction's id).

        Why: finding a value from its B-tree node costs ~4 us in Python, as much as scoring a
        short list. Any commit, by this process or another, moves the snapshot on, and the
        places are then found again; within one snapshot LMDB moves nothing (readers keep
        their pages), so a place found once holds for every read of that snapshot."""
        known = getattr(self, "_located", None)
        if known is None or known[0] != snapshot:
            known = self._located = (snapshot, {})  # replaced whole: threads never mix snapshots
        return known[1]

    def _direct_values(self) -> _DirectValues | None:
        direct = getattr(self, "_direct", False)
        if direct is False:
            self._direct = direct = _DirectValues.open(self.env)
        return direct

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
        direct = getattr(self, "_direct", None)
        if direct:
            direct.close()
        if self._owned:
            self.env.close()


def scratch_store(owner: object, prefix: str, name: str) -> tuple[LmdbBlobStore, Path]:
    """A private LMDB in a new temporary directory, closed and removed with `owner` or at
    exit: a standalone index (tests, benchmarks, notebooks) leaves nothing behind even when
    it is never closed (a __del__ does not run for objects alive at exit)."""
    directory = Path(tempfile.mkdtemp(prefix=prefix))
    store = LmdbBlobStore.open(directory / name)
    weakref.finalize(owner, _remove_scratch, store, directory)
    return store, directory


def _remove_scratch(store: LmdbBlobStore, directory: Path) -> None:
    try:
        store.close()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


class _DirectValues:
    """Finds an LMDB value in the map from its B-tree node, without touching the value.

    LMDB (0.9 on-disk format) keeps a large value on overflow pages: its leaf node holds an
    8-byte header (size low 16 bits, size high 16 bits, flags, key size), the key, then the
    number of the first overflow page; the value starts 16 bytes (the page header) into that
    page. The map's address comes from /proc/self/maps (Linux; LMDB does not report it). The
    reading is checked once per store against what LMDB itself returns; a mismatch, or a
    page number past the end of the data in use, turns the direct path off for good."""

    BIGDATA = 0x01
    PAGE_HEADER = 16

    def __init__(self, fd: int, inode: int, page_size: int) -> None:
        self.fd, self.inode, self.page_size = fd, inode, page_size
        #: (where file offset 0 is mapped, the end of the mapping): one tuple, replaced whole,
        #: so a reader on another thread never pairs an old base with a new end
        self.map = (0, 0)
        self.checked = False
        self.disabled = False
        self._closer = weakref.finalize(self, os.close, fd)

    @classmethod
    def open(cls, env: lmdb.Environment) -> _DirectValues | None:
        """For env's data file, or None where the map cannot be found (not Linux)."""
        path = Path(env.path())
        path = path / "data.mdb" if path.is_dir() else path
        if not Path("/proc/self/maps").exists() or not path.is_file() or not hasattr(os, "posix_fadvise"):
            return None
        fd = os.open(path, os.O_RDONLY)
        return cls(fd, os.fstat(fd).st_ino, env.stat()["psize"])

    def limit(self, env: lmdb.Environment) -> int:
        """Bytes of the data file in use (no located value may end past them)."""
        return (env.info()["last_pgno"] + 1) * self.page_size

    def _find_map(self, addr: int) -> tuple[int, int] | None:
        """The mapping of this file that holds addr (/proc/self/maps gives its file offset)."""
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 6 and int(parts[4]) == self.inode:
                    start, end = (int(x, 16) for x in parts[0].split("-"))
                    if start <= addr < end:
                        self.map = (start - int(parts[2], 16), end)
                        return self.map
        return None

    def locate(self, cursor: lmdb.Cursor, limit: int) -> tuple[int, int, int] | None:
        """(file offset, size, address in the map) of the value under a positioned cursor
        when it lies on overflow pages; None when it is inline in the leaf (read already)
        or cannot be placed."""
        if self.disabled:
            return None
        key = cursor.key()
        addr = np.frombuffer(key, np.uint8).ctypes.data
        base, end = self.map
        if not base <= addr < end:
            found = self._find_map(addr)
            if found is None:
                self.disabled = True
                return None
            base, end = found
        lo, hi, flags, ksize = struct.unpack("<HHHH", ctypes.string_at(addr - 8, 8))
        if not flags & self.BIGDATA or ksize != len(key):
            return None
        (page,) = struct.unpack("<Q", ctypes.string_at(addr + ksize, 8))
        offset, size = page * self.page_size + self.PAGE_HEADER, lo | hi << 16
        if offset + size > limit or base + offset + size > end:
            self.disabled = True
            log.warning("storage: a value's overflow pages lie past the data in use; reading through LMDB")
            return None
        if not self.checked:  # once: does our reading of the node agree with LMDB's?
            real = cursor.value()
            if np.frombuffer(real, np.uint8).ctypes.data != base + offset or len(real) != size:
                self.disabled = True
                log.warning("storage: LMDB's node layout is not as expected; reading through LMDB")
                return None
            self.checked = True
        return offset, size, base + offset

    def prefetch(self, ranges: Sequence[tuple[int, int]]) -> None:
        """Ask the kernel for every range now: pages not cached are read in large requests,
        all ranges at once, while the caller goes on."""
        for offset, size in ranges:
            os.posix_fadvise(self.fd, offset, size, os.POSIX_FADV_WILLNEED)

    @staticmethod
    def view(address: int, size: int) -> memoryview:
        return memoryview((ctypes.c_char * size).from_address(address)).cast("B").toreadonly()

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
