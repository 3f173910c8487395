"""Spreading passages over shards and merging per-shard results back.

Assignment hashes the id (splitmix64 finaliser), so sequential ids and user-chosen ids
both spread evenly, and a passage's shard never changes. The embedded store and the
router use the same merge.
"""

from __future__ import annotations

import numpy as np

from index.base import MISSING_ID, SearchResult

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def shard_of(ids: np.ndarray | int, num_shards: int) -> np.ndarray:
    """Shard number of each id (int64 array)."""
    x = np.asarray(ids, dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * _M1
        x = (x ^ (x >> np.uint64(27))) * _M2
        x = x ^ (x >> np.uint64(31))
    return (x % np.uint64(num_shards)).astype(np.int64)


def merge_topk(results: list[SearchResult], k: int) -> SearchResult:
    """Best k of several (Q, k_i) results per query, by score; padding sorts last."""
    if not results:
        raise ValueError("nothing to merge")
    if len(results) == 1 and results[0].k == k:
        return results[0]
    ids = np.concatenate([r.ids for r in results], axis=1)
    scores = np.concatenate([r.scores for r in results], axis=1)
    scores = np.where(ids == MISSING_ID, -np.inf, scores)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    out_ids = np.take_along_axis(ids, order, axis=1)
    out_scores = np.take_along_axis(scores, order, axis=1).astype(np.float32)
    if out_ids.shape[1] < k:  # fewer candidates than k in total
        pad = k - out_ids.shape[1]
        out_ids = np.pad(out_ids, ((0, 0), (0, pad)), constant_values=MISSING_ID)
        out_scores = np.pad(out_scores, ((0, 0), (0, pad)), constant_values=-np.inf)
    return SearchResult(out_ids, out_scores)
