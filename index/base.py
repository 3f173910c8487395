"""The index protocol every kind implements, and the small typed values it trades in.

The service and the datastore only ever talk to `VectorIndex`, so they never branch on
the kind. Scores are similarities: higher is better (inner product, or minus the squared
L2 distance for metric "l2").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal, Protocol, Sequence, runtime_checkable

import numpy as np

Metric = Literal["ip", "l2"]
METRICS: tuple[str, ...] = ("ip", "l2")
#: Marks an empty slot in `SearchResult.ids` when fewer than k vectors qualify.
MISSING_ID = -1


@dataclass(frozen=True)
class SearchParams:
    """Per-query knobs; each kind reads the fields it knows and ignores the rest."""

    nprobe: int | None = None
    prune_epsilon: float | None = None
    ef_search: int | None = None
    oversample: float | None = None
    candidate_budget: int | None = None
    #: Model the query vectors come from when not the datastore's own (see Manifest.compat_models).
    query_model: str | None = None


@dataclass
class SearchResult:
    """Top-k of a batch: `ids` int64 (Q, k) padded with MISSING_ID, `scores` float32 (Q, k)."""

    ids: np.ndarray
    scores: np.ndarray

    def __post_init__(self) -> None:
        if self.ids.shape != self.scores.shape or self.ids.ndim != 2:
            raise ValueError(f"ids {self.ids.shape} and scores {self.scores.shape} must be equal (Q, k) shapes")

    @property
    def num_queries(self) -> int:
        return self.ids.shape[0]

    @property
    def k(self) -> int:
        return self.ids.shape[1]

    def row(self, i: int) -> list[tuple[int, float]]:
        """(id, score) pairs of query i, best first, padding dropped."""
        keep = self.ids[i] != MISSING_ID
        return list(zip(self.ids[i][keep].tolist(), self.scores[i][keep].tolist()))

    @classmethod
    def empty(cls, num_queries: int, k: int) -> "SearchResult":
        return cls(np.full((num_queries, k), MISSING_ID, np.int64), np.full((num_queries, k), -np.inf, np.float32))


@dataclass(frozen=True)
class IndexStats:
    kind: str
    count: int
    dim: int
    memory_bytes: int
    disk_bytes: int
    extra: dict = field(default_factory=dict)


@runtime_checkable
class VectorIndex(Protocol):
    """What every index kind provides; vectors are float32 (n, dim), ids int64 (n,)."""

    kind: str
    dim: int
    metric: Metric

    def train(self, sample: np.ndarray) -> None:
        """Learn from `sample` (a kind that sizes itself by the data waits for the adds)."""

    def add(self, ids: np.ndarray, vectors: np.ndarray, tenants: Sequence[Iterable[str]] | None = None) -> None: ...

    def remove(self, ids: np.ndarray) -> int: ...

    def search(
        self,
        queries: np.ndarray,
        k: int,
        tenant: str | None = None,
        params: SearchParams | None = None,
        allowed_ids: np.ndarray | None = None,
    ) -> SearchResult: ...

    def save(self, directory: Path) -> None: ...

    def stats(self) -> IndexStats: ...

    def __len__(self) -> int: ...


def check_dim_metric(dim: int, metric: str) -> None:
    """The constructor check every kind shares."""
    if dim <= 0:
        raise ValueError(f"dim must be positive, got {dim}")
    if metric not in METRICS:
        raise ValueError(f"metric must be 'ip' or 'l2', got {metric!r}")


def check_vectors(vectors: np.ndarray, dim: int, name: str = "vectors") -> np.ndarray:
    """A float32 C-contiguous (n, dim) view of `vectors`, or ValueError saying what is wrong."""
    vectors = np.asarray(vectors)
    if vectors.ndim != 2 or vectors.shape[1] != dim:
        raise ValueError(f"{name} must have shape (n, {dim}), got {vectors.shape}")
    return np.ascontiguousarray(vectors, dtype=np.float32)


def check_ids(ids: np.ndarray, n: int) -> np.ndarray:
    ids = np.asarray(ids)
    if ids.shape != (n,):
        raise ValueError(f"ids must have shape ({n},), got {ids.shape}")
    return np.ascontiguousarray(ids, dtype=np.int64)


def dir_size(directory: Path) -> int:
    return sum(p.stat().st_size for p in Path(directory).rglob("*") if p.is_file())


def distinct_top(ids: np.ndarray, scores: np.ndarray, k: int, copies: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Each row's best k distinct ids of (Q, n) candidates, best first: (ids, scores), padded
    with (MISSING_ID, -inf). Why: an index that replicates entries (SPANN) meets one id in
    several lists with one score; `copies` bounds how often an id repeats in a row, so the
    best k x copies candidates always hold k distinct ids and the rest need no sorting."""
    m = min(ids.shape[1], k * copies)
    if ids.shape[0] == 1:  # one query (most searches): 1-d steps, ~5x less numpy overhead
        return _distinct_top_row(ids[0], scores[0], k, m)
    if m < ids.shape[1]:
        part = np.argpartition(-scores, m - 1, axis=1)[:, :m]
        ids, scores = np.take_along_axis(ids, part, 1), np.take_along_axis(scores, part, 1)
    order = np.argsort(-scores, axis=1, kind="stable")
    ids, scores = np.take_along_axis(ids, order, 1), np.take_along_axis(scores, order, 1)
    by_id = np.argsort(ids, axis=1, kind="stable")  # equal ids stay in score order
    sorted_ids = np.take_along_axis(ids, by_id, 1)
    repeat = np.zeros(ids.shape, bool)
    repeat[:, 1:] = sorted_ids[:, 1:] == sorted_ids[:, :-1]
    drop = np.empty_like(repeat)
    np.put_along_axis(drop, by_id, repeat, 1)
    drop |= (ids == MISSING_ID) | ~np.isfinite(scores)
    keep = np.argsort(drop, axis=1, kind="stable")[:, :k]  # kept first, still in score order
    ids, scores = np.take_along_axis(ids, keep, 1), np.take_along_axis(scores, keep, 1)
    gone = np.take_along_axis(drop, keep, 1)
    return np.where(gone, MISSING_ID, ids), np.where(gone, -np.inf, scores).astype(np.float32)


def _distinct_top_row(ids: np.ndarray, scores: np.ndarray, k: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    cand = np.argpartition(-scores, m - 1)[:m] if m < len(ids) else np.arange(len(ids))
    cand = cand[np.argsort(-scores[cand], kind="stable")]
    cand = cand[(ids[cand] != MISSING_ID) & np.isfinite(scores[cand])]
    _, first = np.unique(ids[cand], return_index=True)
    top = cand[np.sort(first)][:k]
    out_ids = np.full((1, k), MISSING_ID, np.int64)
    out_scores = np.full((1, k), -np.inf, np.float32)
    out_ids[0, :len(top)], out_scores[0, :len(top)] = ids[top], scores[top]
    return out_ids, out_scores
