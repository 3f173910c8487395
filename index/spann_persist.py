"""SPANN's persistence: save, load, and the repairs after a crash (recount, recover).

The lists, head table, versions and counters live in LMDB (index/spann_state.py); a save
writes the small rest (config, tenant summaries, binarizer) as files beside them. Saves of
older versions (heads and versions in spann.npz, retired config fields) still load. A mixin
of SpannIndex: it works on the index's own fields.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from index import postings as codec
from index.spann_codes import BinaryRows
from index.spann_tenants import TenantMap
from index.storage import BlobStore, LmdbBlobStore

STATE_FILE = "spann.json"
ARRAYS_FILE = "spann.npz"
BINARIZER_FILE = "spann.binarizer.pt"
#: The head index's coarse centroids: an open reuses them instead of clustering the heads again.
CELLS_FILE = "spann.cells.npy"
POSTINGS_DIR = "postings"
#: Config fields of older saves that no longer exist: the HNSW head index (replaced by an
#: IVF) and fetch threads (lists are now prefetched by the kernel, index/storage.py).
_RETIRED_CONFIG = ("hnsw_threshold", "hnsw_m", "fetch_threads")

if TYPE_CHECKING:
    from index.spann import SpannIndex


class Persistence:
    """Saving and loading SpannIndex, and its crash repairs."""

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with self._lock:
            self._seal()
            if self.state is not None:
                self._commit()  # the counters, in case nothing was written since the seal
                (directory / ARRAYS_FILE).unlink(missing_ok=True)  # left by an older save
            else:
                np.savez(directory / ARRAYS_FILE, heads=self.heads.vectors, alive=self.heads.alive,
                         version_ids=np.fromiter(self._versions.keys(), np.int64, len(self._versions)),
                         version_vals=np.fromiter(self._versions.values(), np.int64, len(self._versions)),
                         deleted=np.fromiter(self._deleted, np.int64, len(self._deleted)))
            if isinstance(self.rows, BinaryRows):
                self.rows.binarizer.save(directory / BINARIZER_FILE)
            cells = self.heads.cells
            if cells is not None:
                np.save(directory / CELLS_FILE, cells)
            else:
                (directory / CELLS_FILE).unlink(missing_ok=True)
            state = {"dim": self.dim, "metric": self.metric, "config": asdict(self.config),
                     "max_posting": self.max_posting, "count": self._count,
                     "tenant_map": self.tenants.state(), "binarizer": isinstance(self.rows, BinaryRows),
                     "state": "lmdb" if self.state is not None else "files"}
            (directory / STATE_FILE).write_text(json.dumps(state))
            if isinstance(self.store, LmdbBlobStore) and self.store._owned:
                target = directory / POSTINGS_DIR
                if self.store.path is None or target.resolve() != Path(self.store.path).resolve():
                    shutil.rmtree(target, ignore_errors=True)
                    target.mkdir(parents=True)
                    self.store.env.copy(str(target), compact=True)
            self._saved_dir = directory

    @classmethod
    def load(cls, directory: Path, storage: BlobStore | None = None) -> SpannIndex:
        directory = Path(directory)
        state = json.loads((directory / STATE_FILE).read_text())
        if storage is None:
            storage = LmdbBlobStore.open(directory / POSTINGS_DIR)
        config = {k: v for k, v in state["config"].items() if k not in _RETIRED_CONFIG}
        index = cls(state["dim"], state["metric"], storage=storage, **config)
        index.max_posting, index._count = state["max_posting"], state["count"]
        cells = np.load(directory / CELLS_FILE) if (directory / CELLS_FILE).is_file() else None
        if state.get("state") == "lmdb":
            if index.state is None:
                raise ValueError(f"{directory}: this SPANN index keeps its state in LMDB; open it over an LMDB store")
            persisted = index.state.load(index.dim)
            if persisted is not None:  # else nothing was ever committed: an empty index
                vectors, alive, index._versions, index._deleted, meta = persisted
                index.heads.reset(vectors, alive, cells)
                index.max_posting, index._count = meta["max_posting"], meta["count"]
        else:  # an older save: heads and versions in spann.npz, lists possibly ahead of them
            arrays = np.load(directory / ARRAYS_FILE)
            index.heads.reset(arrays["heads"], arrays["alive"], cells)
            index._versions = dict(zip(arrays["version_ids"].tolist(), arrays["version_vals"].tolist()))
            index._deleted = set(arrays["deleted"].tolist())
            index.replayable = False
            index._state_unwritten = index.state is not None
        if state.get("binarizer"):
            from index.binarizer import Binarizer
            index.rows = BinaryRows(Binarizer.load(directory / BINARIZER_FILE))
        if "tenant_map" in state:
            index.tenants = TenantMap.restore(state["tenant_map"])
        else:  # saved before per-list tenants were kept: rebuild them from the lists
            index.tenants.set([int(i) for i in state["tenants"]], list(state["tenants"].values()))
            for h, blob in index.store.items():
                p = codec.decode(blob, index._width)
                index.tenants.note_posting(h, p.ids[index._valid(p)])
        index._saved_dir = directory
        return index

    #: Whether writes made after a save can be replayed onto the saved index (not for saves
    #: that kept the head table in files: the lists may have moved on past them).
    replayable = True

    def recount(self, live: int) -> None:
        """Set the vector count to `live` (the datastore's count after a replay: ids logged
        but never applied were counted out by the replay's remove)."""
        with self._lock:
            self._count = live
            self._commit()

    def recover(self) -> None:
        """After a crash: recompute the per-list tenant summaries from the lists (a split or
        an insert since the save changed lists the saved summaries describe). Reads every
        list once, even when no id is restricted: the summaries also count public entries,
        which a later grant's probes rely on."""
        with self._lock:
            self.tenants.clear_postings()
            for h, blob in self.store.items():
                if h < len(self.heads.alive) and self.heads.alive[h]:
                    p = codec.decode(blob, self._width)
                    self.tenants.note_posting(h, p.ids[self._valid(p)])
