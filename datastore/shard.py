"""One shard: an LMDB environment with named databases for passages, vectors and meta.

Every write is one transaction that also bumps the shard's write sequence and logs the ids
it touched under that sequence (the `changes` database). An index saved beside the shard
records the sequence it reflects; on open, an index behind the shard catches up by replaying
the ids logged since (`changes_since`) instead of being rebuilt. The log is trimmed up to
each save (`trim_changes`), so it holds only what the saved index has not seen.

Durability: the environment is opened with LMDB's defaults spelled out (sync=True,
metasync=True, writemap=False, map_async=False), so a commit returns only after the data
pages and then the meta page are fdatasync'ed: a write that returned survives a process
kill and a power cut; one that did not return is absent as a whole (the old meta page
still names the old tree).

Passages and vectors carry a CRC-32 of key and value (shards made before that carry none,
marked by the meta key `record_checksum`), so a flipped byte in a record is an error
naming the file and the id, not a wrong passage; LMDB's own page checks and the decoding of
records turn other damage met while reading into FailedPrecondition as well.

Open-time checks turn damage into FailedPrecondition naming the file instead of a crash
later: LMDB's own meta checks (not an LMDB file, wrong version), a data file shorter than
its committed pages, a directory that is not a shard, and a shard stamped with another
datastore's id, shard number, dimension or vector type.
"""

from __future__ import annotations

import json
import struct
import threading
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import lmdb
import numpy as np

from datastore.errors import FailedPrecondition, ResourceExhausted
from datastore.integrity import check_lmdb, write_failed_for_space
from datastore.records import Passage, decode_vectors, encode_vector, key, key_id

DATABASES = ("passages", "vectors", "codes", "postings", "meta", "changes")
SEQ_KEY = b"seq"
NEXT_ID_KEY = b"next_id"
#: meta key of the shard's identity: {"datastore_id", "shard_id", "dim", "vector_dtype"}.
IDENTITY_KEY = b"identity"
#: meta key saying records end in a CRC-32 (of key + value): b"crc32".
RECORD_CHECKSUM_KEY = b"record_checksum"
_CRC = struct.Struct(">I")
#: Databases every shard has from its creation: a store without them is not a shard.
REQUIRED_DATABASES = ("passages", "vectors", "meta")
#: Databases shards made by older versions lack: a read-only open goes on without them.
OPTIONAL_DATABASES = ("changes",)
#: Room for the databases an index keeps beside the shard's (SPANN's head table, versions).
MAX_DATABASES = 16
#: Address space reserved for the map (the file grows only as data is written). Large, so that
#: the map almost never has to grow: growing remaps it, and searches reading on other
#: threads hold views into the old map (py-lmdb: resize only with no transaction open).
INITIAL_MAP_SIZE = 1 << 38
_U64 = struct.Struct(">Q")
T = TypeVar("T")


class Shard:
    """Passages and vectors of one shard; safe to read from many threads while one writes."""

    def __init__(self, path: Path, shard_id: int, dim: int, vector_dtype: str, *, create: bool = False,
                 readonly: bool = False, datastore_id: str | None = None) -> None:
        """`datastore_id`: the manifest's; None reads it from the manifest beside the shard
        directory when there is one. A new shard is stamped with it, an existing one must
        carry the same stamp (shards written before stamps carry none and are accepted)."""
        self.path = Path(path)
        self.shard_id = shard_id
        self.dim = dim
        self.vector_dtype = vector_dtype
        if self.path.exists() and not self.path.is_dir():
            raise FailedPrecondition(f"shard {shard_id}: {self.path} is a file, not a shard directory",
                                     hint="restore the shard directory or rebuild the datastore")
        data = self.path / "data.mdb"
        if not create and not data.exists():
            raise FailedPrecondition(f"shard {shard_id}: {data} is missing",
                                     hint="the datastore is incomplete; rebuild it or restore the shard")
        if data.exists() and not data.is_file():
            raise FailedPrecondition(f"shard {shard_id}: {data} is not a file",
                                     hint="restore the shard directory or rebuild the datastore")
        self.path.mkdir(parents=True, exist_ok=True)
        fresh = not data.exists()
        try:
            self.env = lmdb.open(str(self.path), map_size=INITIAL_MAP_SIZE, max_dbs=MAX_DATABASES,
                                 max_readers=512, readonly=readonly, lock=not readonly, readahead=False,
                                 sync=True, metasync=True, writemap=False, map_async=False)
        except lmdb.Error as e:
            raise FailedPrecondition(f"shard {shard_id}: cannot open {data}: {e}",
                                     hint="the file is damaged or not an LMDB file; restore it or rebuild") from e
        try:
            check_lmdb(self.env, self.path)
            self.env.set_mapsize(max(INITIAL_MAP_SIZE, self.env.info()["map_size"]))
            self.db = {}
            for name in DATABASES:
                must_exist = readonly or (not fresh and name in REQUIRED_DATABASES)
                try:
                    self.db[name] = self.env.open_db(name.encode(), create=not must_exist)
                except lmdb.NotFoundError:
                    if not (readonly and name in OPTIONAL_DATABASES):
                        raise
                    self.db[name] = None
        except lmdb.Error as e:
            self.env.close()
            what = "holds no shard of a datastore" if isinstance(e, (lmdb.NotFoundError, lmdb.IncompatibleError)) \
                else "is damaged"
            raise FailedPrecondition(f"shard {shard_id}: {data} {what}: {e}",
                                     hint="restore the shard from a backup or rebuild the datastore") from e
        except FailedPrecondition:
            self.env.close()
            raise
        self._write_lock = threading.Lock()
        try:
            if fresh and not readonly:
                self.put_meta(RECORD_CHECKSUM_KEY.decode(), b"crc32")
            self._crc = self.get_meta(RECORD_CHECKSUM_KEY.decode()) == b"crc32"
            self._check_identity(self._datastore_id(datastore_id), stamp=not readonly)
        except BaseException:
            self.env.close()
            raise

    # -- record checksums and read errors -------------------------------------------------------

    def _seal(self, k: bytes, value: bytes) -> bytes:
        return value + _CRC.pack(zlib.crc32(value, zlib.crc32(k))) if self._crc else value

    def _unseal(self, k: bytes, value, db: str) -> bytes:
        value = bytes(value)
        if not self._crc:
            return value
        if len(value) < 4 or _CRC.unpack(value[-4:])[0] != zlib.crc32(value[:-4], zlib.crc32(k)):
            raise self._damaged(f"the {db} record of id {key_id(k)} fails its checksum")
        return value[:-4]

    def _damaged(self, what: str) -> FailedPrecondition:
        return FailedPrecondition(f"shard {self.shard_id}: {self.path / 'data.mdb'} is damaged: {what}",
                                  hint="restore the shard from a backup or a replica, or rebuild the datastore")

    @contextmanager
    def _reading(self):
        """LMDB's page checks and record decoding failures, as damage of this shard's file."""
        try:
            yield
        except lmdb.Error as e:
            raise self._damaged(f"{type(e).__name__}: {e}") from e
        except (ValueError, KeyError, TypeError) as e:  # a record that no longer decodes
            if isinstance(e, FailedPrecondition) or (isinstance(e, KeyError) and str(e).startswith("'no vectors")):
                raise
            raise self._damaged(f"a record does not decode ({type(e).__name__}: {e})") from e

    def _datastore_id(self, given: str | None) -> str:
        if given is not None:
            return given
        manifest = self.path.parent / "manifest.json"
        try:
            return json.loads(manifest.read_text()).get("datastore_id", "")
        except (OSError, ValueError, AttributeError):
            return ""  # no manifest here (a standalone shard) or a damaged one (Manifest.load says so)

    def identity(self) -> dict | None:
        raw = self.get_meta(IDENTITY_KEY.decode())
        if raw is None:
            return None
        try:
            return json.loads(raw)
        except ValueError as e:
            raise FailedPrecondition(f"shard {self.shard_id}: {self.path / 'data.mdb'}: damaged identity record") from e

    def _check_identity(self, datastore_id: str, stamp: bool) -> None:
        want = {"datastore_id": datastore_id, "shard_id": self.shard_id, "dim": self.dim,
                "vector_dtype": self.vector_dtype}
        have = self.identity()
        if have is None:
            if stamp and datastore_id:
                self.put_meta(IDENTITY_KEY.decode(), json.dumps(want, sort_keys=True).encode())
            return
        wrong = [k for k in want if want[k] != have.get(k) and not (k == "datastore_id" and not want[k])]
        if wrong:
            raise FailedPrecondition(
                f"shard {self.shard_id}: {self.path / 'data.mdb'} belongs elsewhere: "
                + ", ".join(f"{k} is {have.get(k)!r}, expected {want[k]!r}" for k in wrong),
                hint="a shard of another datastore (or another shard slot) was put here; restore the right one")

    # -- writes ---------------------------------------------------------------------------------

    def _write(self, fn: Callable[[lmdb.Transaction], T], need: int = 0,
               touched: Callable[[T], Sequence[int]] | None = None) -> T:
        """Run `fn` in one write transaction, growing the map when it fills; a full disk is
        ResourceExhausted and leaves the shard as it was (`need`: bytes the write adds, to
        tell a full disk from a failing one). `touched(result)`: the passage ids the write
        changed, logged under its sequence number in the same transaction."""
        with self._write_lock:
            while True:
                try:
                    with self.env.begin(write=True) as txn:
                        out = fn(txn)
                        seq = txn.get(SEQ_KEY, db=self.db["meta"])
                        seq = (_U64.unpack(seq)[0] if seq else 0) + 1
                        txn.put(SEQ_KEY, _U64.pack(seq), db=self.db["meta"])
                        ids = np.asarray(touched(out) if touched else (), ">i8")
                        txn.put(_U64.pack(seq), ids.tobytes(), db=self.db["changes"])
                        return out
                except lmdb.MapFullError:
                    self.env.set_mapsize(self.env.info()["map_size"] * 2)
                except lmdb.Error as e:
                    if write_failed_for_space(e, self.path, need):
                        raise ResourceExhausted(f"shard {self.shard_id}: disk full at {self.path} ({e})",
                                                subject="disk", hint="free disk space; nothing was written") from e
                    raise

    def put(self, passages: Sequence[Passage], vectors: np.ndarray) -> None:
        """Store passages and their vectors atomically (replacing ids that exist).

        The shard also remembers the highest id it ever held (+1), so deleted ids are never
        handed out again."""
        if len(passages) != len(vectors):
            raise ValueError(f"{len(passages)} passages but {len(vectors)} vectors")

        records = [(k, self._seal(k, p.encode()), self._seal(k, encode_vector(v, self.vector_dtype)))
                   for p, v in zip(passages, vectors) for k in (key(p.id),)]

        def fn(txn: lmdb.Transaction) -> None:
            for k, record, vector in records:
                txn.put(k, record, db=self.db["passages"])
                txn.put(k, vector, db=self.db["vectors"])
            top = max(p.id for p in passages) + 1 if passages else 0
            old = txn.get(NEXT_ID_KEY, db=self.db["meta"])
            if old is None or _U64.unpack(old)[0] < top:
                txn.put(NEXT_ID_KEY, _U64.pack(top), db=self.db["meta"])

        self._write(fn, need=sum(len(r) + len(v) + 72 for _, r, v in records),
                    touched=lambda _: [p.id for p in passages])

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

        return self._write(fn, touched=lambda gone: gone)

    def put_meta(self, name: str, value: bytes) -> None:
        self._write(lambda txn: txn.put(name.encode(), value, db=self.db["meta"]))

    def changes_since(self, seq: int) -> np.ndarray | None:
        """Ids written (put or deleted) after write `seq`, sorted and unique; None when the log
        does not reach back that far (trimmed past it, or a shard made before the log)."""
        now = self.seq
        if seq > now:
            return None
        if seq == now:
            return np.zeros(0, np.int64)
        db = self.db["changes"]
        if db is None:
            return None
        parts, expect = [], seq + 1
        with self._reading(), self.env.begin(buffers=True) as txn:
            cur = txn.cursor(db=db)
            if not cur.set_range(_U64.pack(expect)):
                return None
            for k, v in cur:
                n = _U64.unpack(bytes(k))[0]
                if n != expect:  # a gap: some write's ids are not logged
                    return None
                parts.append(np.frombuffer(bytes(v), ">i8"))
                expect += 1
                if n == now:
                    break
        if expect != now + 1:
            return None
        return np.unique(np.concatenate(parts).astype(np.int64)) if parts else np.zeros(0, np.int64)

    def trim_changes(self, upto: int, chunk: int = 10_000) -> None:
        """Forget the log of writes up to `upto` (an index reflecting them is saved), `chunk`
        records per transaction so a build's long log never makes one huge transaction.
        Does not bump the write sequence."""
        db = self.db["changes"]
        if db is None:
            return
        more = True
        while more:
            with self._write_lock, self.env.begin(write=True) as txn:
                cur = txn.cursor(db=db)
                more = cur.first()
                for _ in range(chunk):
                    k = cur.key() if more else b""
                    if not k or _U64.unpack(k)[0] > upto:
                        more = False
                        break
                    cur.delete()  # moves to the next record (none: the key reads empty)

    # -- reads ----------------------------------------------------------------------------------

    def get_meta(self, name: str) -> bytes | None:
        with self._reading(), self.env.begin() as txn:
            return txn.get(name.encode(), db=self.db["meta"])

    @property
    def seq(self) -> int:
        v = self.get_meta(SEQ_KEY.decode())
        return _U64.unpack(v)[0] if v else 0

    def get(self, ids: Sequence[int]) -> list[Passage | None]:
        with self._reading(), self.env.begin(buffers=True) as txn:
            out = []
            for i in ids:
                k = key(int(i))
                v = txn.get(k, db=self.db["passages"])
                out.append(Passage.decode(int(i), self._unseal(k, v, "passages")) if v is not None else None)
            return out

    def contains(self, ids: Sequence[int]) -> np.ndarray:
        with self._reading(), self.env.begin() as txn:
            cur = txn.cursor(db=self.db["passages"])
            return np.array([cur.set_key(key(int(i))) for i in ids], dtype=bool)

    def get_vectors(self, ids: Sequence[int]) -> np.ndarray:
        with self._reading():
            with self.env.begin() as txn:
                keys = [key(int(i)) for i in ids]
                blobs = [txn.get(k, db=self.db["vectors"]) for k in keys]
            if any(b is None for b in blobs):
                missing = [int(i) for i, b in zip(ids, blobs) if b is None]
                stored = [i for i, found in zip(missing, self.contains(missing)) if found]
                if stored:  # a passage without its vector: written together, so the file is damaged
                    raise self._damaged(f"passages {stored[:10]} have no vector")
                raise KeyError(f"no vectors for ids {missing[:10]}")
            return decode_vectors([self._unseal(k, b, "vectors") for k, b in zip(keys, blobs)], self.vector_dtype,
                                  self.dim)

    def __len__(self) -> int:
        with self._reading(), self.env.begin() as txn:
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
        with self._reading(), self.env.begin(buffers=True) as txn:
            ids: list[int] = []
            blobs: list[bytes] = []
            tenants: list[tuple[str, ...]] = []
            cur = txn.cursor(db=self.db["vectors"])
            for k, v in cur:
                k = bytes(k)
                ids.append(key_id(k))
                blobs.append(self._unseal(k, v, "vectors"))
                if with_tenants:
                    record = txn.get(k, db=self.db["passages"])
                    if record is None:
                        raise self._damaged(f"id {key_id(k)} has a vector but no passage")
                    tenants.append(Passage.decode(0, self._unseal(k, record, "passages")).tenants)
                if len(ids) == batch:
                    yield (np.array(ids, np.int64), decode_vectors(blobs, self.vector_dtype, self.dim),
                           tenants if with_tenants else None)
                    ids, blobs, tenants = [], [], []
            if ids:
                yield (np.array(ids, np.int64), decode_vectors(blobs, self.vector_dtype, self.dim),
                       tenants if with_tenants else None)

    def iter_passages(self) -> Iterator[Passage]:
        with self._reading(), self.env.begin(buffers=True) as txn:
            for k, v in txn.cursor(db=self.db["passages"]):
                k = bytes(k)
                yield Passage.decode(key_id(k), self._unseal(k, v, "passages"))

    def blob_store(self, name: str = "postings"):
        """This shard's `name` database as an index BlobStore (writes there leave `seq` alone:
        the index records which `seq` it reflects)."""
        from index.storage import LmdbBlobStore
        return LmdbBlobStore(self.env, self.db[name], self.path)

    def disk_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.path.glob("*.mdb"))

    def close(self) -> None:
        self.env.close()  # idempotent in py-lmdb
