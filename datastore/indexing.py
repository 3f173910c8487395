"""Building, saving and loading the per-shard vector index from what LMDB holds.

An index directory records the shard write sequence it reflects. When the shard is ahead
(writes after the last save, then a crash), `open_index` loads the saved index and replays
the ids the shard logged since (`Shard.changes_since`): each is removed and, if the shard
still holds it, added back from LMDB, so no acknowledged write is lost and a crash costs
the writes since the last save, not a rebuild. It rebuilds from LMDB only when the log does
not reach back to the save or there is no usable save. LMDB is the single source of truth
and an index can always be thrown away.

A save is a small commit protocol: drop the `seq` file, write the index files, fsync them,
record their sizes and checksums (checksums.json), then write `seq` last. After a crash or
a power cut the directory either has no `seq` (rebuilt on open) or holds files that match
their checksums. A `seq` that matches but a file that does not is damage, not a crash: the
open fails naming the file (rebuilding silently would hide a failing disk).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from datastore.errors import FailedPrecondition, ResourceExhausted
from datastore.integrity import (
    CHECKSUMS_FILE,
    atomic_write,
    files_under,
    fsync_path,
    read_checksums,
    record_checksums,
    verify_checksums,
    write_failed_for_space,
)
from datastore.manifest import IndexInfo
from datastore.shard import Shard
from index import VectorIndex, create_index, load_index

INDEX_DIR = "index"
SEQ_FILE = "seq"
TRAIN_SAMPLE = 100_000
log = logging.getLogger(__name__)


def index_dir(shard: Shard) -> Path:
    return shard.path / INDEX_DIR


def _sample(shard: Shard, size: int, seed: int) -> np.ndarray:
    """Up to `size` vectors of the shard, spread evenly (deterministic)."""
    n = len(shard)
    parts, seen = [], 0
    stride = max(1, n // size) if size else 1
    for ids, vecs, _ in shard.iter_vectors():
        take = (np.arange(seen, seen + len(ids)) % stride) == (seed % stride)
        parts.append(vecs[take])
        seen += len(ids)
    return np.concatenate(parts)[:size] if parts else np.zeros((0, shard.dim), np.float32)


def build_index(shard: Shard, info: IndexInfo, seed: int = 0, binarizer=None) -> VectorIndex:
    """Train and fill a new index from the shard's stored vectors, then save it. A binary
    index given the datastore's shared `binarizer` adopts it instead of training its own."""
    seq = shard.seq
    index = create_index(info.kind, shard.dim, info.metric, storage=shard.blob_store(), **info.params)
    # an index that asks for more training vectors gets them (SPANN caps its heads by them)
    size = max(TRAIN_SAMPLE, getattr(getattr(index, "config", None), "train_sample", 0))
    sample = _sample(shard, size, seed)
    if binarizer is not None and hasattr(index, "use_binarizer"):
        index.use_binarizer(binarizer, sample)
    else:
        index.train(sample)
    for ids, vecs, tenants in shard.iter_vectors(with_tenants=True):
        index.add(ids, vecs, tenants)
    save_index(shard, index, seq)
    return index


def save_index(shard: Shard, index: VectorIndex, seq: int | None = None) -> None:
    """Save in place, dropping the sequence file first and writing it last (after the files
    and their checksums are durable): a crash at any point leaves no sequence file (so the
    next open rebuilds) or a complete index. A full disk raises ResourceExhausted and leaves
    no sequence file."""
    d = index_dir(shard)
    seq = shard.seq if seq is None else seq
    try:
        d.mkdir(parents=True, exist_ok=True)
        drop_commit(shard)
        index.save(d)
        record_checksums(d, files_under(d, skip=(SEQ_FILE,)), {"seq": seq})
        atomic_write(d / SEQ_FILE, str(seq).encode())
        try:
            shard.trim_changes(seq)
        except Exception as e:  # noqa: BLE001 -- the save stands; a longer log only costs space
            log.warning("shard %d: could not trim the change log up to write %d: %s", shard.shard_id, seq, e)
    except Exception as e:  # faiss reports a failed write as RuntimeError, numpy and json as OSError
        if write_failed_for_space(e, d):
            (d / SEQ_FILE).unlink(missing_ok=True)
            for tmp in d.glob("*.tmp*"):  # half-written files only take the space someone must free
                tmp.unlink(missing_ok=True)
            raise ResourceExhausted(f"shard {shard.shard_id}: disk full saving the index in {d} ({e})",
                                    subject="disk", hint="free disk space; the data is safe in LMDB and the "
                                                         "index is rebuilt from it on the next open") from e
        raise


def drop_commit(shard: Shard) -> None:
    """Mark the saved index as not current (it is rebuilt on the next open). Call it before
    anything that changes the index's state on disk without a save following at once."""
    d = index_dir(shard)
    if (d / SEQ_FILE).exists():
        (d / SEQ_FILE).unlink()
        fsync_path(d)


def compact_index(shard: Shard, index: VectorIndex) -> None:
    """Compact an index that can (SPANN merges small lists) and save it at once.

    Compaction rewrites the index's lists in the shard's LMDB without a shard write, so the
    shard's sequence does not change: the saved index would still look current while its
    lists no longer match it. Dropping the commit first makes a crash in between rebuild."""
    compact = getattr(index, "compact", None)
    if compact is None:
        return
    drop_commit(shard)
    compact()
    save_index(shard, index)


def open_index(shard: Shard, info: IndexInfo, seed: int = 0) -> VectorIndex:
    """The shard's saved index, brought up to the shard's last write by replaying the ids
    written since its save; a rebuilt one when there is no usable save or the shard's log
    does not reach back to it. Logs which of the three happened.

    FailedPrecondition names the file when a saved index is damaged (checksum, size, or
    a file the index kind cannot parse)."""
    d = index_dir(shard)
    try:
        saved = int((d / SEQ_FILE).read_text())
    except (OSError, ValueError):
        saved = None
    if saved is not None and saved == shard.seq:
        log.info("shard %d: index loaded (write %d)", shard.shard_id, saved)
        return _load_verified(shard, info, d, saved)
    changed = shard.changes_since(saved) if saved is not None else None
    if changed is not None:
        index = _load_verified(shard, info, d, saved)
        if getattr(index, "replayable", True):
            replay_changes(shard, index, changed)
            save_index(shard, index)
            log.info("shard %d: index replayed %d ids written after its save (writes %d to %d)",
                     shard.shard_id, len(changed), saved, shard.seq)
            return index
        why = f"the saved {info.kind} index (an older format) cannot replay writes"
    elif saved is None:
        why = "no complete saved index"
    else:
        why = f"the shard's change log does not reach back to the index's save (write {saved})"
    log.info("shard %d: index rebuilt from LMDB: %s", shard.shard_id, why)
    # The rebuild rewrites the index's LMDB lists before its files: drop the commit first so
    # a crash in between cannot pair a matching `seq` with half-rebuilt lists.
    drop_commit(shard)
    return build_index(shard, info, seed)


def replay_changes(shard: Shard, index: VectorIndex, ids: np.ndarray, batch: int = 4096) -> None:
    """Bring an index saved at an earlier write up to the shard: every id written since is
    removed, and added back with its stored vector and tenants if the shard still holds it.
    Replaying an id the index already reflects is harmless (remove then add is an upsert)."""
    if not len(ids):  # only meta writes since the save: the index saw nothing to change
        return
    recover = getattr(index, "recover", None)
    if recover is not None:  # summaries the index derives from its on-disk state (SPANN)
        recover()
    for start in range(0, len(ids), batch):
        part = ids[start:start + batch]
        index.remove(part)
        present = part[shard.contains(part.tolist())]
        if len(present):
            passages = shard.get(present.tolist())
            index.add(present, shard.get_vectors(present.tolist()), [p.tenants for p in passages])
    recount = getattr(index, "recount", None)
    if recount is not None:  # an index that cannot tell a re-added id from a new one (SPANN)
        recount(len(shard))


def _load_verified(shard: Shard, info: IndexInfo, d: Path, seq: int) -> VectorIndex:
    hint = f"remove {d} to rebuild the index from the shard's LMDB (the passages are not affected)"
    record = read_checksums(d, hint)
    if record is not None:  # indexes saved before checksums existed have none
        if record.get("seq") != seq:
            raise FailedPrecondition(f"{d / CHECKSUMS_FILE} is damaged: it describes save {record.get('seq')}, "
                                     f"but {d / SEQ_FILE} says {seq}", hint=hint)
        verify_checksums(d, record, hint=hint)
    try:
        return load_index(info.kind, d, storage=shard.blob_store())
    except FailedPrecondition:
        raise
    except Exception as e:  # an unparseable file the checksums did not cover (an older save)
        raise FailedPrecondition(f"{d}: the saved {info.kind} index cannot be read: {type(e).__name__}: {e}",
                                 hint=hint) from e


def build_shard(directory: Path, shard_id: int, seed: int = 0) -> None:
    """Train and write the index of one shard of the datastore at `directory`.

    Pure in its arguments (everything else comes from the manifest and the shard's LMDB), so
    a local loop, a Ray task or a Slurm array task can run it, one shard each."""
    from datastore.manifest import Manifest

    from datastore import compat

    m = Manifest.load(directory)
    shard = Shard(Path(directory) / m.shard_dirs[shard_id], shard_id, m.model.dim, m.vector_dtype)
    try:
        build_index(shard, m.index, seed, binarizer=compat.shared_binarizer(Path(directory), m))
    finally:
        shard.close()
