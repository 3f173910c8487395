"""External int64 ids to internal rows in 12 bytes per id, for in-memory indexes.

A Python dict costs about 100 bytes per entry, as much as a 25-d float vector. Here the
bulk of the map is two sorted arrays searched with `searchsorted`; single inserts go to a
small dict that is merged into the arrays once it grows past a fraction of them (an LSM
in miniature), so both bulk loads and one-by-one upserts stay cheap.
"""

from __future__ import annotations

import numpy as np

#: The dict of recent inserts is merged once it holds more than this share of the arrays.
MERGE_FRACTION = 1 / 16
MERGE_MIN = 4096


class IdMap:
    """id -> row; rows are non-negative, -1 means absent."""

    def __init__(self) -> None:
        self._keys = np.zeros(0, np.int64)
        self._rows = np.zeros(0, np.int32)  # -1: deleted, dropped at the next merge
        self._recent: dict[int, int] = {}
        self._count = 0

    def __len__(self) -> int:
        return self._count

    @property
    def nbytes(self) -> int:
        return self._keys.nbytes + self._rows.nbytes + 100 * len(self._recent)

    def get(self, ids: np.ndarray) -> np.ndarray:
        """Row of each id, -1 for ids not present."""
        ids = np.asarray(ids, np.int64).reshape(-1)
        out = np.full(len(ids), -1, np.int32)
        if len(self._keys):
            pos = np.minimum(np.searchsorted(self._keys, ids), len(self._keys) - 1)
            hit = self._keys[pos] == ids
            out[hit] = self._rows[pos[hit]]
        if self._recent:
            for i, key in enumerate(ids.tolist()):
                row = self._recent.get(key)
                if row is not None:
                    out[i] = row
        return out

    def put(self, ids: np.ndarray, rows: np.ndarray) -> None:
        """Map ids (unique, all absent) to rows."""
        ids = np.asarray(ids, np.int64).reshape(-1)
        rows = np.asarray(rows, np.int32).reshape(-1)
        self._count += len(ids)
        if len(ids) > MERGE_FRACTION * len(self._keys):
            self._merge(ids, rows)
            return
        self._recent.update(zip(ids.tolist(), rows.tolist()))
        if len(self._recent) > max(MERGE_MIN, MERGE_FRACTION * len(self._keys)):
            self._merge(np.zeros(0, np.int64), np.zeros(0, np.int32))

    def delete(self, ids: np.ndarray) -> None:
        """Forget ids (present ones only; absent ones are ignored)."""
        ids = np.asarray(ids, np.int64).reshape(-1)
        gone = 0
        for key in ids.tolist():
            gone += self._recent.pop(key, None) is not None
        if len(self._keys):
            pos = np.minimum(np.searchsorted(self._keys, ids), len(self._keys) - 1)
            hit = (self._keys[pos] == ids) & (self._rows[pos] >= 0)
            gone += int(len(np.unique(pos[hit])))
            self._rows[pos[hit]] = -1
        self._count -= gone

    def _merge(self, ids: np.ndarray, rows: np.ndarray) -> None:
        recent_ids = np.fromiter(self._recent.keys(), np.int64, len(self._recent))
        recent_rows = np.fromiter(self._recent.values(), np.int32, len(self._recent))
        live = self._rows >= 0
        keys = np.concatenate([self._keys[live], recent_ids, ids])
        vals = np.concatenate([self._rows[live], recent_rows, rows])
        order = np.argsort(keys, kind="stable")
        self._keys, self._rows, self._recent = keys[order], vals[order], {}

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids ascending, rows): the whole map, for saving."""
        self._merge(np.zeros(0, np.int64), np.zeros(0, np.int32))
        return self._keys, self._rows

    @classmethod
    def from_arrays(cls, ids: np.ndarray, rows: np.ndarray) -> "IdMap":
        """The map `arrays()` returned: loads without sorting again."""
        out = cls()
        out._keys, out._rows = np.asarray(ids, np.int64), np.asarray(rows, np.int32)
        out._count = len(out._keys)
        return out
