"""Building, saving and loading the per-shard vector index from what LMDB holds.

An index directory records the shard write sequence it reflects; `open_index` rebuilds
from LMDB when the sequence differs (a crash between an LMDB commit and the index save),
so LMDB is the single source of truth and an index can always be thrown away.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from datastore.manifest import IndexInfo
from datastore.shard import Shard
from index import VectorIndex, create_index, load_index

INDEX_DIR = "index"
SEQ_FILE = "seq"
TRAIN_SAMPLE = 100_000


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


def build_index(shard: Shard, info: IndexInfo, seed: int = 0) -> VectorIndex:
    """Train and fill a new index from the shard's stored vectors, then save it."""
    seq = shard.seq
    index = create_index(info.kind, shard.dim, info.metric, storage=shard.blob_store(), **info.params)
    index.train(_sample(shard, TRAIN_SAMPLE, seed))
    for ids, vecs, tenants in shard.iter_vectors(with_tenants=True):
        index.add(ids, vecs, tenants)
    save_index(shard, index, seq)
    return index


def save_index(shard: Shard, index: VectorIndex, seq: int | None = None) -> None:
    """Save in place, dropping the sequence file first and writing it last: a crash at any
    point leaves no sequence file (so the next open rebuilds) or a complete index."""
    d = index_dir(shard)
    d.mkdir(parents=True, exist_ok=True)
    (d / SEQ_FILE).unlink(missing_ok=True)
    index.save(d)
    tmp = d / (SEQ_FILE + ".tmp")
    tmp.write_text(str(shard.seq if seq is None else seq))
    tmp.replace(d / SEQ_FILE)


def open_index(shard: Shard, info: IndexInfo, seed: int = 0) -> VectorIndex:
    """The shard's saved index when it reflects the shard's last write, else a rebuilt one."""
    d = index_dir(shard)
    try:
        if int((d / SEQ_FILE).read_text()) == shard.seq:
            return load_index(info.kind, d, storage=shard.blob_store())
    except (OSError, ValueError):
        pass
    return build_index(shard, info, seed)


def build_shard(directory: Path, shard_id: int, seed: int = 0) -> None:
    """Train and write the index of one shard of the datastore at `directory`.

    Pure in its arguments (everything else comes from the manifest and the shard's LMDB), so
    a local loop, a Ray task or a Slurm array task can run it, one shard each."""
    from datastore.manifest import Manifest

    m = Manifest.load(directory)
    shard = Shard(Path(directory) / m.shard_dirs[shard_id], shard_id, m.model.dim, m.vector_dtype)
    try:
        build_index(shard, m.index, seed)
    finally:
        shard.close()
