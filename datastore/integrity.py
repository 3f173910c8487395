"""Integrity of a datastore directory on disk: checksums, durable file writes, LMDB checks.

Two kinds of file live in a datastore and need different protection:

- Files written whole and then only read (manifest.json, each shard's saved index files,
  binarizer weights): a checksum recorded when they are written and verified when they
  are opened turns a damaged or swapped file into a clear error naming it.
- LMDB environments (shards, control), changed in place page by page: no whole-file
  checksum can follow them. LMDB checks its own meta pages (magic, version, the newer of
  two meta pages wins, so a torn commit rolls back); `check_lmdb` adds what LMDB does not
  check at open (a file cut short, which would fault the mmap later) and `walk_lmdb`
  reads every record, run in a child process by `deep_check` so that a page LMDB cannot
  parse ends as an error message instead of killing the caller.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

from datastore.errors import FailedPrecondition

try:  # xxh3 is ~5x faster than sha256 here (3 GB/s against 0.55); sha256 is the fallback
    import xxhash
except ImportError:  # pragma: no cover - depends on the environment
    xxhash = None

CHECKSUMS_FILE = "checksums.json"
_CHUNK = 1 << 20


def default_algorithm() -> str:
    return "xxh3_128" if xxhash is not None else "sha256"


def _hasher(algorithm: str):
    if algorithm == "xxh3_128":
        if xxhash is None:
            raise FailedPrecondition("checksums were written with xxh3_128 but the xxhash package is missing",
                                     hint="pip install xxhash")
        return xxhash.xxh3_128()
    if algorithm in ("sha256", "blake2b"):
        return hashlib.new(algorithm)
    raise FailedPrecondition(f"unknown checksum algorithm {algorithm!r}")


def file_digest(path: Path, algorithm: str | None = None) -> str:
    """Hex digest of a file, read in 1 MiB pieces (bounded memory for any size)."""
    h = _hasher(algorithm or default_algorithm())
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def bytes_digest(data: bytes, algorithm: str = "sha256") -> str:
    h = _hasher(algorithm)
    h.update(data)
    return h.hexdigest()


def is_disk_full(e: BaseException) -> bool:
    """An LMDB or OS error that means the filesystem is full (ENOSPC), or the file may not
    grow (EFBIG, EDQUOT: a size limit or quota)."""
    codes = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
    text = str(e)
    return getattr(e, "errno", None) in codes or any(m in text for m in
                                                     ("No space left", "File too large", "Disk quota"))


def write_failed_for_space(e: BaseException, path: Path, need: int = 0) -> bool:
    """Whether a failed write at `path` ran out of space: ENOSPC/EFBIG/EDQUOT, or the EIO
    that LMDB reports for a short write (a disk that fills during a commit writes part of
    a page and LMDB turns that into EIO). That EIO is told from a failing disk by the room
    left: less than 64 MiB (or twice what the write needed) on the filesystem, or a file
    size limit (RLIMIT_FSIZE) that the write would pass."""
    import resource
    import shutil

    if is_disk_full(e):
        return True
    if getattr(e, "errno", None) != errno.EIO and "Input/output error" not in str(e):
        return False
    try:
        free = shutil.disk_usage(path).free
        largest = max((f.stat().st_size for f in Path(path).iterdir() if f.is_file()), default=0)
    except OSError:
        return False
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    return free < max(64 << 20, 2 * need) or (soft != resource.RLIM_INFINITY and largest + need >= soft)


# -- durable writes -----------------------------------------------------------------------------

def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory's fsync makes renames in it durable)."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if Path(path).is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that a crash or power cut leaves the old file or the new
    one, never a mix: temp file, fsync, rename, fsync of the directory."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    fsync_path(path.parent)


# -- checksums of files written whole -----------------------------------------------------------

def record_checksums(directory: Path, names: Iterable[str], extra: dict | None = None) -> None:
    """fsync `names` (paths relative to `directory`), then write their sizes and digests
    to DIRECTORY/checksums.json. Call it after the files are complete and before whatever
    marks them current, so the marker is never durable before the files it vouches for."""
    directory = Path(directory)
    algorithm = default_algorithm()
    files = {}
    for name in sorted(names):
        p = directory / name
        fsync_path(p)
        files[name] = {"bytes": p.stat().st_size, "digest": file_digest(p, algorithm)}
    record = {"algorithm": algorithm, "files": files, **(extra or {})}
    atomic_write(directory / CHECKSUMS_FILE, json.dumps(record, indent=1, sort_keys=True).encode())


def read_checksums(directory: Path, hint: str = "") -> dict | None:
    """The checksum record of `directory`, or None when it has none (written before checksums)."""
    path = Path(directory) / CHECKSUMS_FILE
    try:
        record = json.loads(path.read_text())
        if not isinstance(record.get("files"), dict):
            raise ValueError("no 'files' map")
        return record
    except FileNotFoundError:
        return None
    except (OSError, ValueError, AttributeError) as e:
        raise FailedPrecondition(f"{path} is damaged: {e}", hint=hint) from e


def verify_checksums(directory: Path, record: dict, hint: str = "") -> None:
    """FailedPrecondition naming the first file of `record` that is missing, of another
    size, or whose digest differs. Sizes are compared first: a cut file costs no hashing."""
    directory = Path(directory)
    algorithm = record.get("algorithm", "sha256")
    for name, want in sorted(record["files"].items()):
        p = directory / name
        if not p.is_file():
            raise FailedPrecondition(f"{p} is missing (listed in {directory / CHECKSUMS_FILE})", hint=hint)
        size = p.stat().st_size
        if size != want["bytes"]:
            raise FailedPrecondition(f"{p} is damaged: {size} bytes, {want['bytes']} when written", hint=hint)
    for name, want in sorted(record["files"].items()):
        p = directory / name
        if file_digest(p, algorithm) != want["digest"]:
            raise FailedPrecondition(f"{p} is damaged: its {algorithm} checksum differs from the one "
                                     f"recorded when it was written", hint=hint)


def files_under(directory: Path, skip: Iterable[str] = ()) -> list[str]:
    """Regular files below `directory`, relative, skipping the names in `skip` (at any depth)
    and temp files."""
    directory = Path(directory)
    skip = set(skip) | {CHECKSUMS_FILE}
    out = []
    for p in sorted(directory.rglob("*")):
        rel = p.relative_to(directory)
        if p.is_file() and not p.name.endswith(".tmp") and not skip.intersection(rel.parts):
            out.append(str(rel))
    return out


# -- LMDB ----------------------------------------------------------------------------------------

def check_lmdb(env, path: Path) -> None:
    """What LMDB does not check at open: the data file must hold every page its meta page
    counts. A file cut short would otherwise open fine and fault (SIGBUS) on the first read
    past its end."""
    data = Path(path) / "data.mdb"
    if not data.is_file():
        return
    need = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    have = data.stat().st_size
    if have < need:
        raise FailedPrecondition(f"{data} is truncated: {have} bytes, its last committed page ends at {need}",
                                 hint="restore the file from a backup or rebuild the datastore")


def walk_lmdb(path: Path) -> dict[str, int]:
    """Read every record of every named database of the LMDB at `path` (read-only);
    returns entries per database. May crash the process on a garbled page: run it through
    `deep_check`."""
    import lmdb

    env = lmdb.open(str(path), readonly=True, lock=False, max_dbs=16, subdir=True)
    try:
        check_lmdb(env, Path(path))
        counts: dict[str, int] = {}
        with env.begin(buffers=True) as txn:
            names = [bytes(k) for k, _ in txn.cursor()]
            for name in names:
                db = env.open_db(name, txn=txn, create=False)
                n, size = 0, 0
                for k, v in txn.cursor(db=db):
                    n += 1
                    size += len(k) + len(v)
                if n != txn.stat(db)["entries"]:
                    raise FailedPrecondition(f"{path}/data.mdb: database {name.decode(errors='replace')} "
                                             f"counts {txn.stat(db)['entries']} entries, holds {n}")
                counts[name.decode(errors="replace")] = n
        return counts
    finally:
        env.close()


def deep_check(path: Path, timeout: float = 600.0) -> dict[str, int]:
    """`walk_lmdb` in a child process: its counts, or FailedPrecondition naming the file when
    the walk fails or the child dies (a garbled page LMDB does not detect can fault)."""
    code = ("import json, sys\nfrom datastore.integrity import walk_lmdb\n"
            "print(json.dumps(walk_lmdb(sys.argv[1])))\n")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    r = subprocess.run([sys.executable, "-c", code, str(path)], check=False, capture_output=True, text=True, timeout=timeout,
                       env=env)
    if r.returncode != 0:
        how = f"signal {-r.returncode}" if r.returncode < 0 else (r.stderr.strip().splitlines() or ["?"])[-1]
        raise FailedPrecondition(f"{Path(path) / 'data.mdb'} is damaged: reading every record failed ({how})",
                                 hint="restore the shard from a backup or a replica, or rebuild the datastore")
    return json.loads(r.stdout)
