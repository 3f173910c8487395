"""SPANN's durable state beside its posting lists: the head table and per-id versions.

The lists are updated in place, so everything that gives them meaning must change in the
same LMDB transaction as they do, or a crash between two writes leaves lists the index can
no longer read right (a split's new lists under heads the table lacks, entries whose
version the table calls stale). Two databases of the lists' environment hold it:

- `spann.heads`: head id -> its centroid (float32 bytes); a removed head has no record.
- `spann.versions`: id -> (version, deleted) for ids whose version is not 0 or that are
  deleted (tombstones). Bulk-built entries carry version 0 and need no record.
- `spann.meta`: the counters that change with them (vector count, list length limit).

Every SpannIndex write goes through `commit`, one transaction for lists, heads and versions,
so the state on disk is always one the index passed through. What a crash loses is the
index work of writes acknowledged by the shard but not yet applied: the datastore replays
those from the shard's change log (datastore/indexing.py).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Sequence

import numpy as np

from index.storage import LmdbBlobStore

HEADS_DB = "spann.heads"
VERSIONS_DB = "spann.versions"
META_DB = "spann.meta"
_VERSION = struct.Struct(">HB")  # version, deleted flag


class SpannState:
    """The head table and versions of one SPANN index, in its lists' LMDB environment."""

    def __init__(self, lists: LmdbBlobStore) -> None:
        self.lists = lists
        self.heads = lists.sibling(HEADS_DB)
        self.versions = lists.sibling(VERSIONS_DB)
        self.meta = lists.sibling(META_DB)

    def commit(self, meta: dict, lists: dict[int, bytes] | None = None, list_deletes: Sequence[int] = (),
               heads: dict[int, np.ndarray] | None = None, head_deletes: Sequence[int] = (),
               versions: dict[int, tuple[int, bool]] | None = None, version_deletes: Iterable[int] = ()) -> None:
        """Lists, heads, versions and `meta` written in one transaction."""
        head_puts = {int(h): np.ascontiguousarray(v, np.float32).tobytes() for h, v in (heads or {}).items()}
        version_puts = {int(i): _VERSION.pack(int(v), int(d)) for i, (v, d) in (versions or {}).items()}
        self.lists.write_many([(self.lists, lists or {}, list(list_deletes)),
                               (self.heads, head_puts, list(head_deletes)),
                               (self.versions, version_puts, [int(i) for i in version_deletes]),
                               (self.meta, {0: json.dumps(meta).encode()}, [])])

    def clear(self, versions: bool = True) -> None:
        for store in (self.heads, self.meta) + ((self.versions,) if versions else ()):
            store.clear()

    def load(self, dim: int) -> tuple[np.ndarray, np.ndarray, dict[int, int], set[int], dict] | None:
        """(head vectors by id, alive flags, versions, deleted ids, meta); None before the
        first commit."""
        (raw,) = self.meta.get_many([0])
        if raw is None:
            return None
        heads = list(self.heads.items())
        count = max((h for h, _ in heads), default=-1) + 1
        vectors = np.zeros((count, dim), np.float32)
        alive = np.zeros(count, bool)
        for h, blob in heads:
            vectors[h] = np.frombuffer(blob, np.float32)
            alive[h] = True
        versions: dict[int, int] = {}
        deleted: set[int] = set()
        for i, blob in self.versions.items():
            v, d = _VERSION.unpack(blob)
            if v:
                versions[i] = v
            if d:
                deleted.add(i)
        return vectors, alive, versions, deleted, json.loads(raw)
