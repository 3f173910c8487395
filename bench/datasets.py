"""The dataset directory format every benchmark run reads, and exact ground truth.

A dataset is a directory, so that any vectors (ours, a paper's, a customer's) can be
benchmarked without code:

    base.npy            float32 (N, d)
    queries.npy         float32 (Q, d)
    gt.npy              int64 (Q, 100) exact neighbours; computed with faiss and cached
    dataset.json        {"metric": "ip" | "l2" | "cos", "name": ...}
    base_tenants.npz    optional CSR (indptr, indices): the tenants that may see each base
                        vector; an empty row means public
    query_tenants.npy   optional int64 (Q,): the tenant each query runs as

"cos" datasets are normalised at load time and then searched with inner product, so
adapters only ever see "ip" or "l2".
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from datastore.errors import InvalidArgument

GT_K = 100
DATASET_METRICS = ("ip", "l2", "cos")
_GT_CHUNK = 1 << 18  # base rows per exact-search pass: bounds memory for multi-million sets


class DatasetError(InvalidArgument):
    """A dataset directory that cannot be benchmarked; the message says what to fix."""


@dataclass
class Dataset:
    """A loaded dataset; `metric` is the search metric ("ip" or "l2") after normalisation."""

    name: str
    path: Path
    base: np.ndarray
    queries: np.ndarray
    gt: np.ndarray
    metric: str
    source_metric: str
    base_tenants: tuple[np.ndarray, np.ndarray] | None = None
    query_tenants: np.ndarray | None = None

    @property
    def n(self) -> int:
        return int(self.base.shape[0])

    @property
    def dim(self) -> int:
        return int(self.base.shape[1])

    @property
    def has_tenants(self) -> bool:
        return self.query_tenants is not None

    def tenant_lists(self) -> list[list[str]]:
        """Per base vector, its tenants as the strings the index protocol takes."""
        if self.base_tenants is None:
            return [[] for _ in range(self.n)]
        indptr, indices = self.base_tenants
        return [[str(t) for t in indices[indptr[i]:indptr[i + 1]].tolist()] for i in range(self.n)]


def normalise(x: np.ndarray) -> np.ndarray:
    """Unit rows (zero rows stay zero), so that inner product equals cosine."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, np.float32(1e-12))


def write_meta(directory: Path, name: str, metric: str, **extra: object) -> None:
    if metric not in DATASET_METRICS:
        raise DatasetError.field("metric", f"must be one of {DATASET_METRICS}, got {metric!r}")
    meta = {"metric": metric, "name": name, **extra}
    (Path(directory) / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")


def _load_array(path: Path, what: str, mmap: bool = False) -> np.ndarray:
    if not path.is_file():
        raise DatasetError(f"{path} is missing: a dataset needs {what}",
                           hint="create one with `datastore bench prepare ... --out DIR`")
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise DatasetError(f"{path} is not a readable .npy file ({e})") from None


def _check_matrix(x: np.ndarray, path: Path) -> None:
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise DatasetError(f"{path} must be a non-empty 2-d array, got shape {x.shape}")
    if x.dtype.kind != "f":
        raise DatasetError(f"{path} must hold floats (float32), got {x.dtype}")


def read_meta(directory: Path) -> dict:
    path = Path(directory) / "dataset.json"
    if not path.is_file():
        raise DatasetError(f"{path} is missing: write {{\"metric\": \"ip|l2|cos\", \"name\": ...}} there")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("metric") not in DATASET_METRICS:
        raise DatasetError(f"{path}: \"metric\" must be one of {', '.join(DATASET_METRICS)}")
    meta.setdefault("name", Path(directory).resolve().name)
    return meta


def load_dataset(directory: Path | str, *, compute_gt: bool = True, max_queries: int | None = None) -> Dataset:
    """Load and validate a dataset directory; computes and caches gt.npy when absent."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DatasetError(f"dataset directory {directory} does not exist",
                           hint="create one with `datastore bench prepare ... --out DIR`")
    meta = read_meta(directory)
    # The base is memory-mapped: workers then share its pages instead of each holding a copy,
    # and an index's anonymous memory (ram_bytes) is not confused with the dataset's.
    base = _load_array(directory / "base.npy", "base.npy (float32 N x d)", mmap=True)
    queries = _load_array(directory / "queries.npy", "queries.npy (float32 Q x d)")
    _check_matrix(base, directory / "base.npy")
    _check_matrix(queries, directory / "queries.npy")
    if base.shape[1] != queries.shape[1]:
        raise DatasetError(f"base is {base.shape[1]}-d but queries are {queries.shape[1]}-d")
    base_tenants, query_tenants = _load_tenants(directory, base.shape[0], queries.shape[0])

    source_metric = meta["metric"]
    metric = "ip" if source_metric == "cos" else source_metric
    if source_metric == "cos" and not meta.get("normalised"):
        base = normalise(base)
    else:
        base = np.ascontiguousarray(base, dtype=np.float32)  # no copy for a float32 file
    queries = normalise(queries) if source_metric == "cos" else np.ascontiguousarray(queries, dtype=np.float32)
    for arr, name in ((base, "base"), (queries, "queries")):
        if not all(np.isfinite(arr[i:i + _GT_CHUNK]).all() for i in range(0, len(arr), _GT_CHUNK)):
            raise DatasetError(f"{directory / (name + '.npy')} holds NaN or infinite values")

    gt = _cached_gt(directory, base, queries, metric, base_tenants, query_tenants, compute_gt)
    if max_queries is not None and max_queries < len(queries):
        queries, gt = queries[:max_queries], gt[:max_queries]
        query_tenants = None if query_tenants is None else query_tenants[:max_queries]
    return Dataset(str(meta["name"]), directory, base, queries, gt, metric, source_metric,
                   base_tenants, query_tenants)


def _load_tenants(directory: Path, n: int, q: int):
    csr_path, qt_path = directory / "base_tenants.npz", directory / "query_tenants.npy"
    if not csr_path.exists() and not qt_path.exists():
        return None, None
    if not (csr_path.exists() and qt_path.exists()):
        raise DatasetError(f"{directory}: base_tenants.npz and query_tenants.npy come together; one is missing")
    with np.load(csr_path, allow_pickle=False) as z:
        if "indptr" not in z or "indices" not in z:
            raise DatasetError(f"{csr_path} must hold arrays 'indptr' and 'indices' (CSR)")
        indptr, indices = z["indptr"].astype(np.int64), z["indices"].astype(np.int64)
    if indptr.shape != (n + 1,) or indptr[0] != 0 or indptr[-1] != len(indices) or (np.diff(indptr) < 0).any():
        raise DatasetError(f"{csr_path}: indptr must be non-decreasing, shape ({n + 1},), from 0 to len(indices)")
    qt = np.load(qt_path, allow_pickle=False)
    if qt.shape != (q,) or qt.dtype.kind not in "iu":
        raise DatasetError(f"{qt_path} must be integers of shape ({q},), got {qt.dtype} {qt.shape}")
    return (indptr, indices), qt.astype(np.int64)


def _cached_gt(directory, base, queries, metric, base_tenants, query_tenants, compute: bool) -> np.ndarray:
    path = directory / "gt.npy"
    if path.exists():
        gt = np.load(path, allow_pickle=False)
        k_needed = min(10, base.shape[0])
        if gt.ndim != 2 or gt.shape[0] != queries.shape[0] or gt.shape[1] < k_needed or gt.dtype.kind not in "iu":
            raise DatasetError(f"{path} must be int64 (Q={queries.shape[0]}, >= {k_needed}), got {gt.dtype} "
                               f"{gt.shape}", hint="delete it to have it recomputed")
        return gt.astype(np.int64, copy=False)
    if not compute:
        raise DatasetError(f"{path} is missing and computing it was not allowed")
    gt = exact_knn(base, queries, min(GT_K, base.shape[0]), metric, base_tenants, query_tenants)
    try:
        np.save(path, gt)
    except OSError as e:  # a read-only dataset still benchmarks; it just recomputes next time
        print(f"note: could not cache {path} ({e})", file=sys.stderr)
    return gt


def exact_knn(base: np.ndarray, queries: np.ndarray, k: int, metric: str,
              base_tenants: tuple[np.ndarray, np.ndarray] | None = None,
              query_tenants: np.ndarray | None = None) -> np.ndarray:
    """Exact top-k ids (Q, k) with faiss, in base chunks; tenant queries see only their rows."""
    if query_tenants is None:
        return _exact_knn_chunked(base, queries, k, metric)
    indptr, indices = base_tenants
    owner_rows = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
    public = np.flatnonzero(np.diff(indptr) == 0)
    out = np.full((len(queries), k), -1, np.int64)
    for t in np.unique(query_tenants):
        visible = np.union1d(public, owner_rows[indices == t])
        qi = np.flatnonzero(query_tenants == t)
        if len(visible) == 0:
            continue
        kk = min(k, len(visible))
        local = _exact_knn_chunked(np.ascontiguousarray(base[visible]), queries[qi], kk, metric)
        out[qi, :kk] = np.where(local >= 0, visible[np.maximum(local, 0)], -1)
    return out


def _exact_knn_chunked(base: np.ndarray, queries: np.ndarray, k: int, metric: str) -> np.ndarray:
    import faiss

    queries = np.ascontiguousarray(queries, dtype=np.float32)
    best_s = np.full((len(queries), 0), -np.inf, np.float32)
    best_i = np.zeros((len(queries), 0), np.int64)
    for start in range(0, base.shape[0], _GT_CHUNK):
        chunk = np.ascontiguousarray(base[start:start + _GT_CHUNK], dtype=np.float32)
        index = faiss.IndexFlatIP(chunk.shape[1]) if metric == "ip" else faiss.IndexFlatL2(chunk.shape[1])
        index.add(chunk)
        d, i = index.search(queries, min(k, len(chunk)))
        s = d if metric == "ip" else -d
        s = np.where(i < 0, -np.inf, s).astype(np.float32)
        i = np.where(i < 0, -1, i + start)
        best_s, best_i = np.hstack([best_s, s]), np.hstack([best_i, i])
        if best_s.shape[1] > k:  # keep the running top-k only; stable so ties keep id order
            order = np.argsort(-best_s, axis=1, kind="stable")[:, :k]
            best_s = np.take_along_axis(best_s, order, 1)
            best_i = np.take_along_axis(best_i, order, 1)
    return best_i.astype(np.int64)


def recall_at_k(found: np.ndarray, gt: np.ndarray, k: int = 10) -> float:
    """Mean over queries of |found top-k ∩ true top-k| / k (padding ids -1 never match)."""
    found, gt = np.asarray(found), np.asarray(gt)
    if found.ndim != 2 or gt.ndim != 2 or found.shape[0] != gt.shape[0]:
        raise ValueError(f"found {found.shape} and gt {gt.shape} must be (Q, >=k) arrays with equal Q")
    if len(found) == 0:
        return float("nan")
    kk = min(k, gt.shape[1])
    truth = gt[:, :kk]
    hits = 0
    for row_found, row_truth in zip(found[:, :k], truth):
        valid = row_truth[row_truth >= 0]
        hits += len(np.intersect1d(row_found[row_found >= 0], valid, assume_unique=False))
    # Queries whose true top-k is shorter than k (tenant sets) are measured against what exists.
    denom = int((truth >= 0).sum())
    return hits / denom if denom else float("nan")
