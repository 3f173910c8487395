"""Copying a shard from a live replica to a new or stale one.

Replicas of a shard server are full copies of its shards. A replica that was down during a
write has missed it (the router stops reading from it); it comes back in sync by taking a
consistent copy of every shard it serves from a live replica before it starts serving:
`datastore serve DIR --shards ... --seed-from ADDR`.

The source side takes the copy with LMDB's own `env.copy` (one read transaction, so the
copy is a consistent state of the shard while writes go on) into a scratch directory and
hands it out in chunks by offset (`ReadSnapshot`, a unary RPC, so the server's auth and
limit interceptors apply to it as to any call). One copy per shard at a time, shared by
readers while current, deleted when read to the end: readers can not fill the disk. The receiving side verifies size and
sha256, then swaps the copy in for the shard's files; the shard's saved index no longer
matches the copied write sequence, so the next open rebuilds it from LMDB.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from datastore.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted

log = logging.getLogger(__name__)
#: Bytes per ReadSnapshot answer: well under gRPC's message limits.
CHUNK_BYTES = 1 << 20
#: A copy nobody has read on for this long is dropped.
SNAPSHOT_TTL_SECONDS = 600.0
DATA_FILE = "data.mdb"
SCRATCH = ".snapshots"


@dataclass
class _Copy:
    path: Path
    size: int
    sha256: str
    write_seq: int
    touched: float
    #: (shard_id, control) it copies, and the LMDB transaction id read just before the copy:
    #: while the source's last transaction is still that one, the copy is current.
    target: tuple[int, bool] = (0, False)
    txnid: int = -1
    #: Readers that started on it and have not read its last chunk yet.
    readers: int = 1


@dataclass(frozen=True)
class Chunk:
    snapshot_id: str
    data: bytes
    total_bytes: int
    sha256: str
    write_seq: int
    last: bool


#: A copy nobody has read on for this long may be replaced by a new one of the same shard.
ABANDONED_SECONDS = 30.0
#: How often a seeding replica asks again while another reader holds the shard's copy.
SEED_RETRY_SECONDS = 1.0


class SnapshotSource:
    """Consistent copies of a Datastore's shards (and control store), read in chunks.

    At most one copy per shard (and one of the control store) exists at a time, so callers
    can not fill the disk with copies: a new reader shares the live copy when nothing was
    written since it was taken, and is refused (ResourceExhausted) while another reader
    is still on an older one, unless that one has not been read for ABANDONED_SECONDS. A
    copy is deleted when its last reader has read its last chunk (or after `ttl` unread)."""

    def __init__(self, store, ttl: float = SNAPSHOT_TTL_SECONDS, abandoned: float = ABANDONED_SECONDS) -> None:
        self.store = store
        self.ttl = ttl
        self.abandoned = abandoned
        self._copies: dict[str, _Copy] = {}
        #: (shard_id, control) -> the id of its live copy, or "" while one is being taken
        self._live: dict[tuple[int, bool], str] = {}
        self._lock = threading.Lock()
        self._scratch = Path(store.directory) / SCRATCH
        shutil.rmtree(self._scratch, ignore_errors=True)  # copies of an earlier run

    def close(self) -> None:
        with self._lock:
            self._copies.clear()
            self._live.clear()
        shutil.rmtree(self._scratch, ignore_errors=True)

    def _env(self, shard_id: int, control: bool):
        if control:
            return self.store.control.env
        for shard in self.store.shards:
            if shard.shard_id == shard_id:
                return shard.env
        raise NotFound(f"shard {shard_id} is not served here (shards {self.store.shard_ids})",
                       resource_type="shard", resource_name=str(shard_id))

    def _drop(self, snapshot_id: str) -> _Copy | None:
        """Forget a copy (under the lock); the caller deletes its files."""
        copy = self._copies.pop(snapshot_id, None)
        if copy is not None and self._live.get(copy.target) == snapshot_id:
            del self._live[copy.target]
        return copy

    def _start(self, shard_id: int, control: bool) -> str:
        """The id of a copy for a new reader: the live one when current, else a new one."""
        env = self._env(shard_id, control)
        target = (0, True) if control else (shard_id, False)
        now = time.monotonic()
        gone = None
        with self._lock:
            live = self._live.get(target)
            if live == "":
                raise ResourceExhausted(f"a copy of {_name(target)} is being taken", subject="snapshots",
                                        hint="one copy per shard at a time: retry in a few seconds")
            if live is not None:
                copy = self._copies[live]
                if copy.txnid == env.info()["last_txnid"]:
                    copy.readers += 1
                    copy.touched = now
                    return live
                if now - copy.touched < self.abandoned:
                    raise ResourceExhausted(f"an older copy of {_name(target)} is still being read",
                                            subject="snapshots",
                                            hint="one copy per shard at a time: retry when it is done")
                gone = self._drop(live)
            self._live[target] = ""  # taking one: others wait
        if gone is not None:
            shutil.rmtree(gone.path, ignore_errors=True)
        try:
            return self._take(env, target)
        except BaseException:
            with self._lock:
                if self._live.get(target) == "":
                    del self._live[target]
            raise

    def _take(self, env, target: tuple[int, bool]) -> str:
        snapshot_id = uuid.uuid4().hex
        path = self._scratch / snapshot_id
        path.mkdir(parents=True)
        try:
            txnid = env.info()["last_txnid"]
            # env.copy reads in one transaction: the copy is one committed state of the shard;
            # its write sequence is read from the copy itself.
            env.copy(str(path))
            seq = 0 if target[1] else _read_seq(path)
            digest = hashlib.sha256()
            with open(path / DATA_FILE, "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    digest.update(block)
            size = (path / DATA_FILE).stat().st_size
        except BaseException:
            shutil.rmtree(path, ignore_errors=True)
            raise
        with self._lock:
            self._copies[snapshot_id] = _Copy(path, size, digest.hexdigest(), seq, time.monotonic(), target, txnid)
            self._live[target] = snapshot_id
        log.info("snapshot %s of %s: %d bytes, write_seq %d", snapshot_id, _name(target), size, seq)
        return snapshot_id

    def _expire(self) -> None:
        now = time.monotonic()
        with self._lock:
            old = [k for k, c in self._copies.items() if now - c.touched > self.ttl]
            gone = [self._drop(k) for k in old]
        for c in gone:
            if c is not None:
                shutil.rmtree(c.path, ignore_errors=True)

    def read(self, snapshot_id: str, shard_id: int, control: bool, offset: int) -> Chunk:
        """The chunk at `offset` of a copy; a new reader (empty `snapshot_id`) gets the
        shard's live copy when current, else a new one."""
        self._expire()
        if not snapshot_id:
            if offset:
                raise InvalidArgument.field("offset", "a new snapshot starts at offset 0")
            snapshot_id = self._start(shard_id, control)
        with self._lock:
            copy = self._copies.get(snapshot_id)
            if copy is not None:
                copy.touched = time.monotonic()
        if copy is None:
            raise NotFound(f"no snapshot {snapshot_id} (finished or expired)", resource_type="snapshot",
                           resource_name=snapshot_id, hint="start again without a snapshot_id")
        if offset > copy.size:
            raise InvalidArgument.field("offset", f"{offset} is past the end of the copy ({copy.size} bytes)")
        with open(copy.path / DATA_FILE, "rb") as f:
            f.seek(offset)
            data = f.read(CHUNK_BYTES)
        last = offset + len(data) >= copy.size
        if last:
            with self._lock:
                copy.readers -= 1
                done = copy.readers <= 0 and self._drop(snapshot_id) is not None
            if done:
                shutil.rmtree(copy.path, ignore_errors=True)
        return Chunk(snapshot_id, data, copy.size, copy.sha256, copy.write_seq, last)

    def live_copies(self) -> int:
        """Copies on disk now (for tests and metrics)."""
        with self._lock:
            return len(self._copies)


def _name(target: tuple[int, bool]) -> str:
    return "the control store" if target[1] else f"shard {target[0]}"


def shard_digest(shard) -> str:
    """sha256 over a shard's passages and vectors (keys and values, in key order), read in
    one transaction: equal digests mean equal data, whatever the index looks like."""
    digest = hashlib.sha256()
    with shard.env.begin(buffers=True) as txn:
        for name in ("passages", "vectors"):
            digest.update(name.encode())
            for k, v in txn.cursor(db=shard.db[name]):
                digest.update(len(k).to_bytes(4, "big"))
                digest.update(k)
                digest.update(len(v).to_bytes(4, "big"))
                digest.update(v)
    return digest.hexdigest()


def _read_seq(directory: Path) -> int:
    """The write sequence stored in an LMDB shard copy."""
    import lmdb

    from datastore.shard import _U64, DATABASES, SEQ_KEY

    env = lmdb.open(str(directory), readonly=True, lock=False, max_dbs=len(DATABASES))
    try:
        meta = env.open_db(b"meta", create=False)
        with env.begin() as txn:
            raw = txn.get(SEQ_KEY, db=meta)
        return _U64.unpack(raw)[0] if raw else 0
    finally:
        env.close()


def download(read: Callable[[str, int], Chunk], target: Path) -> Chunk:
    """Fetch a whole copy through `read(snapshot_id, offset)` into target/data.mdb and
    verify it; returns the last chunk (with size, sha256 and write_seq)."""
    target.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    snapshot_id, offset = "", 0
    with open(target / DATA_FILE, "wb") as f:
        while True:
            chunk = read(snapshot_id, offset)
            f.write(chunk.data)
            digest.update(chunk.data)
            snapshot_id, offset = chunk.snapshot_id, offset + len(chunk.data)
            if chunk.last:
                break
            if not chunk.data:
                raise FailedPrecondition(f"snapshot {snapshot_id} ended at {offset} of {chunk.total_bytes} bytes")
        f.flush()
        os.fsync(f.fileno())
    if offset != chunk.total_bytes or digest.hexdigest() != chunk.sha256:
        raise FailedPrecondition(f"snapshot {snapshot_id} arrived damaged ({offset} of {chunk.total_bytes} bytes, "
                                 "checksum mismatch)", hint="seed again")
    return chunk


def swap_in(fresh: Path, place: Path) -> None:
    """Replace the LMDB files of `place` by those of `fresh` (same filesystem). The shard's
    other files (its index) stay; the index is rebuilt on open as it no longer matches."""
    from datastore.indexing import INDEX_DIR, SEQ_FILE

    place.mkdir(parents=True, exist_ok=True)
    # drop the saved index's commit first: whatever it reflected, it is not the copy
    (place / INDEX_DIR / SEQ_FILE).unlink(missing_ok=True)
    (place / "lock.mdb").unlink(missing_ok=True)
    os.replace(fresh / DATA_FILE, place / DATA_FILE)
    shutil.rmtree(fresh, ignore_errors=True)
    fd = os.open(place, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def seed_from(address: str, directory: Path, shard_ids: list[int] | None = None, api_key: str | None = None,
              timeout: float = 600.0, control: bool = True) -> dict[int, int]:
    """Make DIRECTORY's shards (all of the datastore's, or `shard_ids`) and its control
    store copies of those of the live server at `address`. Creates the directory and its
    manifest when it holds none. Returns {shard_id: write_seq copied}. Run it before the
    datastore is opened (the serve command does)."""
    import grpc

    from datastore.manifest import MANIFEST, Manifest
    from service.pb import datastore_pb2 as pb
    from service.pb import datastore_pb2_grpc as pb_grpc
    from service.status import from_rpc_error

    directory = Path(directory)
    md = (("authorization", f"Bearer {api_key}"),) if api_key else None
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 4 * CHUNK_BYTES)]) as ch:
        stub = pb_grpc.DatastoreStub(ch)

        def call(method, request):
            try:
                return method(request, timeout=max(0.1, deadline - time.monotonic()), metadata=md)
            except grpc.RpcError as e:
                raise from_rpc_error(e) from None

        stats = call(stub.Stats, pb.StatsRequest())
        source = Manifest.from_json(stats.manifest_json, f"the manifest of {address}")
        if (directory / MANIFEST).exists():
            mine = Manifest.load(directory)
            if mine.datastore_id != source.datastore_id or mine.num_shards != source.num_shards:
                raise FailedPrecondition(f"{address} serves another datastore than {directory}",
                                         hint="seed from a replica of the same datastore")
        created = not directory.exists()
        held = sorted(s.shard_id for s in stats.shards)
        wanted = list(range(source.num_shards)) if shard_ids is None else sorted(set(shard_ids))
        missing = [s for s in wanted if s not in held]
        if missing:
            raise FailedPrecondition(f"{address} does not serve shards {missing} (it serves {held})")
        directory.mkdir(parents=True, exist_ok=True)
        try:
            copied = _copy_all(call, stub, pb, source, directory, wanted, control, address)
        except BaseException:
            if created:  # leave no half-seeded datastore behind
                shutil.rmtree(directory, ignore_errors=True)
            raise
        if not (directory / MANIFEST).exists():
            source.save(directory)  # last: a directory with a manifest is a complete datastore
    return copied


def _copy_all(call, stub, pb, source, directory: Path, wanted: list[int], control: bool,
              address: str) -> dict[int, int]:
    """Download and swap in each wanted shard (and the control store); {shard_id: write_seq}."""
    copied: dict[int, int] = {}
    jobs = [(sid, False, directory / source.shard_dirs[sid]) for sid in wanted]
    if control:
        from datastore.control import CONTROL_DIR
        jobs.append((0, True, directory / CONTROL_DIR))
    for sid, is_control, place in jobs:
        fresh = Path(tempfile.mkdtemp(prefix=f".seed-{place.name}-", dir=directory))

        def read(snapshot_id: str, offset: int, sid=sid, is_control=is_control) -> Chunk:
            request = pb.ReadSnapshotRequest(snapshot_id=snapshot_id, shard_id=sid, control=is_control, offset=offset)
            for attempt in itertools.count():
                try:
                    r = call(stub.ReadSnapshot, request)
                    break
                except ResourceExhausted:
                    # another reader holds the shard's one copy: wait for it (or for it to be
                    # given up as abandoned), within the deadline
                    if snapshot_id or attempt * SEED_RETRY_SECONDS > 2 * ABANDONED_SECONDS:
                        raise
                    time.sleep(SEED_RETRY_SECONDS)
            return Chunk(r.snapshot_id, r.data, r.total_bytes, r.sha256, r.write_seq, r.last)

        try:
            last = download(read, fresh)
            swap_in(fresh, place)
        finally:
            shutil.rmtree(fresh, ignore_errors=True)
        if not is_control:
            copied[sid] = last.write_seq
        log.info("seeded %s from %s (%d bytes)", place, address, last.total_bytes)
    return copied
